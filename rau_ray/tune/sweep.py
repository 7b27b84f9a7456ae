"""Ray Tune sweeps over a training job: projector width, LoRA rank, learning rate... -> results table, heatmap, best.

A sweep config (``SweepConfig``, YAML) names a training job (``seg``, ``sft`` or ``grpo``), the job config its trials
start from (``base``), fixed ``overrides`` and a ``search`` space, all as dotted paths into the job config (its
``model`` section included: ``model.fusion.projector_dim``, ``model.policy.lora_rank``, ``lr``). A plain list is a
grid; ``{choice|uniform|loguniform|randint: [...]}`` is sampled. The ``Tuner`` runs one function trial per point
(``param_space={"train_loop_config": {path: domain}}``); each trial builds the job's config and runs the ordinary
Ray Train job (``rau_ray.train``: its ``TorchTrainer``, checkpoints, resume) with a ``TuneReportCallback`` in the
trainer's RunConfig (``run.run_callbacks``), so the job's validation rows reach Tune. ASHA stops weak trials early
(``time_attr`` = the job's optimizer step by default; ``janitor.py`` frees what a stopped trial held). A trial's
driver reserves memory but no CPU, its Ray Train workers reserve ``resources`` (fractional CPUs here, GPUs on a
cluster); ``max_concurrent_trials`` trials run at once. Under ``<storage_path>/<name>/`` (a folder, or a URI such as
``s3://bucket/tune``: Tune's own storage, the trials' runs and the outputs below all go there): Tune's experiment
state, ``sweep.json`` (this config, resolved), ``runs/<trial_id>/`` (each trial's Ray Train run: ``checkpoint_*``,
``trial.json`` when it finished), ``results.csv`` / ``results.md``, ``heatmap.png``, ``summary.json`` and the best
trial's final checkpoint copied to ``best/`` (+ ``best.json``), the folder ``rau_ray.models.checkpoint`` loads. An
interrupted sweep (Ctrl-C, SIGINT) continues with ``--resume`` (``Tuner.restore``): finished trials are kept,
unfinished ones restart and their Ray Train runs resume from their latest checkpoints. ``report_to: [mlflow]`` logs
every trial as an MLflow run (Ray Tune's ``MLflowLoggerCallback``; ``mlflow_tracking_uri``, ``mlflow_experiment``),
after checking, before any trial starts, that the tracking server answers (``rau_ray.train.tracking``).
Use: ``rau tune --config jobs/configs/tune-seg-tiny.yaml [--resume]`` or ``run_sweep(load_sweep_config(path))``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import ray.tune
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from rau_ray import ray_session, storage
from rau_ray.config import from_dict, load_config, read_yaml
from rau_ray.errors import ConfigError, DataError, RauError
from rau_ray.models.checkpoint import STATE, locate_checkpoint, read_history
from rau_ray.storage import check_scheme, is_uri, join
from rau_ray.train import run, tracking
from rau_ray.train.jobs import job_types
from rau_ray.tune import janitor, results

DEFAULT_METRICS = {"seg": "val_dice", "sft": "val_accuracy", "grpo": "reward"}
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SET_BY_SWEEP = ("name", "scale.storage_path")  # each trial's run name and folder come from the sweep
SWEEP_REPORTERS = ("mlflow",)  # Tune's TensorBoard files: the trials' own report_to: [tensorboard]


@dataclass(frozen=True)
class TrialResources:
    """What one trial's Ray Train run reserves (it overrides the base job's ``scale``); never assumes a GPU."""

    num_workers: int = 1  # Ray Train workers per trial
    cpus_per_worker: float = 0.5  # fractional: two 1-worker trials share a 2-core machine and leave a core free for
    #                               Ray Data; on a cluster 1 or more
    use_gpu: bool = False  # a GPU cluster's sweep config turns it on
    gpus_per_worker: float = 1  # used only with use_gpu (fractions share a GPU between trials)
    driver_memory_mb: int = 256  # the trial's driver (builds the items, starts the trainer) reserves this memory and
    #                              no CPU: the CPUs stay free for the trials' workers and their Ray Data tasks

    def validate(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0 or self.gpus_per_worker <= 0:
            raise ConfigError("resources: num_workers must be >= 1, cpus_per_worker and gpus_per_worker > 0")
        if self.driver_memory_mb < 1:
            raise ConfigError("resources.driver_memory_mb must be >= 1 (Tune needs a non-empty bundle)")


@dataclass(frozen=True)
class AshaConfig:
    """Asynchronous successive halving: at each rung (grace_period x reduction_factor^k) a trial whose metric is
    below the rung's top 1/reduction_factor stops."""

    enabled: bool = True  # false: every trial runs to the end (FIFO)
    time_attr: str = "step"  # the job's optimizer step (every report has it); "training_iteration": reports to Tune
    grace_period: int = 1  # no trial stops before this many time_attr units
    reduction_factor: float = 2  # keep the best 1/reduction_factor at every rung
    max_t: int = 0  # rung ceiling in time_attr units; 0: the base job's max_steps

    def validate(self) -> None:
        if self.grace_period < 1 or self.reduction_factor <= 1 or self.max_t < 0:
            raise ConfigError("asha: grace_period must be >= 1, reduction_factor > 1 and max_t >= 0")


