"""report_to (rau_ray.train.tracking): values checked at config load, the driver's checks before a run starts (the
client, a tracking server that does not answer or refuses), and the controller's callback writing to a real MLflow
file store and TensorBoard event files, read back with their own readers. No Ray: the callback is called as Ray
Train's controller calls it (the integration test tests/integration/test_train_sft.py runs it inside a real SFT).

Run: pytest tests/unit/train/test_tracking.py
"""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

import pytest

from rau_ray.config import load_config
from rau_ray.errors import ConfigError
from rau_ray.train import tracking
from rau_ray.train.jobs import job_types

CONFIGS = Path(__file__).resolve().parents[3] / "jobs" / "configs"


def sft(*dotted: str, storage: Path | None = None):
    cls, _ = job_types("sft")
    extra = [f"scale.storage_path={storage}"] if storage else []
    return load_config(CONFIGS / "sft-tiny.yaml", cls, dotted=[*dotted, *extra])


@pytest.mark.parametrize("kind", ["sft", "grpo", "seg"])
def test_report_to_defaults_to_none_and_takes_the_two_reporters(kind):
    cls, _ = job_types(kind)
    path = CONFIGS / f"{kind}-tiny.yaml"
    assert load_config(path, cls).report_to == ()
    cfg = load_config(path, cls, dotted=["report_to=[mlflow, tensorboard]", "mlflow_tracking_uri=http://mlflow:5000"])
    assert cfg.report_to == ("mlflow", "tensorboard") and cfg.mlflow_tracking_uri == "http://mlflow:5000"


@pytest.mark.parametrize(("dotted", "message"), [
    (["report_to=[wandb]"], r"report_to: unknown reporter 'wandb'; choose from mlflow, tensorboard"),
    (["report_to=[mlflow, mlflow]"], "names a reporter twice"),
    (["report_to=mlflow"], r"report_to: expected a list"),
    (["report_to=[mlflow]", "mlflow_tracking_uri=ftp://host/x"], r"mlflow_tracking_uri: unknown MLflow tracking URI "
                                                                 r"scheme 'ftp'"),
    (["report_to=[mlflow]", "mlflow_experiment= "], "mlflow_experiment must name"),
])
def test_a_bad_tracking_setting_is_refused_at_config_load_naming_it(dotted, message):
    with pytest.raises(ConfigError, match=message):
        sft(*dotted)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_does_not_answer_is_refused_before_the_run_naming_the_setting(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = sft("report_to=[mlflow]", f"mlflow_tracking_uri={uri}", storage=tmp_path)
    with pytest.raises(ConfigError, match=rf"mlflow_tracking_uri: the MLflow tracking server {uri} does not answer"):
        tracking.start(cfg, str(tmp_path))
    assert not (tmp_path / cfg.name).exists() or not any((tmp_path / cfg.name).iterdir())


class _Refusing(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(401)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_tracking_server_that_refuses_the_credentials_says_which_variables_to_set(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = sft("report_to=[mlflow]", f"mlflow_tracking_uri={uri}", storage=tmp_path)
        with pytest.raises(ConfigError, match=r"refuses the request \(HTTP 401\); set MLFLOW_TRACKING_TOKEN"):
            tracking.start(cfg, str(tmp_path))
    finally:
        server.shutdown()
        server.server_close()


def test_the_callback_logs_rank_zeros_rows_params_and_the_final_checkpoint(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = sft("report_to=[mlflow, tensorboard]", "model.policy.lora_rank=4", storage=tmp_path)
    callback = tracking.start(cfg, str(tmp_path))
    assert callback.tracking.mlflow_uri == (tmp_path / "mlruns").as_uri()  # the default: beside the runs
    for step, loss in ((1, 2.0), (2, 1.5)):  # rank 0's row first; rank 1's differs and must not be logged
        callback.after_report(None, [{"step": step, "loss": loss, "note": "text", "nan": float("nan")},
                                     {"step": step, "loss": 99.0}], None)
    out = tracking.finish(callback, "FINISHED", "/runs/sft/checkpoint_000001")

    client = MlflowClient(out["mlflow_tracking_uri"])
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == cfg.name
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    assert set(run.data.metrics) == {"loss"}  # text and NaN left out
    params = run.data.params
    assert params["model.policy.lora_rank"] == "4" and params["scale.storage_path"] == str(tmp_path)
    assert params["tasks"].startswith("[") and params["final_checkpoint"] == "/runs/sft/checkpoint_000001"
    assert run.data.tags["rau.run_dir"] == str(tmp_path / cfg.name)

    events = EventAccumulator(out["tensorboard"])
    events.Reload()
    assert out["tensorboard"] == str(tmp_path / cfg.name / "tensorboard")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.0), (2, 1.5)]


def test_no_report_to_no_callback(tmp_path):
    assert tracking.start(sft(storage=tmp_path), str(tmp_path)) is None
    assert tracking.finish(None, "FINISHED") == {}


def test_a_bucket_run_needs_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow.set_tracking_uri (an earlier sweep) sets it
    with pytest.raises(ConfigError, match="mlflow_tracking_uri: report_to mlflow needs a tracking URI"):
        tracking.tracking_uri("", "s3://bucket/runs")


def test_params_are_the_config_flattened_with_long_values_cut():
    params = tracking.flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None, "f": "x" * 7000, "g": {}})
    assert params["a.b"] == "1" and params["a.c.d"] == "[1, 2]" and params["e"] == "None" and params["g"] == "{}"
    assert len(params["f"]) == tracking.PARAM_LIMIT and params["f"].endswith("...")
