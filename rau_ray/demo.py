"""The main job, ``rau demo`` / ``make demo``: the whole pipeline on an embedded local Ray cluster, tiny profile.

Today: phantom datasets of every modality generated in parallel on Ray, a preview picture of them, a 3D volume
round-tripped through NIfTI + dataset.json import, a reference bank built on Ray, retrieval recall, one RAU
``predict`` (tiny, untrained) drawn as a picture, then short training runs on Ray Train (SFT -> GRPO, segmenter)
with their learning curves, and last the evaluation report of those checkpoints on the held-out subjects of every
dataset and the held-out 3D volumes (``runs/demo/eval/report.md``), and at the end Ray Serve: the app started on the
same cluster with the demo's reference bank and checkpoints (GRPO policy, RAU segmenter), real HTTP requests on a
held-out CT slice (``/readyz``, ``/v1/segment``, ``/v1/label``, a session with natural-language commands, its mask),
their responses in ``runs/demo/serve/responses.json`` and the masks drawn in ``runs/demo/serve/segment.png``; then
Serve is stopped (``--serve-forever``: left up, web page at the printed URL, until Ctrl-C).
The terminal shows one line per stage (its key figure and where its output went) and a summary table at the end;
everything else Ray, Ray Train, Ray Data and the libraries print goes to ``<out>/demo.log`` (the path is printed
first). On an error the log's last lines are shown with the error.
Use: ``rau demo --out runs/demo [--serve-forever] [--port 8000]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import yaml

from rau_ray import ray_session
from rau_ray.atomic import atomic_write_figure, atomic_write_text
from rau_ray.data.formats import apply_window
from rau_ray.data.importers import ImportConfig, import_dataset
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.manifest import read_manifest
from rau_ray.data.phantoms import PHANTOMS
from rau_ray.data.preview import preview
from rau_ray.errors import ConfigError, RauError
from rau_ray.eval.evaluate import run_eval
from rau_ray.eval.plan import EvalConfig
from rau_ray.models.profiles import get_profile
from rau_ray.models.rau import RAUModel
from rau_ray.models.retrieval import Embedder, ReferenceBank, recall_at_k
from rau_ray.serve import app as serve_app
from rau_ray.serve import codecs
from rau_ray.serve.app import stop
from rau_ray.train.jobs import run_job

_SCREEN: list = []  # the terminal while the demo's output goes to its log (innermost last)


def say(line: str) -> None:
    """One line for the person watching (the terminal even while Ray's and the libraries' output goes to the log)."""
    stream = _SCREEN[-1] if _SCREEN else sys.stdout
    print(line, file=stream, flush=True)


@contextlib.contextmanager
def output_to(log_path: Path, tail: int = 40):
    """Send file descriptors 1 and 2 (Python, Ray's processes started meanwhile, C libraries) to ``log_path``;
    ``say`` still reaches the terminal. On an error the log's last ``tail`` lines go to the terminal first."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    screen = os.fdopen(os.dup(1), "w", buffering=1)
    streams = sys.stdout, sys.stderr
    with open(log_path, "ab", buffering=0) as log, open(log_path, "a", buffering=1, errors="replace") as text:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        # Python's own streams too: where sys.stdout is not fd 1 (a capturing test runner), Ray's forwarded worker
        # logs and the libraries' prints would otherwise miss the log
        sys.stdout = sys.stderr = text
        _SCREEN.append(screen)
        failed = True
        try:
            yield
            failed = False
        finally:
            text.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            _SCREEN.pop()
            screen.close()
            if failed:
                lines = log_path.read_text(errors="replace").splitlines()[-tail:]
                print("\n".join([f"--- the last {len(lines)} lines of {log_path} ---", *lines, "---"]),
                      file=sys.stderr, flush=True)


def run_models(out: Path) -> dict:
    """Reference bank over the CT train split (Ray), recall on held-out subjects, one tiny RAU prediction."""

    cfg = get_profile("tiny")
    manifest_path = out / "data" / "ct-abdomen" / "manifest.jsonl"
    bank = ReferenceBank.build(manifest_path, cfg.retrieval, split="train")
    bank.save(out / "bank")
    recall = recall_at_k(bank, Embedder(cfg.retrieval), manifest_path, split="test")
    model = RAUModel.build(cfg, bank_dir=str(out / "bank"))
    manifest = read_manifest(manifest_path)
    rows = manifest.select(split="test")
    row = max(rows, key=lambda r: int((manifest.load(r)[1] == 1).sum()))  # the test slice showing most liver
    image, label = manifest.load(row)
    prediction = model.predict(image, "liver", modality=row.modality)
    _draw_prediction(image, label == 1, prediction, out / "predict.png")
    return {"bank": {"entries": len(bank), "index": bank.info["index"]}, "recall": recall,
            "predict": {"target": row.id, "structure": "liver", "reference": prediction.reference,
                        "score": round(prediction.score, 3), "format_error": prediction.format_error,
                        "timings_ms": {k: round(1000 * v, 1) for k, v in prediction.timings.items()},
                        "picture": str(out / "predict.png")}}


CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
# demo-length runs of every stage of the recipe (fields over jobs/configs/<stage>-tiny.yaml): long enough to show
# each one learn on 2 cores, short enough for `make demo`; the long runs of the same configs ship as
# shipped:<stage> (weights/tiny/rau), evaluated beside them
DEMO_RUNS = {"sft": {"max_steps": 50}, "grpo": {"max_steps": 6}, "seg": {"max_steps": 30},
             "seg-memref": {"max_steps": 30}, "seg-cbam": {"max_steps": 20}}
STAGES = ("sft", "grpo", "seg", "seg-memref", "seg-cbam")  # jobs/configs/<stage>-tiny.yaml, in this order
SHIPPED = tuple(f"shipped:{stage}" for stage in STAGES)  # rau ship's names for the long runs (BENCHMARKS, issue 17)


def run_training(out: Path, runs: dict[str, dict] = DEMO_RUNS) -> dict:
    """The tiny training jobs on the demo's CT phantoms, shortened: SFT, then GRPO from the SFT adapter, then the
    segmenters (RAU fusion on the GRPO policy's <Seg> states, the SAM2-Memory-Ref-SFT baseline, CBAM-LoRA SAM2).
    ``runs``: per stage, the fields set over its tiny config (``max_steps`` at least; ``scale``'s fields are set over
    the config's ``scale``); a stage left out is skipped.
    Each writes its checkpoint and learning curves under ``out/train/<run>``."""


    manifest = str(out / "data" / "ct-abdomen" / "manifest.jsonl")
    results = {}
    for run in [r for r in STAGES if r in runs]:
        path = CONFIGS / f"{run}-tiny.yaml"
        if not path.is_file():
            raise ConfigError(f"{path} not found: run the demo from a checkout of the project")
        data = yaml.safe_load(path.read_text())
        fields = dict(runs[run])
        scale = {**data.get("scale", {}), **fields.pop("scale", {}), "storage_path": str(out / "train")}
        data.update(fields, manifest=manifest, name=run, scale=scale)
        if run == "grpo":
            data["sft_checkpoint"] = results["sft"]["checkpoint"]
        if run == "seg":  # the segmenter learns the <Seg> states of the policy it will serve with
            data["policy_checkpoint"] = (results.get("grpo") or results.get("sft") or {}).get("checkpoint")
        tmp = out / "train" / f"{run}.yaml"
        atomic_write_text(tmp, yaml.safe_dump(data))
        say(f"  training {run} ({data['max_steps']} steps) ...")
        t0 = time.perf_counter()
        results[run] = run_job(run.split("-")[0], str(tmp))
        results[run]["seconds"] = round(time.perf_counter() - t0, 1)
        say(f"  training {run}: {_train_figure(results[run])} in {results[run]['seconds']} s -> "
            f"{results[run].get('checkpoint')}")
    return results


def run_evaluation(out: Path, checkpoints: list[str], seed: int = 0, targets: int = 8, name: str = "eval",
                   datasets: tuple[str, ...] = tuple(PHANTOMS), volumes: bool = True) -> dict:
    """``rau eval`` of ``checkpoints`` on the held-out subjects of the demo's phantom ``datasets`` (and the held-out
    3D volumes); the report lands in ``out/<name>/report.md``."""

    manifests = [str(out / "data" / ds / "manifest.jsonl") for ds in datasets]
    vols, structures = str(out / "data" / "ct-abdomen-3d" / "dataset.json"), "liver,spleen,right kidney,left kidney"
    cfg = EvalConfig(manifests=tuple(manifests), out=str(out / name), checkpoints=tuple(checkpoints),
                     volumes=(vols,) if volumes else (), volume_structures=tuple(structures.split(",")) if volumes
                     else (), max_targets=targets, seg_structures=3, seed=seed)
    command = " ".join(["rau eval", *[f"--manifest {m}" for m in manifests],
                        *[f"--checkpoint {c}" for c in checkpoints],
                        *([f"--volumes {vols}", f"--volume-structures '{structures}'"] if volumes else []),
                        f"--max-targets {targets}", f"--seg-structures 3 --seed {seed} --out {out / name}"])
    say(f"  evaluating {len(checkpoints)} checkpoints on {len(manifests)} datasets ...")
    return run_eval(cfg, command=f"{command}   (run by rau demo)")


# ------------------------------------------------------------------------------------------------- serving
def _free_port() -> int:

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method: str, url: str, *, json_body=None, fields: dict | None = None, files: dict | None = None,
          timeout: float = 300.0) -> dict:
    """One real HTTP request (urllib): ``{status, content_type, body (bytes), ms}``; a 4xx/5xx is returned too."""

    data, headers = None, {}
    if json_body is not None:
        data, headers = json.dumps(json_body).encode(), {"Content-Type": "application/json"}
    elif files is not None or fields is not None:  # multipart/form-data
        boundary = uuid.uuid4().hex
        parts = []
        for name, value in (fields or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
        for name, (filename, content, ctype) in (files or {}).items():
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                         f"Content-Type: {ctype}\r\n\r\n".encode() + content + b"\r\n")
        data = b"".join(parts) + f"--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, ctype, body = r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        status, ctype, body = e.code, e.headers.get("Content-Type", ""), e.read()
    return {"status": status, "content_type": ctype, "body": body, "ms": round(1000 * (time.perf_counter() - t0), 1)}


