"""Ray Serve figures (BENCHMARKS.md "Ray Serve (issue 8)"): a bounded load generator on loopback against the tiny app.

Phase A (every deployment fixed at one replica): Serve graph vs the same pipeline in-process (RAUModel.predict) at
concurrency 1, same image; Policy throughput at concurrency 16, batched (@serve.batch, max 16, the app's batch wait)
vs unbatched (max 1), through its DeploymentHandle; a point prompt on a cached embedding (a canvas click: the
session operation the web page sends) vs a full /v1/segment request.
Phase B (local.yaml's autoscaling): /v1/segment on a pool of distinct phantom slices at concurrency 1/4/16, each a
fixed request count under a time cap: p50/p95/p99, throughput, error rate; then ``--sustain-s`` seconds at
concurrency 16 and ``--cooldown-s`` idle, replica counts sampled from serve.status() every second throughout
(plotted to ``--plot``).
Use: ``.venv/bin/python benchmarks/serve_load.py --out runs/bench/serve_load.json`` (prefix
``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` for Serve's high-throughput mode; the report records RAY_SERVE_* variables).
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pct(values, q):
    return round(float(np.percentile(values, q)) * 1000, 1) if values else None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def target_pngs(n: int = 8, size: int = 128):
    """(png, HU image) of ``n`` distinct ``size`` x ``size`` phantom CT slices showing the liver, largest first."""
    from rau_ray.data import formats
    from rau_ray.data.phantoms import get_phantom

    samples = [s for seed in range(3, 9) for s in get_phantom("ct-abdomen").generate_2d(seed, 11, size=size, slices=4)]
    samples.sort(key=lambda s: -int((s.label == 1).sum()))
    return [(formats.encode_png(formats.hu_to_png16(s.image)), s.image) for s in samples[:n]]


def segment_body(png: bytes) -> tuple[bytes, str]:
    """A /v1/segment multipart body, encoded once: the load generator should not time its own encoding."""
    from urllib3 import encode_multipart_formdata

    return encode_multipart_formdata({"image": ("x.png", png, "image/png"), "structures": "liver"})


def bounded_load(fn, concurrency: int, n: int, cap_s: float) -> dict:
    """``n`` calls of ``fn()`` (-> HTTP status) by ``concurrency`` workers; stops early at ``cap_s``."""
    lat, statuses, lock, issued = [], [], threading.Lock(), [0]
    t_end = time.perf_counter() + cap_s

    def worker():
        while True:
            with lock:
                if issued[0] >= n or time.perf_counter() > t_end:
                    return
                issued[0] += 1
            t0 = time.perf_counter()
            try:
                status = fn()
            except Exception as e:  # noqa: BLE001 - counted as an error
                status = repr(e)[:80]
            dt = time.perf_counter() - t0
            with lock:
                statuses.append(status)
                if status == 200:
                    lat.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for f in [pool.submit(worker) for _ in range(concurrency)]:
            f.result()
    wall = time.perf_counter() - t0
    errors = [s for s in statuses if s != 200]
    return {"concurrency": concurrency, "requests": len(statuses), "ok": len(lat), "errors": len(errors),
            "error_rate": round(len(errors) / max(1, len(statuses)), 4), "error_examples": errors[:5],
            "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
            "throughput_rps": round(len(lat) / wall, 2), "wall_s": round(wall, 1)}


def replica_counts(app="rau") -> dict:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None:
        return {}
    out = {}
    for name, d in st.deployments.items():
        out[name] = sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
    return out


class Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.samples, self.stop_flag = [], threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                self.samples.append((time.time(), replica_counts()))
            except Exception:  # noqa: BLE001
                pass
            self.stop_flag.wait(1.0)

    def peak(self):
        peak = {}
        for _, c in self.samples:
            for k, v in c.items():
                peak[k] = max(peak.get(k, 0), v)
        return peak


def phase_a(png, image, n_overhead: int) -> dict:
    import requests
    from ray import serve

    from rau_ray.models.profiles import get_profile
    from rau_ray.models.rau import RAUModel
    from rau_ray.models.retrieval import phantom_bank
    from rau_ray.serve.app import start, stop

    fixed = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}}
    options = {d: fixed for d in ("Ingress", "Retriever", "Policy", "Segmenter", "Commander")}
    base = start(profile="tiny", port=free_port(), options=options)
    out = {}
    try:
        sess = requests.Session()
        body, ctype = segment_body(png)
        # in-process: the same models and an identical bank, RAUModel.predict, this process, 1 thread as a replica
        import tempfile

        import torch

        torch.set_num_threads(1)
        model = RAUModel.build(get_profile("tiny"), bank_dir=phantom_bank(tempfile.mkdtemp(prefix="rau-bench-")))
        # a session for the point prompts: one click (what the web page sends), undone before the next
        sid = sess.post(base + "/v1/sessions", files={"image": ("x.png", png, "image/png")}).json()["id"]
        click = {"operations": [{"op": "add_point", "positive": True, "x": 40, "y": 50, "count": 1}],
                 "mask_format": "png"}
        lat = {"serve": [], "inprocess": [], "point": [], "healthz": []}
        stages = {"serve": [], "inprocess": []}

        def timed(kind, fn):
            t0 = time.perf_counter()
            value = fn()
            lat[kind].append(time.perf_counter() - t0)
            return value

        def one_round(keep: bool):
            """A full /v1/segment, the same in-process, a point prompt, an empty HTTP round trip: interleaved, so
            the machine's drift moves all four alike."""
            r = timed("serve", lambda: sess.post(base + "/v1/segment", data=body, headers={"Content-Type": ctype},
                                                 timeout=120))
            assert r.status_code == 200, r.text
            stages["serve"].append(r.json()["results"][0]["timings_ms"])
            stages["inprocess"].append(timed("inprocess", lambda: model.predict(image, "liver")).timings)
            sess.post(f"{base}/v1/sessions/{sid}/undo", timeout=60)
            r = timed("point", lambda: sess.post(f"{base}/v1/sessions/{sid}/commands", json=click, timeout=60))
            assert r.status_code == 200, r.text
            timed("healthz", lambda: sess.get(base + "/healthz", timeout=10))
            if not keep:
                for values in (*lat.values(), *stages.values()):
                    values.pop()

        for _ in range(3):
            one_round(keep=False)  # warm-up
        for _ in range(n_overhead):
            one_round(keep=True)
        out["rounds"] = n_overhead
        out["p50_ms"] = {k: pct(v, 50) for k, v in lat.items()}
        out["p95_ms"] = {k: pct(v, 95) for k, v in lat.items()}
        # where the time goes: the Ingress's own per-stage timings and RAUModel.predict's, medians
        out["serve_c1_stages_ms"] = {k: round(float(np.median([t[k] for t in stages["serve"]])), 1)
                                     for k in stages["serve"][-1]}
        out["inprocess_c1_stages_ms"] = {k: pct([t[k] for t in stages["inprocess"]], 50)
                                         for k in stages["inprocess"][-1]}
        out["serve_overhead"] = round(out["p50_ms"]["serve"] / out["p50_ms"]["inprocess"] - 1, 4)
        out["point_vs_full"] = round(out["p50_ms"]["point"] / out["p50_ms"]["serve"], 4)

        # Policy: batched vs unbatched at concurrency 16, through the handle
        from rau_ray.data.tasks import label_boxes
        from rau_ray.models.prompts import to_pil
        from rau_ray.serve.messages import Question

        ref = model.retrieve(image, "CT", structure="liver")
        ask = Question(task="segment", ref_image=np.asarray(to_pil(ref.image, "CT")),
                       ref_boxes=label_boxes(ref.label, ref.names), target=np.asarray(to_pil(image, "CT")),
                       structure="liver", modality="CT")
        policy = serve.get_deployment_handle("Policy", app_name="rau")

        async def burst(total, conc):
            sem = asyncio.Semaphore(conc)

            async def one():
                async with sem:
                    await policy.answer.remote(ask)

            t0 = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(total)))
            return time.perf_counter() - t0

        for size in (1, 16):
            policy.configure.remote(size).result()  # the app's batch wait (local.yaml)
            asyncio.run(burst(4, 4))  # warm-up
            policy.configure.remote(size).result()
            total = 48
            wall = asyncio.run(burst(total, 16))
            sizes = policy.batch_sizes.remote().result()
            out[f"policy_batch{size}_c16"] = {"requests": total, "throughput_rps": round(total / wall, 2),
                                              "mean_batch": round(float(np.mean(sizes)), 2) if sizes else None}
        out["batched_vs_unbatched"] = round(out["policy_batch16_c16"]["throughput_rps"]
                                            / out["policy_batch1_c16"]["throughput_rps"], 2)
    finally:
        stop()
    return out


