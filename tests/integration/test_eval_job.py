"""`rau eval` on the session's Ray cluster: a tiny CT phantom set (in distribution), an ultrasound set (out of
distribution, test only) and a 3D volume set, with one checkpoint of every kind written the way training writes
them (the trainers' own weight dicts, their job configs); the report's files, numbers in range and consistent."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.manifest import read_manifest
from rau_ray.data.tasks import label_boxes
from rau_ray.eval.tables import match_available
from rau_ray.models.checkpoint import HISTORY, STATE, WEIGHTS
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import ModelConfig
from rau_ray.train.grpo import GRPOJobConfig, adapter_state
from rau_ray.train.seg import build_seg_trainer
from rau_ray.train.seg_base import SegJobConfig
from rau_ray.train.sft import SFTConfig


def _write(folder: Path, weights: dict, config, steps: int = 3) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS))
    (folder / STATE).write_text(json.dumps({"step": steps, "config": asdict(config)}))
    (folder / HISTORY).write_text("".join(json.dumps({"step": s, "loss": 2.0 / (s + 1), "val_dice": 0.1 * s}) + "\n"
                                          for s in range(steps + 1)))
    return folder


@pytest.fixture(scope="module")
def data(ct_manifest, tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    make_dataset(MakeConfig("ultrasound", n=3, out=str(root / "us"), size=64), backend="local", progress=False)
    make_dataset(MakeConfig("ct-abdomen", n=3, out=str(root / "vol"), size=64, dims=3), backend="local",
                 progress=False)
    return {"ct": ct_manifest(6, 64, 2), "us": str(root / "us" / "manifest.jsonl"),
            "volumes": str(root / "vol" / "dataset.json")}


@pytest.fixture(scope="module")
def checkpoints(data, tmp_path_factory):
    """One run folder per kind, as `rau train` leaves them (run/checkpoint_*/...)."""
    root = tmp_path_factory.mktemp("runs")
    sft = SFTConfig(manifest=data["ct"], tasks=("label",), max_new_tokens=48)
    torch.manual_seed(0)
    policy = load_policy(sft.model.policy)
    _write(root / "sft" / "checkpoint_000", get_peft_model_state_dict(policy.model), sft)
    grpo = GRPOJobConfig(manifest=data["ct"], model=ModelConfig(), max_completion_length=48)
    _write(root / "grpo" / "checkpoint_000", adapter_state(policy.model), grpo)
    for mode, name in (("rau", "seg"), ("cbam-lora", "cbam"), ("memory-ref", "memref")):
        cfg = SegJobConfig(manifest=data["ct"], mode=mode)
        _write(root / name / "checkpoint_000", build_seg_trainer(cfg).weights(), cfg)
    return {k: str(root / k) for k in ("sft", "grpo", "seg", "cbam", "memref")}


def test_eval_job_report(run_cli, data, checkpoints, tmp_path):
    out = tmp_path / "report"
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"manifests": [data["ct"], data["us"]], "volumes": [data["volumes"]],
                                      "volume_structures": ["liver"], "max_targets": 2, "seg_structures": 2,
                                      "workers": 2, "seed": 3}))
    args = ["eval", "--config", config, "--out", out] + [a for k in ("sft", "grpo", "seg", "cbam", "memref")
                                                         for a in ("--checkpoint", checkpoints[k])]
    r = run_cli(*args, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout)
    for name in ("report.md", "tables.md", "tables.json", "predictions.jsonl"):
        assert (out / name).stat().st_size > 200
    for name, path in summary["pictures"].items():
        assert Path(path).stat().st_size > 5_000, name

    t = json.loads((out / "tables.json").read_text())
    hdr = t["header"]
    assert hdr["seed"] == 3 and hdr["command"].startswith("rau eval --config")
    assert set(hdr["checkpoints"]) == {"sft", "grpo", "seg", "cbam", "memref"}
    assert hdr["checkpoints"]["sft"]["path"].endswith("sft/checkpoint_000")
    assert {n: d["distribution"] for n, d in hdr["datasets"].items()} == {"ct": "in", "us": "out"}

    # labeling: every structure of each sampled held-out target, every row in [0, 1]
    targets = {}
    for line in (out / "predictions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "label":
            targets.setdefault(rec["dataset"], []).append(rec["target"])
    for ds, manifest in (("ct", data["ct"]), ("us", data["us"])):
        m = read_manifest(manifest)
        rows = {r.id: r for r in m.rows}
        assert len(targets[ds]) == 2 and all(rows[t].split == "test" for t in targets[ds])  # held out
        regions = sum(len(label_boxes(m.load(rows[t])[1], rows[t].label_names)) for t in targets[ds])
        lab = t["labeling"][ds]
        assert lab["regions"] == regions and lab["targets"] == 2
        for row in ("SFT", "GRPO", "GRPO+OT") + (("GRPO+FGW",) if match_available("fgw") else ()):
            assert 0 <= lab["rows"][row]["accuracy"] <= 1, row
            assert lab["rows"][row]["correct"] == round(lab["rows"][row]["accuracy"] * regions)

    # segmentation: 2 targets x 2 structures, three methods, metrics in range, consistent with each other
    for ds in ("ct", "us"):
        seg = t["segmentation"][ds]
        assert set(seg) == {"SAM2-Memory-Ref", "SAM2-Memory-Ref-SFT", "VLM+SAM2", "CBAM-LoRA SAM2 (box)"}
        for method, row in seg.items():
            assert row["n"] == 4 and row["failed"] == 0, method
            for key in ("dice", "giou", "ciou", "box_iou"):
                assert 0 <= row[key] <= 1, (method, key)
            assert row["hd95"] is None or row["hd95"] >= 0
            assert row["hd95_inf"] == row["empty"]  # truth is never empty: undefined HD95 = empty prediction
    assert t["attention"]["ct"]["n"] == 4 and 0 <= t["attention"]["ct"]["entropy"] <= 1

    assert t["retrieval"]["ct"]["modality@1"] == 1.0 and t["retrieval"]["us"]["queries"] == 3
    (vol,) = t["volumes"].values()
    assert set(vol) == {"liver", "all"} and vol["all"]["n"] == 1 and 0 <= vol["liver"]["dice"] <= 1
    lat = t["latency"]
    for key in ("label answer (SFT)", "label answer (GRPO)", "SAM2-Memory-Ref", "VLM+SAM2",
                "CBAM-LoRA SAM2 (box)", "VLM+SAM2: generate"):
        assert lat[key]["median_ms"] > 0 and lat[key]["p95_ms"] >= lat[key]["median_ms"], key
    assert lat["VLM+SAM2"]["n"] == 8

    md = (out / "report.md").read_text()
    assert checkpoints["seg"] in md and "| seed | 3 |" in md and "![gallery](pictures/gallery.png)" in md
    assert np.isclose(summary["labeling"]["ct"]["SFT"], t["labeling"]["ct"]["rows"]["SFT"]["accuracy"])


def test_eval_bad_input(run_cli, data, tmp_path):
    r = run_cli("eval", "--manifest", data["ct"], "--checkpoint", tmp_path, "--out", tmp_path / "o", timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "not a training checkpoint" in r.stderr
    assert "Traceback" not in r.stderr