def _without_blobs(value):
    """A response for responses.json: every mask (COCO RLE or base64 PNG) replaced by its size and area."""

    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "mask" and isinstance(v, dict) and "counts" in v:
                out[k] = {"format": "rle", "size": v["size"], "area_px": int(codecs.rle_decode(v).sum())}
            elif k == "mask" and isinstance(v, str) and len(v) > 200:
                out[k] = {"format": "png", "base64_chars": len(v)}
            else:
                out[k] = _without_blobs(v)
        return out
    if isinstance(value, list):
        return [_without_blobs(v) for v in value]
    return value


def _point_inside(mask) -> tuple[int, int]:
    """(x, y) of the mask pixel nearest its centroid; the image centre for an empty mask."""

    ys, xs = np.nonzero(mask)
    if not len(xs):
        return mask.shape[1] // 2, mask.shape[0] // 2
    i = int(np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2))
    return int(xs[i]), int(ys[i])


def _demo_bank(out: Path) -> Path:
    """The demo's reference bank (``run_models`` builds it over the CT train split); built here if missing."""

    bank_dir = out / "bank"
    if not (bank_dir / "bank.json").is_file():
        manifest = out / "data" / "ct-abdomen" / "manifest.jsonl"
        ReferenceBank.build(manifest, get_profile("tiny").retrieval, split="train").save(bank_dir)
    return bank_dir.resolve()


