"""Paper width on CPU: the paper profile's models at full width, depth and input size cut, through the real code paths.

The models are ``rau_ray.models.paper_cut``'s (Qwen2.5-VL-7B's config with 2 decoder layers and 2 vision blocks and
the 7B's 152064-row vocabulary, DINOv2-base with 2 layers, SAM2.1 hiera-large's widths with 5 blocks at 256 px;
random bf16 weights, written once to a folder, ~3.2 GB) loaded by path through the paper profile. Parts, each timed
with the peak resident memory of this process and of the Ray processes it started (summed, and the largest one):
- ``predict``: ``RAUModel.build`` + one ``predict`` (retrieval skipped: the reference is given) on a 64 px phantom.
- ``sft``: ``jobs/configs/sft-paper.yaml`` through ``run_sft`` (Ray Train, transformers' Trainer over DeepSpeed
  ZeRO-2 on 2 CPU workers, LoRA r16): 1 step, batch 1 a worker, evaluation on 1 held-out item a worker.
- ``grpo``: ``jobs/configs/grpo-paper.yaml`` through ``run_grpo`` from that SFT checkpoint (trl's GRPOTrainer,
  ZeRO-2 on 2 workers, generation by the policy: vLLM needs a GPU): 1 step, 2 rollouts of 4 tokens.
- ``seg``: ``jobs/configs/seg-paper.yaml`` through ``run_seg`` on the GRPO checkpoint (the policy's own answers,
  RAU segmenter, DDP): 1 step, batch 1 a worker, no validation.
- ``serve``: ``serve_configs/gpu.yaml``'s graph (its deployments and options; GPUs dropped, CPUs / 10, 1 torch
  thread a replica, ``device: cpu``) on the GRPO + seg checkpoints, a paper-cut DINOv2 bank and a keys file of one
  key: start, one ``POST /v1/segment`` with that key.
Every job config is the paper one with these fields replaced: manifest, name, model (the paper-cut section), scale
(2 CPU workers), batch sizes, steps, lengths, checkpoints (``overrides``). Used by
``tests/integration/test_paper_width.py``.
Run: ``.venv/bin/python benchmarks/paper_width.py [--out DIR] [--models DIR] [--parts predict,sft,grpo,seg,serve]``
(prints one JSON object, also written to OUT/report.json: per part its wall time, peak RSS and what it produced;
``models.wall_s`` is 0 when the models folder was there already).
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import math
import os
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests
import torch
from peft.tuners.lora import LoraLayer

from rau_ray.atomic import atomic_write_text
from rau_ray.config import load_config
from rau_ray.data.formats import encode_png, hu_to_png16
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.manifest import read_manifest
from rau_ray.models.checkpoint import read_weights_and_state
from rau_ray.models.paper_cut import model_section, write_paper_cut
from rau_ray.models.rau import RAUModel, Reference
from rau_ray.models.retrieval import ReferenceBank

REPO = Path(__file__).resolve().parents[1]
PARTS = ("predict", "sft", "grpo", "seg", "serve")
GiB = 2**30


class PeakRSS:
    """Samples, every ``period`` s while open, the resident memory of this process and of every process it started
    (a local Ray cluster: raylet, workers, Serve replicas): the peak of their sum and the largest single one. The
    sum counts shared pages (a model file mapped by two workers) once per process."""

    def __init__(self, period: float = 0.2):
        self.period, self.total, self.largest = period, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        procs = [me]
        try:
            procs += me.children(recursive=True)
        except psutil.Error:
            pass
        sizes = []
        for p in procs:
            try:
                sizes.append(p.memory_info().rss)
            except psutil.Error:
                continue
        self.total, self.largest = max(self.total, sum(sizes)), max(self.largest, max(sizes, default=0))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()

    def report(self) -> dict:
        return {"peak_rss_gib": round(self.total / GiB, 2), "peak_process_rss_gib": round(self.largest / GiB, 2)}


def timed(fn, *args, **kwargs) -> dict:
    """``fn(...)``'s dict plus its wall time and peak RSS (``PeakRSS``)."""
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        out = fn(*args, **kwargs)
    return {"wall_s": round(time.perf_counter() - t0, 1), **rss.report(), **out}