@dataclass(frozen=True)
class SweepConfig:
    job: str  # the training job every trial runs: seg (segmenter), sft or grpo (policy)
    base: str  # its config YAML, the trials' starting point (e.g. jobs/configs/seg-tiny.yaml)
    search: dict[str, Any]  # dotted path -> [grid values] | {choice|uniform|loguniform|randint: [...]}
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted path -> value, the same in every trial
    metric: str = ""  # what Tune compares ("" = the job's: seg val_dice, sft val_accuracy, grpo reward)
    mode: str = "max"  # max | min
    num_samples: int = 1  # repeats of the grid; each repeat draws its own random values (all of them: trials)
    max_concurrent_trials: int = 2  # trials at once (their workers' resources must fit the cluster together)
    resources: TrialResources = field(default_factory=TrialResources)
    asha: AshaConfig = field(default_factory=AshaConfig)
    heatmap: tuple[str, ...] = ()  # two search paths (x, y) for heatmap.png; () = the first two with lists of values
    storage_path: str = "runs/tune"  # the sweep's parent: a local folder (one node), a folder every node shares, or
    #                                   a URI (s3://bucket/prefix, gs://...): Tune's state, trials' runs, results
    name: str = "sweep"  # the sweep's folder under storage_path; the same name with --resume continues it
    seed: int = 0  # random draws of the search (reproducible sweeps)
    max_failures: int = 0  # retries of a failed trial (worker failures inside one: the job's scale.max_failures)
    # [mlflow]: every trial an MLflow run (Ray Tune's MLflowLoggerCallback: its values as params, its reports as
    # metrics); the trials' own Ray Train runs log too where the base job config sets report_to
    report_to: tuple[str, ...] = ()
    mlflow_tracking_uri: str = ""  # "": $MLFLOW_TRACKING_URI, else the file store <storage_path>/mlruns
    mlflow_experiment: str = ""  # "": the sweep's name

    def validate(self) -> None:
        jobs = sorted(DEFAULT_METRICS)
        if self.job not in jobs:
            raise ConfigError(f"job must be one of {', '.join(jobs)}, got {self.job!r}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode must be max or min, got {self.mode!r}")
        if not self.search:
            raise ConfigError("search is empty: name at least one dotted config path and its values, e.g. "
                              "search: {model.fusion.projector_dim: [128, 256]}")
        if self.num_samples < 1 or self.max_concurrent_trials < 1 or self.max_failures < 0:
            raise ConfigError("num_samples and max_concurrent_trials must be >= 1, max_failures >= 0")
        check_scheme(self.storage_path, "storage_path")  # no I/O here; run_sweep opens the filesystem
        if self.heatmap and (len(self.heatmap) != 2 or any(p not in self.search for p in self.heatmap)):
            raise ConfigError(f"heatmap must name two search paths, got {list(self.heatmap)}")
        for path, spec in self.search.items():
            search_values(path, spec)
        self.resources.validate()
        self.asha.validate()
        tracking.check_report_to(self.report_to, allowed=SWEEP_REPORTERS)
        tracking.check_tracking_uri(self.mlflow_tracking_uri)

    @property
    def metric_name(self) -> str:
        return self.metric or DEFAULT_METRICS[self.job]

    def experiment_dir(self) -> Path | str:
        """The sweep's folder: an absolute Path, or a URI string when storage_path is one (no I/O)."""
        if is_uri(self.storage_path):
            return join(self.storage_path, self.name)
        return Path(self.storage_path).expanduser().resolve() / self.name