def run_serving(out: Path, port: int | None = None, keep_running: bool = False) -> dict:
    """Ray Serve on the demo's cluster: the tiny app with the demo's reference bank and the shipped chain (GRPO
    policy + RAU segmenter, as serve_configs/local.yaml serves it); then real HTTP requests on a held-out CT slice
    (readiness, /v1/segment, /v1/label, a session with natural-language commands, the session's mask PNG).
    Responses (masks as size + area) land in
    ``out/serve/responses.json``, the masks over the image in ``out/serve/segment.png``. Serve is shut down at the
    end, or on any error; ``keep_running``: left up after the requests (the caller stops it)."""


    out = Path(out)
    folder = out / "serve"
    folder.mkdir(parents=True, exist_ok=True)
    bank_dir = _demo_bank(out)
    policy, segmenter = "shipped:grpo", "shipped:seg"
    manifest = read_manifest(out / "data" / "ct-abdomen" / "manifest.jsonl")
    row = max(manifest.select(split="test"), key=lambda r: int((manifest.load(r)[1] == 1).sum()))
    image, truth = manifest.load(row)
    png = manifest.image_path(row).read_bytes()
    port = port or _free_port()
    say(f"  serving on port {port}: bank {bank_dir}, policy {policy}, segmenter {segmenter} ...")
    t0 = time.perf_counter()
    up = False
    try:
        base = serve_app.start(profile="tiny", port=port, bank_dir=str(bank_dir), policy_checkpoint=policy,
                               segmenter_checkpoint=segmenter)
        startup_s = round(time.perf_counter() - t0, 1)
        log: list[dict] = []

        def call(name: str, method: str, path: str, **kw) -> dict:
            r = _http(method, base + path, **kw)
            entry = {"request": name, "method": method, "path": path, "status": r["status"], "ms": r["ms"]}
            if r["content_type"].startswith("application/json"):
                r["json"] = json.loads(r["body"])
                entry["response"] = _without_blobs(r["json"])
            else:
                entry["response"] = {"content_type": r["content_type"], "bytes": len(r["body"])}
            log.append(entry)
            return r

        ready = call("readiness", "GET", "/readyz")
        known = call("structures", "GET", "/v1/structures").get("json", {}).get("structures") or []
        if not known:
            raise RauError(f"serving: the Retriever knows no structures (bank {bank_dir})")
        structures = [s for s in ("liver", "spleen") if s in known] or known[:2]
        image_file = {"image": (Path(row.image).name, png, "image/png")}
        seg = call("segment", "POST", "/v1/segment", files=image_file,
                   fields={"structures": ",".join(structures), "modality": "CT"})
        label = call("label", "POST", "/v1/label", files=image_file, fields={"modality": "CT"})
        session = call("session", "POST", "/v1/sessions", files=image_file, fields={"modality": "CT"})
        if session["status"] != 201:
            raise RauError(f"serving: POST /v1/sessions answered {session['status']}: {session['body'][:300]!r}")
        sid = session["json"]["id"]
        target = structures[0]
        first = call(f"command: segment the {target}", "POST", f"/v1/sessions/{sid}/commands",
                     json_body={"text": f"segment the {target}"})
        seg_mask = (codecs.rle_decode(first["json"]["mask"]) if first["status"] == 200
                    else np.zeros(image.shape[:2], dtype=bool))
        point = _point_inside(seg_mask)  # inside the predicted mask; the image centre when it is empty
        for text in (f"add a point at {point[0]}, {point[1]}", "undo", "bone window", "show metrics"):
            last = call(f"command: {text}", "POST", f"/v1/sessions/{sid}/commands", json_body={"text": text})
        mask_png = call("session mask", "GET", f"/v1/sessions/{sid}/mask?format=png")
        session_mask = (codecs.decode_image(mask_png["body"]).array > 0 if mask_png["status"] == 200
                        else seg_mask)
        call("close session", "DELETE", f"/v1/sessions/{sid}")
        masks = {}
        if seg["status"] == 200:
            masks = {x["structure"]: (codecs.rle_decode(x["mask"]), x["score"]) for x in seg["json"]["results"]}
        value = next((int(k) for k, v in row.labels.items() if v == target), 1)
        _draw_serving(image, truth == value, f"held-out {row.id}: ground truth {target}", masks, session_mask,
                      point, folder / "segment.png")
        seconds = round(time.perf_counter() - t0, 1)
        atomic_write_text(folder / "responses.json", json.dumps(
            {"url": base, "image": row.id, "structures": structures, "startup_s": startup_s, "seconds": seconds,
             "responses": log}, indent=2) + "\n")
        summary = {"url": base, "startup_s": startup_s, "seconds": seconds, "image": row.id, "policy": policy,
                   "segmenter": segmenter,
                   "ready": ready["status"] == 200, "statuses": {e["request"]: e["status"] for e in log},
                   "latency_ms": {e["request"]: e["ms"] for e in log},
                   "segment": [{k: x.get(k) for k in ("structure", "label", "score", "reference")}
                               for x in (seg.get("json") or {}).get("results", [])],
                   "label": [x["label"] for x in (label.get("json") or {}).get("regions", [])],
                   "session": [{"text": e["request"].removeprefix("command: "), "status": e["status"],
                                "operations": (e["response"].get("operations") if e["status"] == 200
                                               else e["response"].get("error"))}
                               for e in log if e["request"].startswith("command: ")],
                   "metrics": next((x.get("metrics") for x in (last.get("json") or {}).get("results", [])
                                    if "metrics" in x), None),
                   "responses": str(folder / "responses.json"), "picture": str(folder / "segment.png"),
                   "kept_running": keep_running}
        _print_serving(summary, log)
        up = keep_running
    finally:  # always shut Serve down, unless asked to keep it up and everything went well
        if not up:
            serve_app.stop()
    return summary


