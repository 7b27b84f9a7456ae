"""Ray Serve figures (BENCHMARKS.md "Ray Serve (issue 8)"): a bounded load generator on loopback against the tiny app.

Phase A (every deployment fixed at one replica): Serve graph vs the same pipeline in-process (RAUModel.predict) at
concurrency 1; Policy throughput at concurrency 16, batched (@serve.batch, max 16) vs unbatched (max 1), through
its DeploymentHandle; a point prompt on a cached embedding (session command) vs a full /v1/segment request.
Phase B (local.yaml's autoscaling): /v1/segment at concurrency 1/4/16, each a fixed request count under a time cap:
p50/p95/p99, throughput, error rate; replica counts sampled from serve.status() during the load and after it.
Use: ``.venv/bin/python benchmarks/serve_load.py --requests 16,32,64 --out runs/bench/serve_load.json``.
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


def target_png():
    from rau_ray.data import formats
    from rau_ray.data.phantoms import get_phantom

    samples = list(get_phantom("ct-abdomen").generate_2d(3, 11, size=128, slices=4))
    best = max(samples, key=lambda s: int((s.label == 1).sum()))
    return formats.encode_png(formats.hu_to_png16(best.image)), best.image


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
    from rau_ray.serve.app import start, stop
    from rau_ray.serve.deployments import build_phantom_bank

    fixed = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8}}
    options = {d: fixed for d in ("Ingress", "Retriever", "Policy", "Segmenter", "Commander")}
    base = start(profile="tiny", port=free_port(), options=options)
    out = {}
    try:
        sess = requests.Session()

        def segment():
            return sess.post(base + "/v1/segment", files={"image": ("x.png", png, "image/png")},
                             data={"structures": "liver"}, timeout=120).status_code

        for _ in range(3):
            segment()  # warm-up
        out["serve_c1"] = bounded_load(segment, 1, n_overhead, 300)
        # in-process: the same models and an identical bank, RAUModel.predict, this process
        import tempfile

        import torch

        torch.set_num_threads(1)  # as each replica
        bank = build_phantom_bank(tempfile.mkdtemp(prefix="rau-bench-bank-"))
        model = RAUModel.build(get_profile("tiny"), bank_dir=bank)
        for _ in range(3):
            model.predict(image, "liver")
        lat = []
        for _ in range(n_overhead):
            t0 = time.perf_counter()
            model.predict(image, "liver")
            lat.append(time.perf_counter() - t0)
        out["inprocess_c1"] = {"p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "requests": len(lat)}
        out["serve_overhead"] = round(out["serve_c1"]["p50_ms"] / out["inprocess_c1"]["p50_ms"] - 1, 4)

        # point prompt on a cached embedding (session command) vs a full segment request, concurrency 1
        sid = sess.post(base + "/v1/sessions", files={"image": ("x.png", png, "image/png")}).json()["id"]
        sess.post(f"{base}/v1/sessions/{sid}/commands", json={"text": "add a point at 40,50"})

        def point():
            return sess.post(f"{base}/v1/sessions/{sid}/commands", json={"text": "undo then add a point at 40,50"},
                             timeout=60).status_code

        out["point_cached_c1"] = bounded_load(point, 1, max(20, n_overhead), 120)
        out["point_vs_full"] = round(out["point_cached_c1"]["p50_ms"] / out["serve_c1"]["p50_ms"], 4)

        # Policy: batched vs unbatched at concurrency 16, through the handle
        from rau_ray.data.tasks import label_boxes
        from rau_ray.models.prompts import to_pil

        ref = model.retrieve(image, "CT", structure="liver")
        ask = {"task": "segment", "ref_image": np.asarray(to_pil(ref.image, "CT")),
               "ref_boxes": label_boxes(ref.label, ref.names), "target": np.asarray(to_pil(image, "CT")),
               "structure": "liver", "modality": "CT"}
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
            policy.configure.remote(size, 0.05).result()
            asyncio.run(burst(4, 4))  # warm-up
            policy.configure.remote(size, 0.05).result()
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


def phase_b(png, counts: list[int], cap_s: float, cooldown_s: float) -> dict:
    import requests

    from rau_ray.serve.app import start, stop

    base = start(profile="tiny", port=free_port())
    out = {"levels": []}
    try:
        local = threading.local()

        def segment():
            s = getattr(local, "s", None) or requests.Session()
            local.s = s
            return s.post(base + "/v1/segment", files={"image": ("x.png", png, "image/png")},
                          data={"structures": "liver"}, timeout=120).status_code

        for _ in range(3):
            segment()
        out["replicas_before"] = replica_counts()
        sampler = Sampler()
        sampler.start()
        for conc, n in zip((1, 4, 16), counts):
            res = bounded_load(segment, conc, n, cap_s)
            res["replicas_end"] = replica_counts()
            out["levels"].append(res)
            print(json.dumps(res), flush=True)
        out["replicas_peak"] = sampler.peak()
        time.sleep(cooldown_s)  # local.yaml's downscale_delay_s is 20 s
        out["replicas_after_cooldown"] = replica_counts()
        sampler.stop_flag.set()
        out["replica_timeline"] = [(round(t - sampler.samples[0][0], 1), c) for t, c in sampler.samples]
    finally:
        stop()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", default="16,32,64", help="request counts at concurrency 1,4,16")
    ap.add_argument("--overhead-requests", type=int, default=15)
    ap.add_argument("--cap-s", type=float, default=180.0, help="time cap per concurrency level")
    ap.add_argument("--cooldown-s", type=float, default=45.0)
    ap.add_argument("--out", default="runs/bench/serve_load.json")
    ap.add_argument("--phase", default="ab", help="a, b or ab")
    a = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    from rau_ray import ray_session

    ray_session.connect(num_cpus=2)
    png, image = target_png()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join(["benchmarks/serve_load.py", *sys.argv[1:]])}
    if "a" in a.phase:
        report["a"] = phase_a(png, image, a.overhead_requests)
        print(json.dumps(report["a"], indent=1), flush=True)
    if "b" in a.phase:
        report["b"] = phase_b(png, [int(x) for x in a.requests.split(",")], a.cap_s, a.cooldown_s)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "b"}, indent=1, default=str))
    if "b" in report:
        print(json.dumps({k: v for k, v in report["b"].items() if k != "replica_timeline"}, indent=1, default=str))


if __name__ == "__main__":
    main()