def load_sweep_config(path: str | Path, overrides: dict | None = None) -> SweepConfig:
    return load_config(path, SweepConfig, overrides)


# -- dotted paths ----------------------------------------------------------------------------------------------------
def set_path(data: dict, path: str, value) -> dict:
    """A deep copy of ``data`` with ``path`` ("a.b.c") set to ``value``; missing sections become mappings."""
    out = copy.deepcopy(data)
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = copy.deepcopy(value)
    return out


def get_path(data: dict, path: str, default=None):
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def config_tree(job_cfg) -> dict:
    """Every setting of a job config as nested mappings (its typed ``model`` the full ModelConfig, profile defaults
    included): the paths a sweep may name."""
    return asdict(job_cfg)


def check_path(tree: dict, path: str, job: str, where: str) -> None:
    """ConfigError unless ``path`` names one setting (a leaf) of the job config ``tree``."""
    if path in SET_BY_SWEEP:
        raise ConfigError(f"{where}: {path!r} is set by the sweep (each trial's run name and folder)")
    node, done = tree, []
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            section = ".".join(done) or "the top level"
            options = ", ".join(sorted(node)) if isinstance(node, dict) else "no fields (it is a value)"
            raise ConfigError(f"{where}: {path!r} is not a setting of the {job} job config ({section} has: "
                              f"{options})")
        node = node[part]
        done.append(part)
    if isinstance(node, dict) and node:
        raise ConfigError(f"{where}: {path!r} is a section; name one of its settings ({', '.join(sorted(node))})")


def search_values(path: str, spec) -> tuple[str, list]:
    """(kind, values) of one search entry: the grid/choice values, or a distribution's [low, high]."""
    where = f"search.{path}"
    if isinstance(spec, (list, tuple)):
        kind, args = "grid", list(spec)
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
        kind, args = next(iter(spec.items()))
        if not isinstance(args, (list, tuple)):
            raise ConfigError(f"{where}.{kind}: expected a list, got {args!r}")
        args = list(args)
    else:
        raise ConfigError(f"{where}: expected a list of values (a grid) or one of "
                          f"{{{'|'.join(DISTRIBUTIONS[1:])}: [...]}}, got {spec!r} (fixed values go in overrides)")
    if not args:
        raise ConfigError(f"{where}: no values")
    if kind in ("uniform", "loguniform", "randint"):
        numbers = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
        if not numbers or not args[0] < args[1]:
            raise ConfigError(f"{where}.{kind}: expected [low, high] with low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}.loguniform: low must be > 0, got {args[0]}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}.randint: expected integers [low, high), got {args}")
    return kind, args


def domain(path: str, spec):
    """The Tune search domain of one search entry."""
    kind, args = search_values(path, spec)
    if kind == "grid":
        return tune.grid_search(args)
    if kind == "choice":
        return tune.choice(args)
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*args)


def _candidates(kind: str, args: list) -> list:
    """Values that stand for an entry when checking it: every listed value, or a range's ends."""
    if kind in ("grid", "choice"):
        return args
    return [args[0], args[1] - 1] if kind == "randint" else [float(args[0]), float(args[1])]


def job_config(job: str, data: dict, where: str):
    """The job's config from a mapping, its typed model section included (ConfigError naming ``where``)."""
    config_cls, _ = job_types(job)
    try:
        cfg = from_dict(config_cls, data, where)
    except ConfigError as e:  # components' own checks do not know where the values came from
        raise ConfigError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    return cfg


# -- the prepared sweep ----------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    cfg: SweepConfig
    base: dict  # the job config every trial starts from: base YAML + overrides + resources, paths absolute
    max_steps: int  # the base job's max_steps (ASHA's default ceiling, "stopped early" in the table)

    @property
    def experiment_dir(self) -> Path | str:
        return self.cfg.experiment_dir()

    @property
    def runs_dir(self) -> Path | str:
        return join(self.experiment_dir, "runs")

    def resolved(self) -> dict:
        """What sweep.json records: the sweep config and the trials' base job config."""
        return {"sweep": asdict(self.cfg), "base_config": self.base}


