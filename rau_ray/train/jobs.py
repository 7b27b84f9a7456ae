"""The training jobs behind ``rau train sft|grpo|seg`` and ``jobs/*.py``: load the YAML config, run, summarise.

After a run the checkpoint's metric history is drawn to ``curves.png`` beside the run (learning curves), and a
``summary.json`` there says where the checkpoint is and what the last metrics were.
Use: ``run_job("sft", "jobs/configs/sft-tiny.yaml", {"manifest": "data/ct/manifest.jsonl"})``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rau_ray.atomic import atomic_write_text
from rau_ray.config import load_config
from rau_ray.errors import ConfigError, RauError


def _registry() -> dict:
    from rau_ray.train import sft

    jobs = {"sft": (sft.SFTConfig, sft.run_sft)}
    try:
        from rau_ray.train import grpo

        jobs["grpo"] = (grpo.GRPOJobConfig, grpo.run_grpo)
    except ImportError:
        pass
    try:
        from rau_ray.train import seg

        jobs["seg"] = (seg.SegJobConfig, seg.run_seg)
    except ImportError:
        pass
    return jobs


def summarise(result, kind: str) -> dict:
    """Checkpoint path, last metrics and the learning-curve PNG of a finished run (local storage)."""
    from rau_ray.train.curves import curve_keys, plot_history
    from rau_ray.train.run import read_history

    if result.error is not None:
        raise RauError(f"{kind} run failed: {result.error}")
    summary = {"job": kind, "run": result.path, "metrics": result.metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    if result.checkpoint and Path(result.checkpoint.path).is_dir():
        history = read_history(result.checkpoint.path)
        if curve_keys(history):
            summary["curves"] = str(plot_history(history, Path(result.path) / "curves.png", title=kind.upper()))
        atomic_write_text(Path(result.path) / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def run_job(kind: str, config_path: str, overrides: dict | None = None) -> dict:
    jobs = _registry()
    if kind not in jobs:
        raise ConfigError(f"unknown training job {kind!r}; choose one of {', '.join(jobs)}")
    config_cls, run = jobs[kind]
    cfg = load_config(config_path, config_cls, {k: v for k, v in (overrides or {}).items() if v is not None})
    return summarise(run(cfg), kind)


def main(kind: str) -> None:
    """Entry point of ``jobs/<kind>.py``: ``python jobs/sft.py --config FILE [--manifest M] [--max-steps N]``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=f"Ray job: {kind} training (rau_ray.train.{kind}).")
    add_arguments(parser)
    args = parser.parse_args()
    try:
        print(json.dumps(run_job(kind, args.config, overrides(args)), indent=2, default=str))
    except RauError as e:
        sys.exit(f"error: {e}")


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="job config YAML (jobs/configs/)")
    parser.add_argument("--manifest", help="override the config's manifest")
    parser.add_argument("--name", help="override the run name (its folder under the storage path)")
    parser.add_argument("--max-steps", type=int, help="override max_steps")


def overrides(args) -> dict:
    return {"manifest": args.manifest, "name": args.name, "max_steps": args.max_steps}
