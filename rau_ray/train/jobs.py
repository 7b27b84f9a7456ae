"""The training jobs behind ``rau train sft|grpo|seg`` and ``jobs/*.py``: load the YAML config, run, summarise.

After a run the checkpoint's metric history is drawn to ``curves.png`` beside the run (learning curves), and a
``summary.json`` there says where the checkpoint is and what the last metrics were: in the run folder, or at the
run's URI when ``scale.storage_path`` is one (``s3://``, ``gs://``).
Use: ``run_job("sft", "jobs/configs/sft-tiny.yaml", {"manifest": "data/ct/manifest.jsonl"})``.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import import_module

from rau_ray import storage
from rau_ray.config import load_config
from rau_ray.errors import ConfigError, RauError
from rau_ray.models.checkpoint import read_history
from rau_ray.train.curves import curve_keys, plot_history

# job -> (module, config class, run function). The modules are imported when a job is asked for, not with this one:
# the CLI builds its parser from here, and `rau --help` or `rau command parse` must not load deepspeed and trl.
JOBS = {"sft": ("rau_ray.train.sft", "SFTConfig", "run_sft"),
        "grpo": ("rau_ray.train.grpo", "GRPOJobConfig", "run_grpo"),
        "seg": ("rau_ray.train.seg", "SegJobConfig", "run_seg"),
        "pretrain-sam2": ("rau_ray.train.pretrain_sam2", "Sam2PretrainConfig", "run_pretrain_sam2"),
        "pretrain-dino": ("rau_ray.train.pretrain_dino", "DinoPretrainConfig", "run_pretrain_dino"),
        "pretrain-policy": ("rau_ray.train.pretrain_policy", "PolicyPretrainConfig", "run_pretrain_policy")}


def job_types(kind: str) -> tuple:
    """(config class, run function) of training job ``kind`` (a key of ``JOBS``); ConfigError naming the choices."""
    if kind not in JOBS:
        raise ConfigError(f"unknown training job {kind!r}; choose one of {', '.join(JOBS)}")
    module, config_cls, run = JOBS[kind]
    loaded = import_module(module)
    return getattr(loaded, config_cls), getattr(loaded, run)


def summarise(result, kind: str, storage_path: str | None = None) -> dict:
    """Checkpoint path, last metrics and the learning-curve PNG of a finished run, written beside it as
    ``summary.json`` and ``curves.png`` (a local run folder, or a URI: the history is read from the checkpoint's
    ``history.jsonl`` there). ``storage_path``: the run's ``scale.storage_path``, whose scheme and ``?query`` name
    the run's URIs (Ray reports paths inside the filesystem)."""

    if result.error is not None:
        raise RauError(f"{kind} run failed: {result.error}")
    run_dir = storage.uri_of(result.filesystem, result.path, storage_path)
    checkpoint = None
    if result.checkpoint:
        checkpoint = storage.uri_of(result.checkpoint.filesystem, result.checkpoint.path, storage_path)
    summary = {"job": kind, "run": run_dir, "metrics": result.metrics, "checkpoint": checkpoint}
    if checkpoint and storage.is_dir(checkpoint):
        history = read_history(checkpoint)
        if curve_keys(history):
            summary["curves"] = str(plot_history(history, storage.join(run_dir, "curves.png"), title=kind.upper()))
        storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(summary, indent=2, default=str))
    return summary


def run_job(kind: str, config_path: str, overrides: dict | None = None, dotted: list[str] | tuple = ()) -> dict:
    """Load ``config_path`` as the job's config (``overrides``: top-level fields; ``dotted``: ``KEY=VALUE`` texts
    into nested sections, e.g. ``scale.num_workers=2``), run it, summarise the run."""
    config_cls, run = job_types(kind)
    cfg = load_config(config_path, config_cls, {k: v for k, v in (overrides or {}).items() if v is not None},
                      dotted)
    scale = getattr(cfg, "scale", None)
    return summarise(run(cfg), kind, getattr(scale, "storage_path", None))


def main(kind: str) -> None:
    """Entry point of ``jobs/<kind>.py``: ``python jobs/sft.py --config FILE [--manifest M] [--max-steps N]
    [KEY=VALUE ...]``."""

    parser = argparse.ArgumentParser(description=f"Ray job: {kind} training (rau_ray.train.{kind.replace('-', '_')}).")
    add_arguments(parser)
    args = parser.parse_args()
    try:
        print(json.dumps(run_job(kind, args.config, overrides(args), args.set), indent=2, default=str))
    except RauError as e:
        sys.exit(f"error: {e}")


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="job config YAML (jobs/configs/)")
    parser.add_argument("--manifest", help="override the config's manifest")
    parser.add_argument("--name", help="override the run name (its folder under the storage path)")
    parser.add_argument("--max-steps", type=int, help="override max_steps")
    parser.add_argument("set", nargs="*", metavar="KEY=VALUE",
                        help="override any field of the config, dotted into sections: scale.num_workers=2 "
                             "model.policy.lora_rank=16 (checked against the config's fields and types)")


def overrides(args) -> dict:
    return {"manifest": args.manifest, "name": args.name, "max_steps": args.max_steps}