def phase_b(pool, counts: list[int], cap_s: float, sustain_s: float, cooldown_s: float) -> dict:
    import itertools

    import requests

    from rau_ray.serve.app import start, stop

    base = start(profile="tiny", port=free_port())
    out = {"levels": []}
    images, lock = itertools.cycle([segment_body(png) for png, _ in pool]), threading.Lock()
    try:
        local = threading.local()

        def segment():
            s = getattr(local, "s", None) or requests.Session()
            local.s = s
            with lock:
                body, ctype = next(images)
            return s.post(base + "/v1/segment", data=body, headers={"Content-Type": ctype},
                          timeout=120).status_code

        for _ in range(3):
            segment()
        out["replicas_before"] = replica_counts()
        sampler = Sampler()
        sampler.start()
        marks = {"start": time.time()}
        for conc, n in zip((1, 4, 16), counts):
            res = bounded_load(segment, conc, n, cap_s)
            res["replicas_end"] = replica_counts()
            out["levels"].append(res)
            print(json.dumps(res), flush=True)
        if sustain_s > 0:  # long enough for Serve's look-back window: the replicas scale up
            marks["sustain"] = time.time()
            res = bounded_load(segment, 16, 10 ** 9, sustain_s)
            res["replicas_end"] = replica_counts()
            out["sustained_c16"] = res
            print(json.dumps(res), flush=True)
        marks["idle"] = time.time()
        out["replicas_peak"] = sampler.peak()
        time.sleep(cooldown_s)  # local.yaml's downscale_delay_s is 20-30 s
        out["replicas_after_cooldown"] = replica_counts()
        sampler.stop_flag.set()
        t_first = sampler.samples[0][0]
        out["marks_s"] = {k: round(v - t_first, 1) for k, v in marks.items()}
        out["replica_timeline"] = [(round(t - t_first, 1), c) for t, c in sampler.samples]
        if out.get("sustained_c16"):
            up = [t for t, c in out["replica_timeline"] if t >= out["marks_s"]["sustain"] and max(c.values()) > 1]
            down = [t for t, c in out["replica_timeline"] if t >= out["marks_s"]["idle"]
                    and all(v <= out["replicas_before"].get(k, 1) for k, v in c.items())]
            out["scaled_up_after_s"] = round(up[0] - out["marks_s"]["sustain"], 1) if up else None
            out["back_down_after_idle_s"] = round(down[0] - out["marks_s"]["idle"], 1) if down else None
    finally:
        stop()
    return out


