"""SFT on a real local Ray cluster with 2 CPU workers and DeepSpeed: it learns, checkpoints, resumes, survives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from rau_ray.config import from_dict
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.errors import ConfigError
from rau_ray.models.checkpoint import read_history, read_weights_and_state
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import get_profile
from rau_ray.train.sft import SFTConfig, load_trainable, run_sft

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_data") / "ct"
    make_dataset(MakeConfig(modality="ct-abdomen", n=6, out=str(out), size=96, slices_per_subject=1),
                 backend="local")
    return str(out / "manifest.jsonl")


def sft_config(manifest, tmp_path, **fields) -> SFTConfig:
    base = dict(manifest=manifest, tasks=["label"], batch_size=2, lr=0.003, epochs=8, log_every=1,
                checkpoint_every=4, eval_items=2, max_new_tokens=12,
                scale={"num_workers": 2, "storage_path": str(tmp_path / "runs")})
    return from_dict(SFTConfig, {**base, **fields}, "test")


def test_zero2_and_zero3_learn_a_fixed_batch_identically_report_to_trackers_and_checkpoints_load(ray_cluster, manifest,
                                                                                               tmp_path):
    # 4 training targets -> one batch of 2 per worker, the same batch every epoch
    losses = {}
    for stage in (2, 3):
        # the ZeRO-2 run also reports to MLflow (a local file store) and TensorBoard (check_tracking)
        tracking = {"report_to": ["mlflow", "tensorboard"], "mlflow_tracking_uri": (tmp_path / "mlruns").as_uri(),
                    "mlflow_experiment": "rau-test"} if stage == 2 else {}
        cfg = sft_config(manifest, tmp_path, name=f"zero{stage}", zero_stage=stage, **tracking)
        result = run_sft(cfg)
        assert result.error is None
        if tracking:
            check_tracking(cfg, result, tmp_path)
        history = read_history(result.checkpoint.path)
        losses[stage] = [row["loss"] for row in history if "loss" in row]
        assert [row["step"] for row in history if "loss" in row] == list(range(1, 9))
        falls = [b < a for a, b in zip(losses[stage], losses[stage][1:])]
        assert sum(falls) >= 6 and losses[stage][-1] < 0.95 * losses[stage][0], losses[stage]  # on the fixed batch
        assert 0 <= result.metrics["val_format"] <= 1 and "val_label_accuracy" in result.metrics
        assert result.metrics["samples_per_s"] > 0 and result.metrics["rss_mb"] > 100
    # ZeRO-3 shards what ZeRO-2 replicates; the same run up to reduction order
    assert losses[3] == pytest.approx(losses[2], rel=1e-2)

    weights, state = read_weights_and_state(result.checkpoint.path)
    assert state["step"] == 8 and state["config"]["zero_stage"] == 3
    assert any("lora_A" in k for k in weights) and any("trainable_tokens" in k for k in weights)
    fresh = load_policy(get_profile("tiny").policy)
    before = {k: v.clone() for k, v in fresh.model.state_dict().items() if "lora_B" in k}
    load_trainable(fresh.model, weights)
    after = {k: v for k, v in fresh.model.state_dict().items() if "lora_B" in k}
    assert any(not torch.equal(before[k], after[k]) for k in before)  # lora_B starts at 0; trained it is not


def test_bad_config_is_a_clear_error(manifest, tmp_path):
    with pytest.raises(ConfigError, match="zero_stage"):
        sft_config(manifest, tmp_path, zero_stage=1)
    with pytest.raises(ConfigError, match="hidden size"):  # caught on the driver, before any worker starts
        run_sft(sft_config(manifest, tmp_path, model={"profile": "tiny", "policy": {"hidden_size": 96}}))
    with pytest.raises(ConfigError, match="no held-out pairs"):
        run_sft(sft_config(manifest, tmp_path, val_split="nonexistent"))


def _train_workers() -> list[int]:
    """PIDs of live Ray Train workers of this session's cluster: its raylet is a child of this process (ray.init
    started it), the workers are the raylet's children, titled ``ray::RayTrainWorker...``."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)
            if any("RayTrainWorker" in part for part in p.cmdline())]


def test_killed_worker_resumes_from_checkpoint_and_step_continues(ray_cluster, manifest, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "manifest": manifest, "name": "ft", "tasks": ["label"], "batch_size": 2, "epochs": 100, "max_steps": 16,
        "log_every": 1, "checkpoint_every": 4, "eval_items": 2, "max_new_tokens": 8,
        "scale": {"num_workers": 2, "storage_path": str(tmp_path / "runs"), "max_failures": 2}}))
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    proc = subprocess.Popen([sys.executable, "-m", "rau_ray.cli", "train", "sft", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    run_dir = tmp_path / "runs" / "ft"
    deadline = time.time() + 240
    snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train writes it once a checkpoint is registered
    while time.time() < deadline and not (snapshot.is_file() and "checkpoint_dir_name" in snapshot.read_text()):
        time.sleep(0.2)
    pids = _train_workers()
    assert len(pids) == 2, pids
    assert pids, "no Ray Train worker alive after the first checkpoint"
    os.kill(pids[-1], signal.SIGKILL)  # one worker dies mid-run
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    history = read_history(summary["checkpoint"])
    steps = [row["step"] for row in history]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # one row per step, in order, to the end
    resumed = {row["resumed_from"] for row in history}
    assert max(resumed) >= 4 and max(resumed) % 4 == 0  # restarted from a checkpoint, not from step 0
    assert min(s for s in steps if s > 0 and history[steps.index(s)]["resumed_from"] > 0) > max(resumed)
    assert Path(summary["curves"]).is_file()
    _, state = read_weights_and_state(summary["checkpoint"])
    assert state["step"] == 16


def check_tracking(cfg: SFTConfig, result, tmp_path) -> None:
    """report_to [mlflow, tensorboard]: rank 0's rows, the run's params and its final checkpoint reached a local
    MLflow file store, and the same rows TensorBoard's event files."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = [row for row in read_history(result.checkpoint.path) if "loss" in row]
    client = MlflowClient(cfg.mlflow_tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow_experiment).experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.name
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in losses] == [(row["step"], pytest.approx(row["loss"])) for row in history]
    assert "val_accuracy" in run.data.metrics and "samples_per_s" in run.data.metrics
    params = run.data.params
    assert params["lr"] == "0.003" and params["scale.num_workers"] == "2" and params["tasks"] == '["label"]'
    assert params["model.policy.lora_rank"] == str(cfg.model.policy.lora_rank)
    assert params["zero_stage"] == str(cfg.zero_stage)
    assert params["final_checkpoint"] == result.checkpoint.path

    events = EventAccumulator(str(tmp_path / "runs" / cfg.name / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (row["step"], pytest.approx(row["loss"])) for row in history]
