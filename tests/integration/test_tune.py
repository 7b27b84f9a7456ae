"""Ray Tune sweeps of the segmenter on the session's 2-CPU Ray cluster: a tiny 2 x 2 grid (+ a random lr) with ASHA
in-process, stored in an S3 bucket (moto's server, tests/conftest.py) and resumed from it; then a sweep run by
``rau tune`` in a subprocess on the local disk, interrupted (SIGINT) after a trial finished and resumed with
``--resume``: finished trials are not rerun, the other finishes, and the best checkpoint loads.
Run: ``.venv/bin/pytest tests/integration/test_tune.py``."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rau_ray import storage
from rau_ray.errors import ConfigError
from rau_ray.tune import janitor
from rau_ray.tune.results import records_from_experiment
from rau_ray.tune.sweep import load_sweep_config, run_sweep

REPO = Path(__file__).resolve().parents[2]
PATHS = ["model.fusion.projector_dim", "model.policy.lora_rank", "lr"]


@pytest.fixture(scope="module")
def manifest(ct_manifest):
    return ct_manifest(n=5, size=64, slices=2)


def write_configs(tmp_path, manifest, search, **sweep) -> Path:
    """A tiny seg job (2 steps, validation every step on 2 items) and a sweep over it; returns the sweep YAML."""
    base = tmp_path / "seg.yaml"
    base.write_text(yaml.safe_dump({"manifest": manifest, "mode": "rau", "batch_size": 2, "lr": 0.01,
                                    "max_steps": 2, "log_every": 1, "eval_every": 1, "checkpoint_every": 2,
                                    "eval_items": 2, "train_policy_lora": True}))
    path = tmp_path / "sweep.yaml"
    sweep = {"max_concurrent_trials": 2, **sweep}
    path.write_text(yaml.safe_dump({"job": "seg", "base": str(base), "search": search,
                                    "resources": {"num_workers": 1, "cpus_per_worker": 0.5},
                                    "storage_path": str(tmp_path / "tune"), **sweep}, sort_keys=False))
    return path


def check_best_export(sweep_dir: str | Path, summary: dict) -> None:
    """best/ is the best trial's final checkpoint, and the one checkpoint loader rebuilds its models from it (a local
    folder or a bucket URI: read through rau_ray.storage)."""
    from rau_ray.models.checkpoint import load_policy_checkpoint, load_segmenter_checkpoint, read_checkpoint

    best = json.loads(storage.read_text(storage.join(sweep_dir, "best.json")))
    assert best == summary["best"] and best["metric"] == "val_dice" and 0 <= best["value"] <= 1
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(sweep_dir, "results.csv")))))
    runs = storage.join(sweep_dir, "runs")
    saved = {t for t in storage.list_dir(runs)  # ASHA may stop one before any checkpoint
             if any(n.startswith("checkpoint_") for n in storage.list_dir(storage.join(runs, t)))}
    ranked = [r for r in rows if r["val_dice"] and r["trial_id"] in saved]
    assert best["trial_id"] == max(ranked, key=lambda r: float(r["val_dice"]))["trial_id"]
    if "best_unsaved" in summary:  # a better trial stopped before its first checkpoint: named, not exported
        assert summary["best_unsaved"]["val_dice"] >= best["value"] and summary["best_unsaved"]["trial_id"] not in saved
    assert best["path"] == str(storage.join(sweep_dir, "best"))
    assert best["source"].startswith(f"{storage.join(runs, best['trial_id'])}/checkpoint_")
    ck = read_checkpoint(best["path"])
    assert ck.kind == "seg" and ck.step == best["checkpoint_step"] == 2
    assert ck.config["name"] == best["trial_id"]
    assert ck.config["lr"] == pytest.approx(best["config"].get("lr", 0.01))  # the trial's own lr (or the base's)
    segmenter = load_segmenter_checkpoint(ck)
    assert segmenter.projector[0].out_features == best["config"]["model.fusion.projector_dim"]
    policy = load_policy_checkpoint(ck)  # train_policy_lora: the adapter is in the checkpoint too
    assert policy.model.peft_config["default"].r == best["config"]["model.policy.lora_rank"]


def test_tiny_sweep_with_asha_in_a_bucket_writes_table_heatmap_and_loadable_best(ray_cluster, manifest, tmp_path,
                                                                                    s3_bucket):
    """The 2 x 2 grid (+ a random lr) with ASHA, stored in an S3 bucket (the session's moto server): Tune's state,
    the trials' runs, the table, heatmap and best/ all go to the bucket, nothing to the local disk; the best checkpoint
    loads from there; MLflow has a run per trial; --resume restores the finished sweep from the bucket and reruns
    nothing."""
    config = write_configs(tmp_path, manifest, {"model.fusion.projector_dim": [128, 256],
                                                "model.policy.lora_rank": [4, 8],
                                                "lr": {"loguniform": [1.0e-3, 3.0e-2]}},
                           name="grid", asha={"grace_period": 1, "reduction_factor": 2}, report_to=["mlflow"],
                           mlflow_tracking_uri=(tmp_path / "mlruns").as_uri(), storage_path=f"{s3_bucket}/tune")
    summary = run_sweep(load_sweep_config(config))
    exp = f"{s3_bucket}/tune/grid"
    # trials ASHA stopped left no worker placement group behind (their CPUs are free for the next test)
    assert janitor._groups_of_this_job() == []
    assert summary["sweep"] == exp and summary["trials"] == 4 and summary["finished"] + summary["stopped_early"] == 4
    assert summary["error"] == summary["unfinished"] == 0 and not summary["interrupted"]
    assert summary["scheduler"] == {"enabled": True, "time_attr": "step", "grace_period": 1, "reduction_factor": 2.0,
                                    "max_t": 2}
    records = records_from_experiment(exp)
    assert sorted((r["config"]["model.fusion.projector_dim"], r["config"]["model.policy.lora_rank"])
                  for r in records) == [(128, 4), (128, 8), (256, 4), (256, 8)]
    for rec in records:
        assert rec["status"] == "finished" and rec["history"]
        assert all(0 <= h["val_dice"] <= 1 for h in rec["history"])  # only validation rows reach Tune
        assert rec["history"][0]["step"] == 0 and 1e-3 <= rec["config"]["lr"] <= 3e-2
    assert summary["table_csv"] == f"{exp}/results.csv" and summary["heatmap"] == f"{exp}/heatmap.png"
    rows = list(csv.DictReader(io.StringIO(storage.read_text(summary["table_csv"]))))
    assert len(rows) == 4 and all(0 <= float(r["val_dice"]) <= 1 for r in rows)
    assert {r["status"] for r in rows} <= {"finished", "stopped early"}
    assert [r["trial_id"] for r in rows if r["status"] == "finished"] and \
        all(int(r["step"]) == 2 for r in rows if r["status"] == "finished")
    assert "| rank | trial | status | projector_dim | lora_rank | lr |" in storage.read_text(summary["table_md"])
    assert storage.read_bytes(summary["heatmap"])[:4] == b"\x89PNG"
    assert json.loads(storage.read_text(f"{exp}/summary.json")) == json.loads(json.dumps(summary))
    names = storage.list_dir(exp)
    assert {"best", "best.json", "results.md", "runs", "sweep.json"} <= set(names)
    assert any(n.startswith("experiment_state") for n in names)  # Tune's own state is in the bucket too
    trials = storage.list_dir(f"{exp}/runs")
    finished = [r["trial_id"] for r in rows if r["status"] == "finished"]  # ASHA's stopped ones have no end marker
    assert len(trials) == 4 and all(storage.is_file(f"{exp}/runs/{t}/trial.json") for t in finished)
    check_best_export(exp, summary)
    check_mlflow_runs(tmp_path / "mlruns", "grid", records)
    assert not (tmp_path / "tune").exists()  # nothing of the sweep on the local disk

    kept = {t: storage.read_bytes(f"{exp}/runs/{t}/trial.json") for t in finished}
    again = run_sweep(load_sweep_config(config), resume=True)  # Tuner.restore from the bucket: nothing left to run
    assert again["finished"] + again["stopped_early"] == 4 and again["best"]["trial_id"] == summary["best"]["trial_id"]
    assert {t: storage.read_bytes(f"{exp}/runs/{t}/trial.json") for t in finished} == kept


def check_mlflow_runs(store: Path, experiment: str, records: list[dict]) -> None:
    """report_to: [mlflow]: Tune's MLflowLoggerCallback made one run per trial, its values as params, its reports as
    metrics (the validation rows the trial reported to Tune)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store.as_uri())
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == len(records) and {r.info.status for r in runs} == {"FINISHED"}
    by_trial = {rec["trial_id"]: rec for rec in records}
    for mlrun in runs:
        rec = next(rec for trial_id, rec in by_trial.items() if trial_id in mlrun.info.run_name)
        params = mlrun.data.params
        assert int(params["train_loop_config/model.fusion.projector_dim"]) == \
            rec["config"]["model.fusion.projector_dim"]
        dice = [m.value for m in client.get_metric_history(mlrun.info.run_id, "val_dice")]
        assert dice == pytest.approx([h["val_dice"] for h in rec["history"]])


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_cluster, run_cli, manifest, tmp_path):
    # two trials, one at a time: the first finishes, the second is interrupted once it has started
    config = write_configs(tmp_path, manifest, {"model.policy.lora_rank": [4, 8], "model.fusion.projector_dim": [128]},
                           name="resumable", asha={"enabled": False}, max_concurrent_trials=1)
    sweep_dir = tmp_path / "tune" / "resumable"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    log = open(tmp_path / "first.log", "w")  # a file, not a pipe: Tune's progress must never block on a full pipe
    proc = subprocess.Popen([sys.executable, "-m", "rau_ray.cli", "tune", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    deadline = time.time() + 300
    # stop once the first trial has finished (its trial.json) and the second has started
    while time.time() < deadline and proc.poll() is None:
        done = list((sweep_dir / "runs").glob("*/trial.json"))
        if done and len(list(sweep_dir.glob("trial_*"))) == 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    log.close()
    assert proc.returncode == 130, (tmp_path / "first.log").read_text()[-3000:]
    assert json.loads((sweep_dir / "summary.json").read_text())["interrupted"] is True

    before = {r["trial_id"]: r for r in records_from_experiment(sweep_dir)}
    finished = {t for t, r in before.items() if r["status"] == "finished"}
    assert len(before) == 2 and len(finished) == 1
    kept = {t: ((sweep_dir / f"trial_{t}" / "result.json").read_bytes(),
                sorted(p.name for p in (sweep_dir / "runs" / t).iterdir()),
                (sweep_dir / "runs" / t / "trial.json").stat().st_mtime_ns) for t in finished}

    resumed = run_cli("tune", "--config", config, "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    after = {r["trial_id"]: r for r in records_from_experiment(sweep_dir)}
    assert after.keys() == before.keys() and all(r["status"] == "finished" for r in after.values())
    for t in finished:  # not rerun: the same results, checkpoints and end marker
        assert ((sweep_dir / f"trial_{t}" / "result.json").read_bytes(),
                sorted(p.name for p in (sweep_dir / "runs" / t).iterdir()),
                (sweep_dir / "runs" / t / "trial.json").stat().st_mtime_ns) == kept[t]
        assert [(h["step"], h["val_dice"]) for h in after[t]["history"]] == \
            [(h["step"], h["val_dice"]) for h in before[t]["history"]]
    for t in before.keys() - finished:  # the interrupted ones ran to their last step
        assert after[t]["history"][-1]["step"] == 2
    assert summary["trials"] == 2 and summary["finished"] == 2 and not summary["interrupted"]
    assert len(list(csv.DictReader(open(sweep_dir / "results.csv")))) == 2
    assert (sweep_dir / "heatmap.png").is_file()
    check_best_export(sweep_dir, summary)

    with pytest.raises(ConfigError, match="already holds a sweep: continue it with --resume"):
        run_sweep(load_sweep_config(config))  # a second fresh start of the same sweep is refused


def test_janitor_removes_only_groups_whose_creator_actor_died(ray_cluster):
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group, placement_group_table, remove_placement_group

    @ray.remote(num_cpus=0)
    class Creator:  # stands for a Ray Train controller, which makes its workers' placement group
        def make(self) -> str:
            pg = placement_group([{"CPU": 0.25}])
            ray.get(pg.ready())
            return pg.id.hex()

    alive, doomed = Creator.remote(), Creator.remote()
    kept, orphan = ray.get(alive.make.remote()), ray.get(doomed.make.remote())
    own = placement_group([{"CPU": 0.25}])  # made by the driver itself, as Tune's trial groups are
    ray.get(own.ready())
    ray.kill(doomed)  # as when Tune ends a stopped trial and its controller dies with it
    deadline = time.time() + 30
    while placement_group_table()[orphan]["state"] != "REMOVED" and time.time() < deadline:
        janitor.remove_orphans()
        time.sleep(0.2)
    table = placement_group_table()
    assert table[orphan]["state"] == "REMOVED"
    assert table[kept]["state"] == "CREATED" and table[own.id.hex()]["state"] == "CREATED"
    for pg in (PlacementGroup(ray.PlacementGroupID(bytes.fromhex(kept))), own):  # give the 0.5 CPU back
        remove_placement_group(pg)
    ray.kill(alive)