def _print_serving(summary: dict, log: list[dict]) -> None:
    print(f"serving: up in {summary['startup_s']} s at {summary['url']} (web page: {summary['url']}/)", flush=True)
    for e in log:
        r, what = e.get("response") or {}, ""
        if e["request"] == "segment" and e["status"] == 200:
            what = "; ".join(f"{x['structure']}: label {x['label']!r}, score {x['score']:.2f}, reference "
                             f"{x['reference']['id']}" for x in r["results"])
        elif e["request"] == "label" and e["status"] == 200:
            what = "labels " + ", ".join(x["label"] or "-" for x in r["regions"]) + f" (boxes from {r['boxes_from']})"
        elif e["request"].startswith("command: ") and e["status"] == 200:
            what = "ops " + ", ".join(json.dumps(o, separators=(",", ":")) for o in r["operations"])
            if isinstance(r.get("mask"), dict) and "area_px" in r["mask"]:
                what += f" -> mask {r['mask']['area_px']} px"
        elif e["status"] >= 400:
            what = str(r.get("error", ""))[:120]
        print(f"  {e['method']:6} {e['request'][:34]:34} {e['status']}  {e['ms']:8.1f} ms  {what}", flush=True)


def _draw_serving(image, truth, truth_title: str, masks: dict, session_mask, point, path: Path) -> None:

    matplotlib.use("Agg")


    shown = apply_window(image, "abdomen")
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6))
    axes[0].imshow(shown, cmap="gray")
    axes[0].imshow(truth, alpha=0.4 * truth, cmap="autumn")
    axes[0].set_title(truth_title.replace(": ", "\n", 1), fontsize=9)
    axes[1].imshow(shown, cmap="gray")
    colours = [("autumn", "yellow"), ("winter", "green"), ("cool", "magenta"), ("summer", "light green")]
    for (mask, _), (cmap, _) in zip(masks.values(), colours):
        axes[1].imshow(mask, alpha=0.45 * mask.astype(float), cmap=cmap)
    axes[1].set_title("POST /v1/segment\n" + ", ".join(f"{n} {s:.2f} ({c})" for (n, (_, s)), (_, c)
                                                      in zip(masks.items(), colours)), fontsize=9)
    axes[2].imshow(shown, cmap="gray")
    m = np.asarray(session_mask, dtype=float)
    axes[2].imshow(m, alpha=0.45 * m, cmap="autumn")
    axes[2].plot([point[0]], [point[1]], "g+", markersize=12, mew=2)
    axes[2].set_title(f"session mask after the commands\n+: point {point[0]}, {point[1]} (added, then undone)",
                      fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle("Ray Serve: real HTTP requests on the demo's checkpoints", fontsize=9)
    atomic_write_figure(path, fig, dpi=90)


def _draw_prediction(image, truth, prediction, path: Path) -> None:


    matplotlib.use("Agg")


    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, mask, title in ((axes[0], truth, "ground truth: liver"),
                            (axes[1], prediction.mask, f"tiny RAU (untrained), score {prediction.score:.2f}")):
        ax.imshow(apply_window(image, "abdomen"), cmap="gray")
        ax.imshow(mask, alpha=0.4 * mask, cmap="autumn")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"reference: {prediction.reference['id']}", fontsize=9)
    atomic_write_figure(path, fig, dpi=90)


