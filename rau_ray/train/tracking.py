"""Experiment tracking of the training jobs: ``report_to: [mlflow, tensorboard]`` in any job config (default none).

Every training job (SFT, GRPO, the segmenter, the backbone pretraining) reports its metric rows to Ray Train from all
workers (``run.report``). With ``report_to`` set, ``run.fit`` adds ``ReportTo``, a Ray Train ``UserCallback``: it runs
in the run's controller (on the driver's node) and logs rank 0's row of every report at its ``step``, the same rows
``history.jsonl`` keeps (loss, throughput, held-out scores, GRPO's rewards...), whichever trainer made them:
- ``tensorboard``: event files under ``<storage_path>/<name>/tensorboard`` (for a bucket URI, written locally and
  uploaded there when the run ends);
- ``mlflow``: one MLflow run per ``rau train`` invocation (a resumed run's steps continue where it stopped) in
  experiment ``mlflow_experiment``, with the job config flattened into params (``model.policy.lora_rank``...), the
  command as a tag, the metrics per step and, when the run ends, the final checkpoint (param ``final_checkpoint``)
  and its status. Tracking server: ``mlflow_tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the file store
  ``<storage_path>/mlruns`` (``mlflow ui --backend-store-uri <that folder>``).
The values are checked when the config loads (``check_report_to``, ``check_tracking_uri``: an unknown reporter or
scheme is a ConfigError naming it); ``start`` checks on the driver, before any worker starts, that the client is
installed (the ``[tracking]`` extra) and that the tracking server answers, naming ``mlflow_tracking_uri`` if not.
A tracking server that goes away during a run costs warnings in the log, not the run. Sweeps log their trials with
Ray Tune's own ``MLflowLoggerCallback`` instead (``rau_ray.tune.sweep``, ``tune_callbacks``).
Use: ``rau train sft --config jobs/configs/sft-tiny.yaml report_to=[mlflow] mlflow_tracking_uri=http://mlflow:5000``.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train

from rau_ray import storage
from rau_ray.errors import ConfigError

logger = logging.getLogger(__name__)

REPORTERS = ("mlflow", "tensorboard")
# tracking URI schemes: a file store (a path, file:), a tracking server (http, https), Databricks, or the database
# stores of the full `mlflow` package
MLFLOW_SCHEMES = ("file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql")
DEFAULT_EXPERIMENT = "rau-ray"
PROBE_TIMEOUT_S = 5.0  # how long the driver waits for a tracking server to answer before refusing the run
PARAM_LIMIT = 6000  # MLflow's longest param value; longer ones (a tuple of many tasks) are cut with "..."
BATCH = 100  # MLflow's most params per log_batch call


def check_report_to(values, where: str = "report_to", allowed: tuple[str, ...] = REPORTERS) -> None:
    """ConfigError naming an unknown or repeated reporter (no I/O: safe at config load)."""
    for value in values:
        if value not in allowed:
            raise ConfigError(f"{where}: unknown reporter {value!r}; choose from {', '.join(allowed)} (or leave "
                              f"it empty: no tracking)")
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: {list(values)} names a reporter twice")


def check_tracking_uri(uri: str, where: str = "mlflow_tracking_uri") -> None:
    """ConfigError for a tracking URI of an unknown scheme (no I/O); "" and plain paths are accepted."""
    scheme = urllib.parse.urlparse(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""
    base = scheme.split("+", 1)[0]  # postgresql+psycopg2://...
    if scheme and base not in MLFLOW_SCHEMES:
        raise ConfigError(f"{where}: unknown MLflow tracking URI scheme {scheme!r} in {uri!r}; use a folder, "
                          f"file:, http(s)://, databricks or a database URI ({', '.join(MLFLOW_SCHEMES[4:])})")


def _is_file_store(uri: str) -> bool:
    """``file:...`` or a plain folder (not ``databricks``, not ``scheme://...``)."""
    return uri.startswith("file:") or "://" not in uri and uri != "databricks"


def _file_store_path(uri: str) -> Path:
    if uri.startswith("file:"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path))
    return Path(uri).expanduser().resolve()


