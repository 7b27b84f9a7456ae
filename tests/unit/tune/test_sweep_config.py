"""Sweep configs without running anything: loading, dotted-path overrides, search spaces, clear errors, Tune setup."""

from pathlib import Path

import pytest
import yaml

from rau_ray.errors import ConfigError
from rau_ray.train import run
from rau_ray.tune.sweep import (
    SweepConfig,
    check_fits,
    get_path,
    load_sweep_config,
    param_space,
    prepare,
    search_values,
    set_path,
    tune_config,
)

REPO = Path(__file__).resolve().parents[3]
CONFIGS = REPO / "jobs" / "configs"


def sweep(tmp_path, **fields) -> SweepConfig:
    data = {"job": "seg", "base": str(CONFIGS / "seg-tiny.yaml"),
            "search": {"model.fusion.projector_dim": [128, 256], "model.policy.lora_rank": [4, 8],
                       "lr": {"loguniform": [1.0e-4, 3.0e-3]}},
            "storage_path": str(tmp_path / "tune"), **fields}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_sweep_config(path)


def test_dotted_paths_set_nested_copies():
    base = {"lr": 0.1, "model": {"profile": "tiny"}}
    out = set_path(base, "model.fusion.projector_dim", 512)
    assert out == {"lr": 0.1, "model": {"profile": "tiny", "fusion": {"projector_dim": 512}}}
    assert base == {"lr": 0.1, "model": {"profile": "tiny"}}  # untouched
    assert get_path(out, "model.fusion.projector_dim") == 512 and get_path(out, "model.nope", 7) == 7
    assert set_path({"scale": 3}, "scale.num_workers", 1) == {"scale": {"num_workers": 1}}


@pytest.mark.parametrize("config", ["tune-seg-tiny.yaml", "tune-sft-tiny.yaml", "tune-seg-paper.yaml"])
def test_shipped_sweep_configs_prepare(config):
    cfg = load_sweep_config(CONFIGS / config)
    prep = prepare(cfg)
    assert prep.base["scale"]["num_workers"] == cfg.resources.num_workers
    assert "name" not in cfg.search and prep.max_steps > 0


def test_prepare_applies_overrides_resources_and_absolute_manifest(tmp_path):
    cfg = sweep(tmp_path, overrides={"train_policy_lora": True, "max_steps": 3, "answers": "canonical",
                                     "policy_checkpoint": None},
                resources={"num_workers": 1, "cpus_per_worker": 0.25})
    prep = prepare(cfg)
    assert prep.base["train_policy_lora"] is True and prep.max_steps == 3
    assert prep.base["scale"] == {"num_workers": 1, "cpus_per_worker": 0.25, "storage_path": "runs/train",
                                  "use_gpu": False, "gpus_per_worker": 1}
    assert Path(prep.base["manifest"]).is_absolute()  # trials run in their own folders
    assert cfg.metric_name == "val_dice" and prep.runs_dir == tmp_path / "tune" / "sweep" / "runs"
    remote = prepare(sweep(tmp_path, storage_path="s3://bucket/tune?region=eu-west-1"))  # no I/O before run_sweep
    assert remote.experiment_dir == "s3://bucket/tune/sweep?region=eu-west-1"
    assert remote.runs_dir == "s3://bucket/tune/sweep/runs?region=eu-west-1"
    assert sweep(tmp_path, job="sft", base=str(CONFIGS / "sft-tiny.yaml"),
                 search={"model.policy.lora_rank": [4]}).metric_name == "val_accuracy"