def run_demo(out: str | Path = "runs/demo", subjects: int = 24, seed: int = 0, size: int = 192,
             train_runs: dict[str, dict] = DEMO_RUNS, eval_targets: int = 6, serve_forever: bool = False,
             port: int | None = None) -> dict:
    """Every stage in order (see the module docstring); ``train_runs``: see ``run_training``; ``serve_forever``: the
    Serve app stays up after its requests until Ctrl-C; ``port``: its HTTP port (default: a free one). The terminal
    gets a line per stage and a summary table; everything else goes to ``out/demo.log``."""
    out = Path(out)
    log_path = out / "demo.log"
    say(f"rau demo -> {out}  (Ray's and the libraries' output: {log_path})")
    with output_to(log_path):
        return _run_stages(out, subjects, seed, size, train_runs, eval_targets, serve_forever, port)


def _run_stages(out: Path, subjects: int, seed: int, size: int, train_runs: dict[str, dict], eval_targets: int,
                serve_forever: bool, port: int | None) -> dict:
    t0 = time.perf_counter()
    ray = ray_session.connect()
    say(f"cluster  embedded Ray, {ray.cluster_resources().get('CPU', 0):.0f} CPUs")
    report: dict = {"datasets": {}}
    for name in PHANTOMS:
        report["datasets"][name] = make_dataset(MakeConfig(modality=name, n=subjects, out=str(out / "data" / name),
                                                           seed=seed, size=size))
    vol_dir = out / "data" / "ct-abdomen-3d"
    report["volumes"] = make_dataset(MakeConfig(modality="ct-abdomen", n=4, out=str(vol_dir), seed=seed, dims=3,
                                                size=128))
    report["imported"] = import_dataset(ImportConfig(dataset_json=str(vol_dir / "dataset.json"),
                                                     out=str(out / "data" / "ct-abdomen-3d-imported"), every=4))
    report["preview"] = str(preview([out / "data" / name for name in PHANTOMS], out / "preview.png", n=4, cols=4))
    stages = report["stage_seconds"] = {"data": round(time.perf_counter() - t0, 1)}
    say(_stage_line("data", stages["data"], report))
    for stage, run in (("models", lambda: run_models(out)), ("train", lambda: run_training(out, train_runs)),
                       ("eval", lambda: run_evaluation(out, [r["checkpoint"] for r in report["train"].values()
                                                              if r.get("checkpoint")], seed, eval_targets)),
                       ("eval_shipped", lambda: run_evaluation(out, list(SHIPPED), seed, eval_targets,
                                                               "eval-shipped", ("ct-abdomen",), False)),
                       ("serve", lambda: run_serving(out, port=port, keep_running=serve_forever))):
        t = time.perf_counter()
        report[stage] = run()
        stages[stage] = round(time.perf_counter() - t, 1)
        say(_stage_line(stage, stages[stage], report))
    try:
        report["seconds"] = round(time.perf_counter() - t0, 1)
        atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
        say(summary_table(report, out))
        if serve_forever:
            _wait_for_ctrl_c(report["serve"]["url"])
    finally:
        if serve_forever:

            stop()
    return report


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _train_figure(result: dict) -> str:
    """A training run's key figure: its last validation metric, else its last loss."""
    metrics = result.get("metrics") or {}
    for key in ("val_dice", "val_accuracy", "rewards/accuracy/mean", "val_loss", "loss"):
        if isinstance(metrics.get(key), (int, float)):
            return f"{key} {_fmt(float(metrics[key]))}"
    return "no metrics"


