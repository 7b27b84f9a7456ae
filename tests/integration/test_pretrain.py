"""`rau pretrain sam2` on a real local Ray cluster (2 CPU workers): it trains, exports weights that the tiny profile
loads as its pretrained SAM2, resumes under the same name, and refuses bad configs with a clear error."""

from __future__ import annotations

import json

import pytest
import yaml

pytestmark = pytest.mark.integration

CONFIG = {"name": "sam2-test", "data": {"scenes": 40, "phantoms": ["ct-abdomen"], "phantom_subjects": 4, "size": 64},
          "sam2": {"image_size": 64}, "mix": [0.5, 0.0, 0.5], "batch_size": 2, "clip_batch": 1, "rounds": 1,
          "warmup_steps": 1, "log_every": 1, "eval_every": 2, "checkpoint_every": 2, "val_subjects": 1}


def write_config(tmp_path, **fields):
    cfg = {**CONFIG, "out": str(tmp_path / "weights" / "sam2"),
           "scale": {"num_workers": 2, "storage_path": str(tmp_path / "runs")}, **fields}
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_sam2_exports_loadable_weights_and_resumes(run_cli, tmp_path, monkeypatch):
    config = write_config(tmp_path)
    done = run_cli("pretrain", "sam2", "--config", config, "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["metrics"]["step"] == 2 and 0 <= summary["metrics"]["val_box_dice"] <= 1
    out = tmp_path / "weights" / "sam2"
    facts = json.loads((out / "training.json").read_text())
    assert facts["config"]["data"]["seed"] == 1001 and "objective" in facts and facts["wall_time_s"] > 0

    from dataclasses import replace

    from rau_ray.models.checkpoint import read_weights_and_state
    from rau_ray.models.sam2_builder import TINY, build_sam2_model

    monkeypatch.setenv("RAU_WEIGHTS", str(tmp_path / "weights"))
    model = build_sam2_model(replace(TINY, image_size=64, init="pretrained"))
    weights, _ = read_weights_and_state(summary["checkpoint"])
    assert all((model.state_dict()[k] == v).all() for k, v in weights.items())

    again = run_cli("pretrain", "sam2", "--config", config, "--max-steps", "4")  # same name: resumes at step 2
    assert again.returncode == 0, again.stderr[-3000:]
    _, state = read_weights_and_state(json.loads(again.stdout[again.stdout.index("{"):])["checkpoint"])
    assert state["step"] == 4


def test_pretrain_refuses_unknown_or_out_of_distribution_data(run_cli, tmp_path):
    bad = run_cli("pretrain", "sam2", "--config", write_config(tmp_path, data={**CONFIG["data"],
                                                                             "phantoms": ["xray-msk"]}))
    assert bad.returncode == 2 and "xray-msk cannot be pretrained on" in bad.stderr
    assert "Traceback" not in bad.stderr
    typo = run_cli("pretrain", "sam2", "--config", write_config(tmp_path, dat={"scenes": 3}))
    assert typo.returncode == 2 and "unknown field(s) dat" in typo.stderr