def allow_file_store() -> None:
    """MLflow 3 refuses its file store unless told it is wanted ("maintenance mode"); a ``file:`` URI here is."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def tracking_uri(configured: str, storage_dir: str | None, where: str = "mlflow_tracking_uri") -> str:
    """The tracking URI a run logs to: ``configured``, else ``$MLFLOW_TRACKING_URI``, else the file store
    ``<storage_dir>/mlruns`` when the run is stored in a local folder (a bucket: ConfigError asking for one)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        if storage_dir is None or storage.is_remote(storage_dir):
            raise ConfigError(f"{where}: report_to mlflow needs a tracking URI when the run is stored in a bucket "
                              f"({storage_dir}): set {where} or MLFLOW_TRACKING_URI")
        uri = (Path(str(storage.join(storage_dir, "mlruns"))).resolve()).as_uri()
    check_tracking_uri(uri, where)
    if _is_file_store(uri):
        return _file_store_path(uri).as_uri()
    return uri


def _auth_headers() -> dict[str, str]:
    """What MLflow's client sends a tracking server, read from the same variables."""
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    return {}


def probe_server(uri: str, experiment: str, where: str = "mlflow_tracking_uri",
                 timeout: float = PROBE_TIMEOUT_S) -> None:
    """One request to an http(s) tracking server, within ``timeout``: ConfigError naming ``where`` when it does not
    answer or refuses the credentials. (MLflow's own client retries an unreachable server for minutes.)"""
    query = urllib.parse.urlencode({"experiment_name": experiment})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise ConfigError(f"{where}: the tracking server {uri} refuses the request (HTTP {e.code}); set "
                              "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD") from None
        if e.code >= 500 or e.code == 404 and b"RESOURCE_DOES_NOT_EXIST" not in e.read():
            raise ConfigError(f"{where}: {uri} answers HTTP {e.code} to MLflow's API; is it an MLflow tracking "
                              "server?") from None
        return  # 404 RESOURCE_DOES_NOT_EXIST: a server that has no such experiment yet
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"{where}: the MLflow tracking server {uri} does not answer ({reason}); start it, or "
                          f"fix {where} (or leave mlflow out of report_to)") from None


def mlflow_client(uri: str, where: str = "mlflow_tracking_uri"):
    """An ``MlflowClient`` for ``uri``; ConfigError when the MLflow client is not installed."""
    try:
        from mlflow.tracking import MlflowClient  # noqa: PLC0415 - optional extra [tracking], needed only with mlflow
    except ImportError:
        raise ConfigError(f"{where}: report_to mlflow needs the MLflow client: pip install 'rau-ray[tracking]' "
                          "(mlflow-skinny)") from None
    if _is_file_store(uri):
        allow_file_store()
    # a server that stops answering mid-run delays a report by seconds, not minutes of retries
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return MlflowClient(uri)


def summary_writer(folder: str, where: str = "report_to"):
    """A TensorBoard ``SummaryWriter`` writing into ``folder``; ConfigError when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional extra [tracking]
    except ImportError:
        raise ConfigError(f"{where}: report_to tensorboard needs tensorboard: pip install 'rau-ray[tracking]'") \
            from None
    return SummaryWriter(log_dir=folder)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested job config as MLflow params: dotted keys, values as text (lists and mappings as JSON)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
            continue
        text = json.dumps(value, default=str) if isinstance(value, (list, tuple, dict)) else str(value)
        out[name] = text if len(text) <= PARAM_LIMIT else text[:PARAM_LIMIT - 3] + "..."
    return out


def numeric(row: dict) -> dict[str, float]:
    """The finite numbers of a metric row, without its step bookkeeping."""
    return {k: float(v) for k, v in row.items() if k not in ("step", "resumed_from") and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(float(v))}


@dataclass(frozen=True)
class Tracking:
    """What the controller's callback needs (picklable): where each reporter writes."""

    tensorboard_dir: str | None = None  # a local folder
    tensorboard_dest: str | None = None  # where that folder goes when the run ends (a bucket URI), else None
    mlflow_uri: str | None = None
    mlflow_run_id: str | None = None