@pytest.mark.parametrize("fields, message", [
    ({"search": {}}, "search is empty"),
    ({"search": {"model.fusion.dimm": [128]}}, r"'model.fusion.dimm' is not a setting of the seg job config "
                                               r"\(model.fusion has: .*projector_dim"),
    ({"search": {"lrr": [0.1]}}, r"'lrr' is not a setting .*the top level has: .*lr"),
    ({"search": {"model.fusion": [1]}}, r"'model.fusion' is a section; name one of its settings"),
    ({"search": {"lr.x": [1]}}, r"'lr.x' is not a setting .*lr has: no fields"),
    ({"search": {"name": ["a", "b"]}}, "'name' is set by the sweep"),
    ({"overrides": {"scale.storage_path": "x"}}, "'scale.storage_path' is set by the sweep"),
    ({"overrides": {"max_stepz": 3}}, r"overrides: 'max_stepz' is not a setting"),
    ({"search": {"model.fusion.projector_dim": [128, 130]}}, r"search model.fusion.projector_dim=130.*divisible"),
    ({"search": {"lr": 0.1}}, r"search.lr: expected a list of values .*fixed values go in overrides"),
    ({"search": {"lr": {"loguniform": [0, 1]}}}, r"search.lr.loguniform: low must be > 0"),
    ({"search": {"lr": {"loguniform": ["1e-4", 1]}}}, r"expected \[low, high\] with low < high"),
    ({"search": {"lr": {"uniform": [2, 1]}}}, r"expected \[low, high\] with low < high"),
    ({"search": {"lr": []}}, "search.lr: no values"),
    ({"search": {"lr": {"normal": [0, 1]}}}, "search.lr: expected a list of values"),
    ({"search": {"lr": {"uniform": [-1.0, 1.0]}}}, r"search lr=-1.0: .*lr and grad_clip must be > 0"),
    ({"job": "nope"}, "job must be one of grpo, seg, sft"),
    ({"mode": "best"}, "mode must be max or min"),
    ({"heatmap": ["lr"]}, "heatmap must name two search paths"),
    ({"storage_path": "sftp://host/tune"}, "storage_path: unknown storage scheme .sftp."),
    ({"base": "missing.yaml"}, "base: job config not found"),
    ({"asha": {"reduction_factor": 1}}, "reduction_factor > 1"),
    ({"resources": {"cpus_per_worker": 0}}, "cpus_per_worker and gpus_per_worker > 0"),
])
def test_config_errors_are_clear(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        prepare(sweep(tmp_path, **fields))


def test_search_space_and_tune_setup(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.sample import Float, Integer

    assert search_values("a", [1, 2]) == ("grid", [1, 2])
    assert search_values("a", {"randint": [1, 5]}) == ("randint", [1, 5])
    cfg = sweep(tmp_path, search={"model.fusion.projector_dim": [128, 256], "lr": {"loguniform": [1.0e-4, 0.01]},
                                  "batch_size": {"randint": [1, 4]}, "seed": {"choice": [0, 1]}},
                max_concurrent_trials=3, overrides={"max_steps": 40},
                asha={"grace_period": 5, "reduction_factor": 3})
    space = param_space(cfg)["train_loop_config"]
    assert space["model.fusion.projector_dim"] == {"grid_search": [128, 256]}
    assert isinstance(space["lr"], Float) and isinstance(space["batch_size"], Integer)
    tc = tune_config(prepare(cfg))
    assert tc.metric == "val_dice" and tc.mode == "max" and tc.num_samples == 1
    assert tc.search_alg.max_concurrent == 3
    asha = tc.scheduler
    assert isinstance(asha, ASHAScheduler) and asha._time_attr == "step" and asha._max_t == 40  # max_t = max_steps
    assert asha._reduction_factor == 3 and sorted(r[0] for r in asha._brackets[0]._rungs) == [5, 15]
    assert isinstance(tune_config(prepare(sweep(tmp_path, asha={"enabled": False}))).scheduler, FIFOScheduler)


def test_concurrent_trials_must_fit_the_cluster(tmp_path):
    cfg = sweep(tmp_path, max_concurrent_trials=3, resources={"num_workers": 2, "cpus_per_worker": 0.5})
    check_fits(cfg, {"CPU": 3.0})
    with pytest.raises(ConfigError, match="need 3 CPUs, the cluster has 2"):
        check_fits(cfg, {"CPU": 2.0})
    gpu = sweep(tmp_path, resources={"use_gpu": True, "gpus_per_worker": 1})
    with pytest.raises(ConfigError, match="need 2 GPUs, the cluster has 0"):
        check_fits(gpu, {"CPU": 8.0})


def test_run_callbacks_reach_the_trainer_only_inside_the_block():
    marker = object()
    assert run._RUN_CALLBACKS.get() == ()
    with run.run_callbacks(marker):
        assert run._RUN_CALLBACKS.get() == (marker,)
    assert run._RUN_CALLBACKS.get() == ()


@pytest.mark.parametrize(("fields", "message"), [
    ({"report_to": ["tensorboard"]}, r"report_to: unknown reporter 'tensorboard'; choose from mlflow"),
    ({"report_to": ["mlflow"], "mlflow_tracking_uri": "gopher://x"}, "unknown MLflow tracking URI scheme 'gopher'"),
])
def test_sweep_tracking_settings_are_checked_at_load(tmp_path, fields, message):
    with pytest.raises(ConfigError, match=message):
        sweep(tmp_path, **fields)


def test_a_sweep_asking_for_mlflow_gets_tunes_mlflow_callback(tmp_path, monkeypatch):
    import socket

    from ray.air.integrations.mlflow import MLflowLoggerCallback

    from rau_ray.tune.sweep import tune_callbacks

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tune_callbacks(sweep(tmp_path), str(tmp_path / "tune")) == []
    [callback] = tune_callbacks(sweep(tmp_path, report_to=["mlflow"], name="s1"), str(tmp_path / "tune"))
    assert isinstance(callback, MLflowLoggerCallback)
    assert callback.tracking_uri == (tmp_path / "tune" / "mlruns").as_uri() and callback.experiment_name == "s1"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing answers there
    down = sweep(tmp_path, report_to=["mlflow"], mlflow_tracking_uri=f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="mlflow_tracking_uri: the MLflow tracking server .* does not answer"):
        tune_callbacks(down, str(tmp_path / "tune"))