def prepare(cfg: SweepConfig) -> Prepared:
    """Load the base job config, apply overrides and resources, check every search path and value."""
    cfg.validate()
    job_types(cfg.job)  # an unknown or uninstalled job fails here
    path = Path(cfg.base)
    data = read_yaml(path, missing="base: job config not found")
    where = f"{path} (base of sweep {cfg.name!r})"
    tree = config_tree(job_config(cfg.job, data, where))
    for key, value in cfg.overrides.items():
        check_path(tree, key, cfg.job, "overrides")
        data = set_path(data, key, value)
    res = cfg.resources
    scale = {"num_workers": res.num_workers, "cpus_per_worker": res.cpus_per_worker, "use_gpu": res.use_gpu,
             "gpus_per_worker": res.gpus_per_worker}
    for key, value in scale.items():
        data = set_path(data, f"scale.{key}", value)
    if isinstance(data.get("manifest"), str) and "://" not in data["manifest"]:
        data["manifest"] = str(Path(data["manifest"]).expanduser().resolve())  # trials run in other folders
    base_cfg = job_config(cfg.job, data, f"{where} + overrides")
    tree = config_tree(base_cfg)
    for key, spec in cfg.search.items():
        check_path(tree, key, cfg.job, "search")
        kind, args = search_values(key, spec)
        for value in _candidates(kind, args):
            job_config(cfg.job, set_path(data, key, value), f"search {key}={value!r}")
    max_steps = int(getattr(base_cfg, "max_steps", 0) or 0)
    if cfg.asha.enabled and not (cfg.asha.max_t or max_steps):
        raise ConfigError("asha.max_t: set it (the base job has no max_steps to stop at)")
    return Prepared(cfg, data, max_steps)


def check_fits(cfg: SweepConfig, cluster: dict[str, float]) -> None:
    """ConfigError when ``max_concurrent_trials`` trials' workers cannot run at once on ``cluster``: Ray Train
    would wait for the rest and give up after a minute."""
    res = cfg.resources
    need = {"CPU": cfg.max_concurrent_trials * res.num_workers * res.cpus_per_worker}
    if res.use_gpu:
        need["GPU"] = cfg.max_concurrent_trials * res.num_workers * res.gpus_per_worker
    for key, amount in need.items():
        if amount > cluster.get(key, 0) + 1e-9:
            raise ConfigError(f"max_concurrent_trials {cfg.max_concurrent_trials} x {res.num_workers} workers need "
                              f"{amount:g} {key}s, the cluster has {cluster.get(key, 0):g}: lower "
                              f"max_concurrent_trials or resources")


def scheduler(prep: Prepared):
    asha = prep.cfg.asha
    if not asha.enabled:
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches max_t ends by itself (its job saves, writes trial.json) instead
    # of being stopped at its last report
    return ASHAScheduler(time_attr=asha.time_attr, max_t=asha.max_t or prep.max_steps,
                         grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                         stop_last_trials=False)


def tune_config(prep: Prepared):
    cfg = prep.cfg
    # the concurrency limit lives in the search algorithm (Tune ignores max_concurrent_trials next to one)
    search = BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent_trials)
    return tune.TuneConfig(metric=cfg.metric_name, mode=cfg.mode, num_samples=cfg.num_samples,
                           scheduler=scheduler(prep), search_alg=search, trial_name_creator=trial_name,
                           trial_dirname_creator=trial_name)


def param_space(cfg: SweepConfig) -> dict:
    return {"train_loop_config": {key: domain(key, spec) for key, spec in cfg.search.items()}}


def tune_callbacks(cfg: SweepConfig, parent: str) -> list:
    """Tune callbacks the sweep config asks for: MLflow's (``report_to: [mlflow]``), once the client is installed
    and the tracking server answers (ConfigError naming ``mlflow_tracking_uri``, before any trial starts)."""
    if "mlflow" not in cfg.report_to:
        return []
    uri = tracking.tracking_uri(cfg.mlflow_tracking_uri, parent)
    experiment = cfg.mlflow_experiment or cfg.name
    if uri.startswith(("http://", "https://")):
        tracking.probe_server(uri, experiment)
    tracking.mlflow_client(uri)  # installed; a file store allowed in this (Tune's driver) process
    return [MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False,
                                 tags={"rau.sweep": str(cfg.experiment_dir()), "rau.job": cfg.job})]


def trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def trainable(prep: Prepared):
    """The function trainable with its fixed arguments and resources: memory only for the driver."""
    fn = tune.with_parameters(run_trial, job=prep.cfg.job, base=prep.base, metric=prep.cfg.metric_name,
                              runs_dir=str(prep.runs_dir))
    return tune.with_resources(fn, {"cpu": 0, "memory": prep.cfg.resources.driver_memory_mb * 2**20})


# -- one trial -------------------------------------------------------------------------------------------------------
def _metric_forwarder(metric: str):
    """A ``TuneReportCallback`` that forwards only the rows carrying ``metric`` (validation rows): Tune (strictly)
    wants its metric in every result, and ASHA compares trials at validations."""
    class ForwardMetricRows(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ForwardMetricRows()


def _latest(run_dir: Path | str):
    """(step, location) of a Ray Train run's latest checkpoint (a folder or a URI), or (-1, None)."""
    try:
        folder = locate_checkpoint(run_dir)
        state = json.loads(storage.read_text(join(folder, STATE)))
    except (DataError, OSError, ValueError):
        return -1, None
    return int(state.get("step", 0)), folder


def run_trial(config: dict, job: str, base: dict, metric: str, runs_dir: str) -> None:
    """One Tune trial: the base job config with this trial's values, run as the ordinary Ray Train job (named after
    the trial, under ``runs_dir``) whose validation rows go to Tune. A restarted trial's run resumes from its latest
    checkpoint; one that had already finished reports its last validation row again."""
    trial_id = ray.tune.get_context().get_trial_id()
    values = config["train_loop_config"]
    data = base
    for key, value in values.items():
        data = set_path(data, key, value)
    data = set_path(set_path(data, "name", trial_id), "scale.storage_path", runs_dir)
    cfg = job_config(job, data, f"trial {trial_id}")
    _, run_fn = job_types(job)
    run_dir = join(runs_dir, trial_id)
    before, _ = _latest(run_dir)
    t0 = time.perf_counter()
    with run.run_callbacks(_metric_forwarder(metric)):
        run_fn(cfg)
    step, folder = _latest(run_dir)
    history = read_history(folder) if folder else []
    rows = [row for row in history if metric in row]
    if step == before and rows:  # nothing trained now: the run had finished before this (restarted) trial
        ray.tune.report(rows[-1])
    storage.write_text(join(run_dir, "trial.json"), json.dumps({
        "trial_id": trial_id, "config": values, "step": step, "checkpoint": str(folder) if folder else None,
        metric: rows[-1][metric] if rows else None, "seconds": time.perf_counter() - t0}, indent=2, default=str))


# -- the sweep -------------------------------------------------------------------------------------------------------
def run_sweep(cfg: SweepConfig, resume: bool = False) -> dict:
    """Run (or with ``resume`` continue) the sweep; write the table, heatmap and best export; return a summary.

    An interrupted sweep (SIGINT) returns ``{"interrupted": True, ...}`` after writing the table of what finished."""
    prep = prepare(cfg)
    exp = prep.experiment_dir
    saved = join(exp, "sweep.json")
    parent = storage.resolve_storage(cfg.storage_path, "storage_path")  # a URI: opened here (scheme, credentials)
    callbacks = [janitor.Janitor(), *tune_callbacks(cfg, parent)]  # a tracking server that does not answer: here
    ray_session.connect()
    check_fits(cfg, {k: float(v) for k, v in ray.cluster_resources().items()})
    if resume:
        if not tune.Tuner.can_restore(str(exp)):
            raise ConfigError(f"{exp}: no sweep to resume there (start it without --resume)")
        if storage.is_file(saved):
            before = json.loads(storage.read_text(saved))
            if before.get("base_config") != json.loads(json.dumps(prep.base)) or \
                    before.get("sweep", {}).get("search") != json.loads(json.dumps(cfg.search)):
                raise ConfigError(f"{exp}: the sweep's base config or search changed since it started; resume it "
                                  f"with the config it started with (recorded in {saved})")
        tuner = tune.Tuner.restore(str(exp), trainable=trainable(prep), resume_unfinished=True,
                                   resume_errored=True)
    else:
        if storage.list_dir(exp):
            raise ConfigError(f"{exp} already holds a sweep: continue it with --resume, or choose another name")
        storage.write_text(saved, json.dumps(prep.resolved(), indent=2, default=str))
        tuner = tune.Tuner(trainable(prep), param_space=param_space(cfg), tune_config=tune_config(prep),
                           run_config=tune.RunConfig(name=cfg.name, storage_path=parent,
                                                     failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                                     callbacks=callbacks, verbose=1))
    t0, freed = time.perf_counter(), janitor.freed
    try:
        tuner.fit()
    finally:
        janitor.settle()  # stopped trials' worker placement groups: nothing of the sweep keeps holding CPUs
    wall = time.perf_counter() - t0
    return summarise(prep, wall, freed_placement_groups=janitor.freed - freed)


def summarise(prep: Prepared, wall: float, **extra) -> dict:
    """Table, heatmap, summary.json and (when every trial is done) the best export, from the saved experiment."""
    cfg, exp = prep.cfg, prep.experiment_dir
    paths, metric = list(cfg.search), cfg.metric_name
    records = results.records_from_experiment(exp)
    rows = results.trial_rows(records, paths, metric, cfg.mode, cfg.asha.max_t or prep.max_steps)
    outputs = results.write_table(rows, exp, paths, metric, cfg.mode, title=cfg.name)
    axes = list(cfg.heatmap) or [k for k in paths if search_values(k, cfg.search[k])[0] in ("grid", "choice")][:2]
    if len(axes) == 2 and any(r[metric] is not None for r in rows):
        outputs["heatmap"] = str(results.plot_heatmap(rows, axes[0], axes[1], metric, cfg.mode,
                                                      join(exp, "heatmap.png"), title=cfg.name))
    counts = {s: sum(r["status"] == s for r in rows) for s in results.STATUSES}
    done = counts["finished"] + counts["stopped early"]
    summary = {"sweep": str(exp), "job": cfg.job, "metric": metric, "mode": cfg.mode, "trials": len(rows),
               **{s.replace(" ", "_"): n for s, n in counts.items()}, "wall_s": round(wall, 1),
               "trials_per_hour": round(done / wall * 3600, 1) if wall > 0 else None,
               "scheduler": asdict(cfg.asha) | {"max_t": cfg.asha.max_t or prep.max_steps} if cfg.asha.enabled
               else "FIFO", **outputs, **extra, "interrupted": counts["unfinished"] > 0}
    if summary["interrupted"]:
        summary["resume"] = f"rau tune --config <this sweep's config> --resume   (sweep folder {exp})"
    else:
        if results.best_row(rows, metric, cfg.mode) is None:
            raise RauError(f"sweep {cfg.name}: no trial reported {metric}; see the trials under {exp}")
        # ASHA may stop a trial at a rung before its first checkpoint: the export is the best trial that has one
        saved = [r for r in rows if _latest(join(prep.runs_dir, r["trial_id"]))[1] is not None]
        best = results.best_row(saved, metric, cfg.mode)
        if best is None:
            raise RauError(f"sweep {cfg.name}: no trial saved a checkpoint (checkpoint_every larger than the steps "
                           f"ASHA lets a trial run?); see the trials under {exp}")
        summary["best"] = results.export_best(best, {p: best[p] for p in paths}, join(prep.runs_dir, best["trial_id"]),
                                              exp, metric, job=cfg.job)
        overall = results.best_row(rows, metric, cfg.mode)
        if overall["trial_id"] != best["trial_id"]:
            summary["best_unsaved"] = {"trial_id": overall["trial_id"], metric: overall[metric],
                                       "step": overall["step"], "status": overall["status"]}
    storage.write_text(join(exp, "summary.json"), json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``jobs/tune.py``: ``python jobs/tune.py --config FILE [--resume]``."""
    parser = argparse.ArgumentParser(description="Ray job: a Ray Tune sweep over a training job (rau_ray.tune).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        summary = run_sweep(load_sweep_config(args.config), resume=args.resume)
    except RauError as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary, indent=2, default=str))
    if summary.get("interrupted"):
        sys.exit(130)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="sweep config YAML (jobs/configs/tune-*.yaml)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted sweep of this config (finished trials are kept)")
