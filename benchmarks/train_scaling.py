"""Training throughput and memory on Ray Train: SFT samples/s and GRPO rollout tokens/s with 1 vs 2 workers (1 thread
each), and per-worker memory with DeepSpeed ZeRO-2 vs ZeRO-3 on a larger policy.

Runs are side by side in one process on one embedded Ray cluster; figures are medians over the logged intervals
after the first (start-up). Targets (issue 5): 2 workers >= 1.6x the samples/s of 1; ZeRO-3 memory clearly below ZeRO-2.
Run: ``python benchmarks/train_scaling.py --out runs/bench/train_scaling.json`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from rau_ray.atomic import atomic_write_text
from rau_ray.config import from_dict
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.models.checkpoint import read_history
from rau_ray.train.grpo import GRPOJobConfig, run_grpo
from rau_ray.train.sft import SFTConfig, run_sft

TINY_LEARNING = {"profile": "tiny", "policy": {"lora_rank": 32, "lora_alpha": 64, "lora_targets": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
# big enough that the frozen base weights dominate a worker's memory: ~150M parameters (600 MB in fp32)
LARGER = {"profile": "tiny", "policy": {"hidden_size": 1024, "num_layers": 10, "num_heads": 8, "num_kv_heads": 8,
                                        "intermediate_size": 4096, "init_std": 0.02},
          "fusion": {"llm_hidden_size": 1024}}


def sft(manifest: str, storage: str, name: str, workers: int, model: dict, steps: int, zero: int = 2,
        batch: int = 4, accumulation: int = 1, checkpointing: bool = False) -> list[dict]:
    cfg = from_dict(SFTConfig, {
        "manifest": manifest, "name": name, "model": model, "tasks": ["label"], "zero_stage": zero,
        "batch_size": batch, "grad_accumulation": accumulation, "gradient_checkpointing": checkpointing, "lr": 0.003,
        "epochs": 100, "max_steps": steps, "log_every": 5,
        "checkpoint_every": steps, "eval_items": 2, "max_new_tokens": 4,
        "scale": {"num_workers": workers, "cpus_per_worker": 1, "storage_path": storage}}, "bench")
    result = run_sft(cfg)
    return [row for row in read_history(result.checkpoint.path) if "samples_per_s" in row]


def grpo(manifest: str, storage: str, name: str, workers: int, steps: int) -> list[dict]:
    """GRPO from a fresh adapter: the untrained policy's rollouts run to the length limit, a fixed rollout load."""
    cfg = from_dict(GRPOJobConfig, {
        "manifest": manifest, "name": name, "model": TINY_LEARNING, "tasks": ["label"], "num_generations": 4,
        "batch_size": 4, "temperature": 1.0, "max_completion_length": 64, "max_steps": steps, "log_every": 1,
        "checkpoint_every": steps, "tensorboard": False,
        "scale": {"num_workers": workers, "cpus_per_worker": 1, "storage_path": storage}}, "bench")
    result = run_grpo(cfg)
    rows = [r for r in read_history(result.checkpoint.path) if "step_time" in r]
    for r in rows:  # completions per step = batch_size per worker x workers
        r["rollout_tokens_per_s"] = r["completions/mean_length"] * 4 * workers / r["step_time"]
    return rows


def median_after_first(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/train_scaling.json")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4, help="SFT samples per worker and forward pass")
    parser.add_argument("--accumulation", type=int, default=4, help="SFT forward passes per optimizer step")
    parser.add_argument("--parts", nargs="+", choices=("sft", "grpo", "memory"), default=["sft", "grpo", "memory"])
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="rau_bench_"))
    make_dataset(MakeConfig(modality="ct-abdomen", n=30, out=str(tmp / "ct"), size=128), backend="local")
    manifest = str(tmp / "ct" / "manifest.jsonl")
    report: dict = {"date": time.strftime("%Y-%m-%d"), "steps": args.steps, "batch": args.batch,
                    "accumulation": args.accumulation}

    if "sft" in args.parts:
        rows = {n: sft(manifest, str(tmp / "runs"), f"w{n}", n, TINY_LEARNING, args.steps, batch=args.batch,
                       accumulation=args.accumulation) for n in (1, 2)}
        for n, r in rows.items():
            report[f"sft_{n}w_samples_per_s"] = median_after_first(r, "samples_per_s")
            report[f"sft_{n}w_tokens_per_s"] = median_after_first(r, "tokens_per_s")
        report["sft_2w_over_1w"] = report["sft_2w_samples_per_s"] / report["sft_1w_samples_per_s"]

    if "grpo" in args.parts:
        rows = {n: grpo(manifest, str(tmp / "runs"), f"g{n}", n, 8) for n in (1, 2)}
        for n, r in rows.items():
            report[f"grpo_{n}w_rollout_tokens_per_s"] = median_after_first(r, "rollout_tokens_per_s")
        report["grpo_2w_over_1w"] = report["grpo_2w_rollout_tokens_per_s"] / report["grpo_1w_rollout_tokens_per_s"]

    if "memory" in args.parts:
        # gradient checkpointing, as the 7B trains: activations would otherwise dominate what ZeRO changes
        for zero in (2, 3):
            r = sft(manifest, str(tmp / "runs"), f"zero{zero}", 2, LARGER, 10, zero=zero, batch=1,
                    checkpointing=True)
            report[f"larger_zero{zero}_rss_mb"] = max(row["rss_mb"] for row in r)
            report[f"larger_zero{zero}_peak_rss_mb"] = max(row["peak_rss_mb"] for row in r)
        report["zero3_over_zero2_rss"] = report["larger_zero3_rss_mb"] / report["larger_zero2_rss_mb"]
    atomic_write_text(args.out, json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