def make_manifest(out: Path) -> str:
    """A small CT phantom set: 5 subjects x 2 slices, 64 px (train / val / test by subject)."""
    make_dataset(MakeConfig("ct-abdomen", n=5, out=str(out), size=64, slices_per_subject=2), backend="local",
                 progress=False)
    return str(out / "manifest.jsonl")


def lora_modules(model) -> list[dict]:
    """Every LoRA-wrapped Linear of a peft model: its name, in / out features and rank."""
    return [{"name": name, "in": m.in_features, "out": m.out_features, "r": m.r["default"]}
            for name, m in model.named_modules() if isinstance(m, LoraLayer) and "default" in m.r]


def _pair(manifest_path: str):
    """(manifest, reference row, target row): the train slice and the held-out slice showing the most liver."""
    manifest = read_manifest(manifest_path)

    def liver(row) -> int:
        value = next((int(k) for k, v in row.label_names.items() if v == "liver"), None)
        return 0 if value is None else int((manifest.load(row)[1] == value).sum())

    ref = max((r for r in manifest.rows if r.split == "train"), key=liver)
    tgt = max((r for r in manifest.rows if r.split != "train"), key=liver)
    return manifest, ref, tgt


# -- the parts -------------------------------------------------------------------------------------------------------
def part_predict(cfg, manifest_path: str) -> dict:
    """``RAUModel.build`` from the paper-cut config and one ``predict``; the model is dropped afterwards."""
    model = RAUModel.build(cfg)
    manifest, ref_row, tgt_row = _pair(manifest_path)
    ref_image, ref_label = manifest.load(ref_row)
    target, _ = manifest.load(tgt_row)
    p = model.predict(target, "liver", reference=Reference(ref_image, ref_label, ref_row.label_names),
                      modality=tgt_row.modality)
    emb = model.policy.model.get_input_embeddings().weight
    out = {"target_shape": list(target.shape), "mask_shape": list(p.mask.shape), "score": float(p.score),
           "box": p.box, "format_error": p.format_error, "timings_s": {k: round(v, 2) for k, v in p.timings.items()},
           "embedding_rows": int(emb.shape[0]), "hidden_size": int(emb.shape[1]), "dtype": str(emb.dtype),
           "seg_token_id": int(model.policy.seg_token_id), "lora": lora_modules(model.policy.model),
           "parameters": model.policy.parameter_counts(),
           "sam2_image_size": int(model.segmenter.sam.image_size)}
    del model, p
    gc.collect()
    return out


def job_config(job: str, cls, **fields):
    """``jobs/configs/<job>-paper.yaml`` as ``cls`` with ``fields`` replaced."""
    return load_config(REPO / "jobs" / "configs" / f"{job}-paper.yaml", cls, fields)


def _scale(storage: str, workers: int) -> dict:
    return {"num_workers": workers, "use_gpu": False, "cpus_per_worker": 1, "storage_path": storage,
            "max_failures": 0}