def _eval_figure(ev: dict, dataset: str = "ct-abdomen") -> str:
    dice = (ev.get("segmentation_dice") or {}).get(dataset) or {}
    labeling = (ev.get("labeling") or {}).get(dataset) or {}
    return (f"{dataset}: Dice VLM+SAM2 {_fmt(dice.get('VLM+SAM2'))}, labeling GRPO+OT "
            f"{_fmt(labeling.get('GRPO+OT'))} (mask boxes {_fmt(labeling.get('GRPO+OT (mask boxes)'))})")


def _answered(serve: dict) -> str:
    return f"{sum(1 for s in serve['statuses'].values() if s < 400)}/{len(serve['statuses'])} requests answered"


def _stage_line(stage: str, seconds: float, report: dict) -> str:
    """``<stage> <seconds> <key figure> -> <where its output went>``."""
    if stage == "data":
        figure = (f"{sum(d['samples'] for d in report['datasets'].values())} samples of {len(report['datasets'])} "
                  f"phantom datasets, {report['volumes']['samples']} CT volumes")
        where = report["preview"]
    elif stage == "models":
        m = report["models"]
        figure = (f"bank of {m['bank']['entries']}, recall modality@1 {_fmt(m['recall'].get('modality@1'))}, one "
                  f"predict in {_fmt(sum(m['predict']['timings_ms'].values()) / 1000, 1)} s")
        where = m["predict"]["picture"]
    elif stage == "train":
        figure = f"{len(report['train'])} runs: " + ", ".join(report["train"])
        where = str(Path(next(iter(report["train"].values()))["run"]).parent) if report["train"] else "-"
    elif stage in ("eval", "eval_shipped"):
        figure, where = _eval_figure(report[stage]), report[stage]["report"]
    else:
        figure, where = f"{_answered(report['serve'])} at {report['serve']['url']}", report["serve"]["responses"]
    return f"{stage:<13}{seconds:>7.1f} s  {figure}  -> {where}"