class ReportTo(ray.train.UserCallback):
    """Rank 0's row of every report -> TensorBoard scalars and / or MLflow metrics at the row's ``step``."""

    def __init__(self, tracking: Tracking):
        self.tracking = tracking
        self._writer = self._client = None
        self._reports = 0
        self._failed = 0

    def __getstate__(self):
        return {"tracking": self.tracking, "_writer": None, "_client": None, "_reports": 0, "_failed": 0}

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        row = metrics[0]  # rank 0's
        self._reports += 1
        step = int(row.get("step", self._reports))
        values = numeric(row)
        if not values:
            return
        t = self.tracking
        if t.tensorboard_dir:
            if self._writer is None:
                self._writer = summary_writer(t.tensorboard_dir)
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
            self._writer.flush()
        if t.mlflow_run_id:
            self._log_mlflow(values, step)

    def _log_mlflow(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415 - optional extra [tracking], present once start() ran

        try:
            if self._client is None:
                self._client = mlflow_client(self.tracking.mlflow_uri)
            stamp = int(time.time() * 1000)
            self._client.log_batch(self.tracking.mlflow_run_id,
                                   metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
        except Exception as e:  # a tracking outage must not end a training run
            self._failed += 1
            if self._failed in (1, 10, 100):
                logger.warning("report_to mlflow: step %s not logged to %s (%s failures so far): %s", step,
                               self.tracking.mlflow_uri, self._failed, e)


def _tensorboard_dir(run_dir: str) -> tuple[str, str | None]:
    """(the local folder the events go to, the bucket folder it is uploaded to at the end or None)."""
    if storage.is_remote(run_dir):
        local = tempfile.mkdtemp(prefix="rau-tensorboard-")
        return local, str(storage.join(run_dir, "tensorboard"))
    folder = Path(str(storage.join(run_dir, "tensorboard")))
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder), None


def start(cfg, storage_dir: str) -> ReportTo | None:
    """On the driver, before any worker starts: check the reporters of job config ``cfg`` (installed, the tracking
    server answering), create the MLflow run with the config as params; the callback to hand the trainer, or None."""
    report_to = tuple(getattr(cfg, "report_to", ()) or ())
    if not report_to:
        return None
    run_dir = str(storage.join(storage_dir, cfg.name))
    tb_dir = tb_dest = run_id = uri = None
    if "tensorboard" in report_to:
        tb_dir, tb_dest = _tensorboard_dir(run_dir)
        summary_writer(tb_dir).close()  # installed, and the folder writable, before the run starts
    if "mlflow" in report_to:
        uri = tracking_uri(cfg.mlflow_tracking_uri, storage_dir)
        experiment = cfg.mlflow_experiment or DEFAULT_EXPERIMENT
        if urllib.parse.urlparse(uri).scheme in ("http", "https"):
            probe_server(uri, experiment)
        client = mlflow_client(uri)
        run_id = _create_run(client, uri, experiment, cfg, run_dir)
    return ReportTo(Tracking(tb_dir, tb_dest, uri, run_id))


def _create_run(client, uri: str, experiment: str, cfg, run_dir: str) -> str:
    from mlflow.entities import Param, RunTag  # noqa: PLC0415 - optional extra [tracking]
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    try:
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        tags = {"rau.run_dir": run_dir, "rau.job": type(cfg).__name__, "rau.command": " ".join(sys.argv)[:5000]}
        run = client.create_run(experiment_id, run_name=cfg.name, tags=tags)
        params = [Param(k, v) for k, v in flatten(asdict(cfg)).items()]
        for i in range(0, len(params), BATCH):
            client.log_batch(run.info.run_id, params=params[i:i + BATCH])
        client.log_batch(run.info.run_id, tags=[RunTag("rau.params", str(len(params)))])
    except MlflowException as e:
        raise ConfigError(f"mlflow_tracking_uri: cannot start an MLflow run in experiment {experiment!r} at {uri}: "
                          f"{str(e).splitlines()[0][:300]}") from None
    return run.info.run_id


def finish(callback: ReportTo | None, status: str, checkpoint: str | None = None) -> dict:
    """On the driver, after the run (``status`` FINISHED / FAILED / KILLED): the final checkpoint and the status to
    MLflow, TensorBoard's events to the bucket; returns where each reporter wrote (for the job's summary)."""
    if callback is None:
        return {}
    t, out = callback.tracking, {}
    if t.tensorboard_dir:
        out["tensorboard"] = t.tensorboard_dest or t.tensorboard_dir
        if t.tensorboard_dest:
            storage.upload_dir(t.tensorboard_dir, t.tensorboard_dest)
            shutil.rmtree(t.tensorboard_dir, ignore_errors=True)
    if t.mlflow_run_id:
        out.update(mlflow_tracking_uri=t.mlflow_uri, mlflow_run_id=t.mlflow_run_id)
        try:
            client = mlflow_client(t.mlflow_uri)
            if checkpoint:
                from mlflow.entities import Param  # noqa: PLC0415 - optional extra [tracking]

                client.log_batch(t.mlflow_run_id, params=[Param("final_checkpoint", str(checkpoint))])
            client.set_terminated(t.mlflow_run_id, status)
        except Exception as e:  # the run is done and saved: say what was not recorded
            logger.warning("report_to mlflow: the end of run %s was not recorded at %s: %s", t.mlflow_run_id,
                           t.mlflow_uri, e)
    return out
