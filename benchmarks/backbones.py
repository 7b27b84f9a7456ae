"""Benchmark: held-out quality of the shipped tiny backbones (issue 16's table), beside their targets.

Every figure is measured on phantom subjects / scenes made with seed 7777 (``BENCHMARK_SEED``), which no training
run uses, through the code paths that serve requests (SAM2ImagePredictor, the video predictor, the Embedder + faiss
bank, the policy's generate + the project's parser); means with 95 % bootstrap intervals over subjects.
Run: ``.venv/bin/python benchmarks/backbones.py [--only sam2,dino,policy] [--cbam CHECKPOINT] [--out FILE]``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

import argparse
import json
import platform
import time
from pathlib import Path

TARGETS = {  # (backbone, key): (target, comparison, what)
    ("sam2", "ct_box"): (0.90, ">=", "Dice, true box, ct-abdomen structures"),
    ("sam2", "vertebrae_box"): (0.90, ">=", "Dice, true box, vertebrae"),
    ("sam2", "ct_3_clicks"): (0.85, ">=", "Dice after 1 positive + 2 corrective clicks"),
    ("sam2", "memory_ref"): (0.70, ">=", "Dice, memory propagation reference -> target (SAM2-Memory-Ref)"),
    ("sam2", "ultrasound_box"): (None, "", "Dice, true box, ultrasound (never trained on)"),
    ("sam2", "xray-msk_box"): (None, "", "Dice, true box, xray-msk (never trained on)"),
    ("cbam", "vertebrae_box"): (0.93, ">=", "CBAM-LoRA from these weights: Dice, true box, vertebrae"),
    ("dino", "pose@1"): (0.60, ">=", "nearest-pose recall@1, ct-abdomen"),
    ("dino", "pose@5"): (0.90, ">=", "nearest-pose recall@5, ct-abdomen"),
    ("policy", "ground_iou"): (0.70, ">=", "generic scenes: grounding box IoU"),
    ("policy", "compare_acc"): (0.90, ">=", "generic scenes: two-image comparisons correct"),
    ("policy", "parseable"): (1.00, ">=", "generic scenes: parseable JSON"),
}


def measure(name: str) -> dict:
    if name == "sam2":
        from rau_ray.train.pretrain_sam2 import quality
        return quality()
    if name == "dino":
        from rau_ray.train.pretrain_dino import quality
        q = quality()
        return {**q, **{f"pose@{k}": {"mean": q[f"recall@{k}"], "ci95": q[f"recall@{k}_ci95"], "n": q["queries"]}
                        for k in (1, 5)}}
    if name == "policy":
        from rau_ray.models.pretrained import weights_root
        from rau_ray.train.pretrain_policy import quality
        q = quality(str(weights_root() / "qwen2_5_vl"), n=100)
        return {**q, "ground_iou": q["grounding_iou"], "compare_acc": q["comparison_accuracy"]}
    raise SystemExit(f"unknown backbone {name!r}")


def measure_cbam(checkpoint: str) -> dict:
    """SpinalSAM-R1's CBAM-LoRA SAM2 (a `rau train seg` cbam-lora checkpoint fine-tuned from the shipped SAM2-tiny)
    on the same held-out items as plain SAM2-tiny: single-image figures only."""
    from rau_ray.train.pretrain_sam2 import quality
    from rau_ray.train.seg import seg_trainer_from_checkpoint

    sam = seg_trainer_from_checkpoint(checkpoint).model.sam.eval()
    return quality(model=sam)


def table(results: dict) -> str:
    rows = ["| backbone | measure (held-out, seed 7777) | mean | 95 % CI | n | target | met |",
            "|---|---|---|---|---|---|---|"]
    for (backbone, key), (target, cmp, what) in TARGETS.items():
        r = results.get(backbone, {}).get(key)
        if not isinstance(r, dict):
            continue
        met = "" if target is None else ("yes" if r["mean"] >= target else "**no**")
        ci = r.get("ci95") or ["", ""]
        rows.append(f"| {backbone} | {what} | {r['mean']:.3f} | {ci[0]}-{ci[1]} | {r.get('n', '')} | "
                    f"{'' if target is None else f'{cmp} {target:.2f}'} | {met} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="sam2,dino,policy", help="comma-separated: sam2, dino, policy")
    p.add_argument("--cbam", help="also measure this CBAM-LoRA checkpoint (rau train seg, mode cbam-lora)")
    p.add_argument("--out", default="runs/bench/backbones.json")
    a = p.parse_args()
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.machine(),
               "cpus": os.cpu_count()}
    for name in a.only.split(","):
        t0 = time.perf_counter()
        results[name] = measure(name.strip())
        results[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    if a.cbam:
        results["cbam"] = measure_cbam(a.cbam)
        print(f"cbam: {json.dumps(results['cbam'])}", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