def summary_table(report: dict, out: Path) -> str:
    """The demo's end: a Markdown table of every stage (seconds, key figure, output) and where the rest is."""
    rows = [("data", report["stage_seconds"]["data"], f"{len(report['datasets'])} datasets", report["preview"])]
    rows.append(("models", report["stage_seconds"]["models"],
                 f"recall modality@1 {_fmt(report['models']['recall'].get('modality@1'))}",
                 report["models"]["predict"]["picture"]))
    for run, result in report["train"].items():
        rows.append((f"train {run}", result.get("seconds"), _train_figure(result), result.get("checkpoint") or "-"))
    rows.append(("eval (demo runs)", report["stage_seconds"]["eval"], _eval_figure(report["eval"]),
                 report["eval"]["report"]))
    rows.append(("eval (shipped)", report["stage_seconds"]["eval_shipped"], _eval_figure(report["eval_shipped"]),
                 report["eval_shipped"]["report"]))
    serve = report["serve"]
    rows.append(("serve", report["stage_seconds"]["serve"], _answered(serve), serve["picture"]))
    lines = ["", f"rau demo: done in {report['seconds']:.0f} s", "", "| stage | s | key figure | output |",
             "|---|---:|---|---|"]
    lines += [f"| {name} | {_fmt(sec, 1)} | {figure} | {where} |" for name, sec, figure, where in rows]
    lines += ["", f"report: {out / 'report.json'}   log: {out / 'demo.log'}"]
    if not serve.get("kept_running"):
        lines.append("Ray Serve was stopped; `rau demo --serve-forever` keeps the web page up.")
    return "\n".join(lines)


def _wait_for_ctrl_c(url: str) -> None:
    """Block until Ctrl-C. Python's own SIGINT handler is put back meanwhile: Ray Train leaves its handler (abort the
    training run) installed after a run, and that one swallows Ctrl-C once training is over."""

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler) if main else None
    say(f"\nThe RAU app is up: open {url}/ (web page; API docs at {url}/docs). Ctrl-C stops it.")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("\nstopping Ray Serve")
    finally:
        if main and previous is not None:
            signal.signal(signal.SIGINT, previous)