def _finite(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def _adapter_shapes(checkpoint: str) -> dict:
    weights, state = read_weights_and_state(checkpoint)
    return {"step": state["step"], "tensors": len(weights),
            "shapes": sorted({str(tuple(v.shape)) for v in weights.values()})}


def part_sft(folder: Path, manifest: str, storage: str, workers: int = 2) -> dict:
    from rau_ray.train.sft import SFTConfig, run_sft  # noqa: PLC0415 - the train extra: loaded by the parts using it

    cfg = job_config("sft", SFTConfig, manifest=manifest, name="sft-paper-cut", model=model_section(folder),
                     scale=_scale(storage, workers), batch_size=1, grad_accumulation=1, epochs=1, max_steps=1,
                     log_every=1, eval_every=0, eval_items=workers, max_new_tokens=4, checkpoint_every=1)
    result = run_sft(cfg)
    return {"zero_stage": cfg.zero_stage, "gradient_checkpointing": cfg.gradient_checkpointing,
            "metrics": _finite(result.metrics), "checkpoint": result.checkpoint.path,
            "adapter": _adapter_shapes(result.checkpoint.path)}


def part_grpo(sft_checkpoint: str, manifest: str, storage: str, workers: int = 2) -> dict:
    from rau_ray.train.grpo import GRPOJobConfig, run_grpo  # noqa: PLC0415 - the train extra

    # one group of 2 rollouts a step: 1 completion a worker on 2 workers, both on 1
    cfg = job_config("grpo", GRPOJobConfig, manifest=manifest, name="grpo-paper-cut", sft_checkpoint=sft_checkpoint,
                     scale=_scale(storage, workers), use_vllm=False, num_generations=2,
                     batch_size=1 if workers % 2 == 0 else 2,
                     max_completion_length=4, max_steps=1, log_every=1, checkpoint_every=1)
    result = run_grpo(cfg)
    return {"zero_stage": cfg.zero_stage, "deepspeed": cfg.deepspeed, "metrics": _finite(result.metrics),
            "checkpoint": result.checkpoint.path, "adapter": _adapter_shapes(result.checkpoint.path)}


def part_seg(policy_checkpoint: str, folder: Path, manifest: str, storage: str, workers: int = 2) -> dict:
    from rau_ray.train.seg import run_seg  # noqa: PLC0415 - the train extra

    result = run_seg(seg_config(policy_checkpoint, folder, manifest, storage, workers))
    weights, state = read_weights_and_state(result.checkpoint.path)
    return {"metrics": _finite(result.metrics), "checkpoint": result.checkpoint.path, "step": state["step"],
            "trained_tensors": len(weights),
            "projector_in": [list(v.shape) for k, v in weights.items() if k.startswith("projector") and v.dim() == 2]}


def seg_config(policy_checkpoint: str, folder: Path, manifest: str, storage: str, workers: int = 2):
    from rau_ray.train.seg import SegJobConfig  # noqa: PLC0415 - the train extra

    return job_config("seg", SegJobConfig, manifest=manifest, name="seg-paper-cut",
                      policy_checkpoint=policy_checkpoint, model=model_section(folder),
                      scale=_scale(storage, workers), batch_size=1, max_steps=1, log_every=1, val_split="",
                      checkpoint_every=1)


def part_seg_step(policy_checkpoint: str, folder: Path, manifest: str) -> dict:
    """One segmenter step in this process: the seg job's trainer (``build_seg_trainer``, what each Ray Train worker
    builds) on one item, without Ray Train around it."""
    from rau_ray.train.seg import build_seg_trainer  # noqa: PLC0415 - the train extra
    from rau_ray.train.seg_base import job_items  # noqa: PLC0415
    from rau_ray.train.seg_rau import with_policy_checkpoint  # noqa: PLC0415

    cfg = with_policy_checkpoint(seg_config(policy_checkpoint, folder, manifest, str(folder), workers=1))
    trainer = build_seg_trainer(cfg)
    items = job_items(cfg, read_manifest(manifest), cfg.train_split, cfg.seed)[:cfg.batch_size]
    metrics = trainer.train_step(items, np.random.default_rng(cfg.seed))
    weights = trainer.weights()
    out = {"metrics": metrics, "items": len(items), "answers": cfg.answers, "trained_tensors": len(weights),
           "projector_in": [list(v.shape) for k, v in weights.items() if k.startswith("projector") and v.dim() == 2]}
    del trainer
    gc.collect()
    return out


def gpu_yaml_graph(bank_dir: str, policy_checkpoint: str, segmenter_checkpoint: str,
                   api_keys_file: str) -> tuple[dict, dict]:
    """(args, deployment options) of serve_configs/gpu.yaml for this CPU machine: its checkpoints, bank and keys file
    replaced, ``device: cpu``, 1 torch thread a replica, no GPUs asked for and a tenth of its CPUs."""
    from rau_ray.serve.app import local_options  # noqa: PLC0415 - the serve extra

    args, options = local_options(REPO / "serve_configs" / "gpu.yaml")
    args.update(bank_dir=bank_dir, policy_checkpoint=policy_checkpoint, segmenter_checkpoint=segmenter_checkpoint,
                api_keys_file=api_keys_file, device="cpu", threads=1)
    for o in options.values():
        rao = {k: v for k, v in (o.get("ray_actor_options") or {}).items() if k != "num_gpus"}
        rao["num_cpus"] = round(rao.get("num_cpus", 1) / 10, 3)
        o["ray_actor_options"] = rao
    return args, options


def part_serve(cfg, manifest: str, policy_checkpoint: str, segmenter_checkpoint: str, work: Path,
               port: int = 0) -> dict:
    from rau_ray.serve import codecs  # noqa: PLC0415 - the serve extra
    from rau_ray.serve.app import start, stop  # noqa: PLC0415
    from rau_ray.serve.keys import add_key  # noqa: PLC0415

    bank_dir = str(work / "bank")
    t0 = time.perf_counter()
    ReferenceBank.build(manifest, cfg.retrieval, split="train", backend="local", progress=False).save(bank_dir)
    bank_s = time.perf_counter() - t0
    key = add_key(work / "keys.json", "paper-width")  # gpu.yaml's access control: a keys file, a key
    args, options = gpu_yaml_graph(bank_dir, policy_checkpoint, segmenter_checkpoint, str(work / "keys.json"))
    port = port or _free_port()
    t0 = time.perf_counter()
    base = start(port=port, options=options, timeout_s=600, **args)
    start_s = time.perf_counter() - t0
    try:
        m, _, tgt_row = _pair(manifest)
        image, _ = m.load(tgt_row)
        t0 = time.perf_counter()
        png = encode_png(hu_to_png16(image) if tgt_row.modality == "CT" else image)
        r = requests.post(base + "/v1/segment", json={"image_b64": base64.b64encode(png).decode(),
                                                      "structures": ["liver"], "modality": tgt_row.modality},
                          headers={"Authorization": f"Bearer {key}"}, timeout=600)
        request_s = time.perf_counter() - t0
        body = r.json()
    finally:
        stop()
    result = body.get("results", [{}])[0] if r.status_code == 200 else {}
    mask = codecs.rle_decode(result["mask"]) if "mask" in result else None
    return {"bank_s": round(bank_s, 1), "start_s": round(start_s, 1), "request_s": round(request_s, 2),
            "status": r.status_code, "error": None if r.status_code == 200 else body,
            "mask_shape": list(mask.shape) if mask is not None else None, "target_shape": list(image.shape),
            "timings_ms": result.get("timings_ms"), "reference": result.get("reference"),
            "options": {k: v["ray_actor_options"] for k, v in options.items()}}


def _free_port() -> int:
    import socket  # noqa: PLC0415 - only here

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(parts: tuple[str, ...], work: Path, models: Path | None = None, manifest: str | None = None,
        workers: int = 2) -> dict:
    """The parts in order (each later part needs the earlier ones' checkpoints); returns the report."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    models = models or work / "models"
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores "
                    f"{round(psutil.virtual_memory().total / GiB)} GiB", "torch_threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        cfg = write_paper_cut(models)
    report["models"] = {"wall_s": round(time.perf_counter() - t0, 1), **rss.report(), "folder": str(models),
                        "size_gib": round(sum(f.stat().st_size for f in models.rglob("*") if f.is_file()) / GiB, 2)}
    manifest = manifest or make_manifest(work / "data" / "ct")
    storage = str(work / "runs")
    if "predict" in parts:
        report["predict"] = timed(part_predict, cfg, manifest)
    if {"sft", "grpo", "seg", "serve"} & set(parts):
        from rau_ray import ray_session  # noqa: PLC0415 - a cluster only for the parts that need one

        ray_session.connect(num_cpus=max(2, workers))
        report["sft"] = timed(part_sft, models, manifest, storage, workers)
    if {"grpo", "seg", "serve"} & set(parts):
        report["grpo"] = timed(part_grpo, report["sft"]["checkpoint"], manifest, storage, workers)
    if {"seg", "serve"} & set(parts):
        report["seg"] = timed(part_seg, report["grpo"]["checkpoint"], models, manifest, storage, workers)
    if "serve" in parts:
        report["serve"] = timed(part_serve, cfg, manifest, report["grpo"]["checkpoint"], report["seg"]["checkpoint"],
                                work)
    report["total_s"] = round(sum(v["wall_s"] for v in report.values() if isinstance(v, dict) and "wall_s" in v), 1)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="working folder (models, data, runs); default: a temp folder")
    p.add_argument("--models", help="the paper-cut models folder (written there once; default: OUT/models)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated; a later part runs the earlier ones")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers of the training parts")
    a = p.parse_args()
    work = Path(a.out or tempfile.mkdtemp(prefix="rau-paper-width-"))
    report = run(tuple(x for x in a.parts.split(",") if x), work, Path(a.models) if a.models else None,
                 workers=a.workers)
    text = json.dumps(report, indent=2, default=str)
    atomic_write_text(work / "report.json", text)  # the Ray workers' log lines share stdout with the report
    print(text)
    print(f"report: {work / 'report.json'}")


if __name__ == "__main__":
    main()