def plot_timeline(b: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rau_ray.atomic import atomic_write_figure

    timeline = b["replica_timeline"]
    names = sorted({k for _, c in timeline for k in c})
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    for i, name in enumerate(names):  # a small offset per deployment so equal counts stay visible
        ax.step([t for t, _ in timeline], [c.get(name, 0) + 0.03 * (i - len(names) / 2) for _, c in timeline],
                where="post", label=name, lw=1.8)
    marks = b.get("marks_s", {})
    if "sustain" in marks:
        ax.axvspan(marks["sustain"], marks["idle"], color="tab:red", alpha=0.08, label="sustained concurrency 16")
    top = max(v for _, c in timeline for v in c.values())
    ax.set_yticks(range(0, top + 2))
    ax.set_ylim(0.5, top + 0.7)
    ax.set_xlabel("seconds since the load began (concurrency 1, 4, 16 levels, then sustained 16, then idle)")
    ax.set_ylabel("running replicas")
    ax.set_title("Serve autoscaling of the tiny app (serve.status() every second)", fontsize=10)
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    atomic_write_figure(path, fig, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", default="16,32,64", help="request counts at concurrency 1,4,16")
    ap.add_argument("--overhead-requests", type=int, default=60, help="interleaved rounds for the phase A ratios")
    ap.add_argument("--cap-s", type=float, default=180.0, help="time cap per concurrency level")
    ap.add_argument("--sustain-s", type=float, default=120.0, help="seconds at concurrency 16 to show scale-up")
    ap.add_argument("--cooldown-s", type=float, default=75.0, help="idle seconds to show scale-down")
    ap.add_argument("--out", default="runs/bench/serve_load.json")
    ap.add_argument("--plot", default="docs/serve_autoscaling.png")
    ap.add_argument("--phase", default="ab", help="a, b or ab")
    ap.add_argument("--size", type=int, default=128, help="request image size in pixels (CT slices are 512)")
    a = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from rau_ray import ray_session
    from rau_ray.serve.app import local_options

    ray_session.connect(num_cpus=2)
    pool = target_pngs(size=a.size)
    png, image = pool[0]
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_average_at_start": os.getloadavg(),
              "serve_env": {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")},
              "image_size": a.size,
              "app_args": local_options()[0],
              "command": " ".join(["benchmarks/serve_load.py", *sys.argv[1:]])}
    if "a" in a.phase:
        report["a"] = phase_a(png, image, a.overhead_requests)
        print(json.dumps(report["a"], indent=1), flush=True)
    if "b" in a.phase:
        report["b"] = phase_b(pool, [int(x) for x in a.requests.split(",")], a.cap_s, a.sustain_s, a.cooldown_s)
        if a.plot:
            plot_timeline(report["b"], a.plot)
    report["load_average_at_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "b"}, indent=1, default=str))
    if "b" in report:
        print(json.dumps({k: v for k, v in report["b"].items() if k != "replica_timeline"}, indent=1, default=str))


if __name__ == "__main__":
    main()
