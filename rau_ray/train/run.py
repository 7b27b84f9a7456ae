"""What every training job shares: the TorchTrainer around a worker loop, checkpoints, and the metric history.

A checkpoint folder (its layout: ``rau_ray.models.checkpoint``) holds ``weights.safetensors`` (only what the job
trains: a LoRA adapter, a projector...), ``train_state.json`` (global step, the job's config) and ``history.jsonl``
(every logged metric row so far). The history travels inside the checkpoint, so a run restarted after a failure, or
stored on s3://, continues its curve. Use (inside a worker loop): ``state = resume()``; ``report(metrics,
weights=..., step=..., history=...)``; ``all_sum(values)`` over the ranks; on the driver: ``result = fit(loop, cfg,
datasets)``; ``weights, state = read_weights_and_state(result.checkpoint.path)`` (``rau_ray.models.checkpoint``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import numpy as np
import psutil
import ray.data
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from rau_ray import ray_session
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.checkpoint import read_history, read_weights_and_state, write_checkpoint
from rau_ray.storage import check_scheme, resolve_storage, uri_of
from rau_ray.train import tracking


@dataclass
class Resumed:
    step: int = 0  # global optimizer steps already taken
    weights: dict[str, torch.Tensor] | None = None
    history: list[dict] = field(default_factory=list)


def all_sum(values: dict[str, float], device=None) -> dict[str, float]:
    """Each value summed over the ranks (the process group Ray Train set up), or as is in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def resume() -> Resumed:
    """Inside a worker: the latest checkpoint Ray Train hands a (re)started run, or a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return Resumed()
    with checkpoint.as_directory() as folder:
        weights, state = read_weights_and_state(folder)
        return Resumed(step=state["step"], weights=weights, history=read_history(folder))


def report(metrics: dict, weights: dict[str, torch.Tensor] | None = None, step: int = 0,
           history: list[dict] | None = None, config: dict | None = None) -> None:
    """Report metrics from every worker (Ray Train expects all to call); with ``weights``, rank 0 also saves them
    (with the step, config and history) as the checkpoint."""
    if weights is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            write_checkpoint(tmp, weights, step, config or {}, history or ())
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class ScaleConfig:
    """How a job runs on the cluster; every job config embeds these fields (``scale:`` in the YAML)."""

    num_workers: int = 2  # Ray Train workers: here 2 CPU processes, on a GPU cluster one per GPU
    use_gpu: bool = False  # never assumed: the GPU configs turn it on
    cpus_per_worker: float = 1  # 1 x 2 workers fills this 2-core machine; data loading runs in the workers
    gpus_per_worker: float = 1  # used only with use_gpu
    storage_path: str = "runs/train"  # Ray Train storage: a local folder, or an s3:// / gs:// / file:// URI
    max_failures: int = 1  # worker failures survived: the run restarts from its latest checkpoint
    keep_checkpoints: int = 2  # older checkpoints are deleted
    placement_strategy: str = "PACK"  # of the workers' placement group: PACK fills nodes, SPREAD one per node

    def validate(self) -> None:
        if self.num_workers < 1:
            raise ConfigError(f"scale.num_workers must be at least 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError(f"scale.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"scale.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                              f"got {self.placement_strategy!r}")
        check_scheme(self.storage_path, "scale.storage_path")  # no I/O here; storage() opens the filesystem

    def storage(self) -> str:
        """The absolute folder, or the URI once its pyarrow filesystem opened (ConfigError: scheme, credentials)."""
        return resolve_storage(self.storage_path, "scale.storage_path")


@dataclass(frozen=True, kw_only=True)
class TrainJobConfig:
    """The fields every training job repeats; each job's config subclasses it (``kw_only``) and sets its defaults.

    ``name`` is the run folder under ``scale.storage_path``: the same name again resumes from its latest checkpoint.
    """

    name: str  # run name: a folder name (no slashes); each job gives its default
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    max_steps: int = 0  # optimizer steps in all; a resumed run counts the steps already done
    log_every: int = 10  # steps between metric reports (each is a sync of all workers)
    checkpoint_every: int = 100  # steps between checkpoints (the last step always saves)
    seed: int = 0
    # experiment tracking (rau_ray.train.tracking): [] none, or any of mlflow, tensorboard; rank 0's metric rows per
    # step, the config as params, the final checkpoint
    report_to: tuple[str, ...] = ()
    mlflow_tracking_uri: str = ""  # "": $MLFLOW_TRACKING_URI, else the file store <storage_path>/mlruns
    mlflow_experiment: str = "rau-ray"

    def validate(self) -> None:
        if not self.name.strip() or "/" in self.name or "\\" in self.name or self.name in (".", ".."):
            raise ConfigError(f"name must be a folder name without slashes (the run under scale.storage_path), "
                              f"got {self.name!r}")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0, got {self.max_steps}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError(f"log_every and checkpoint_every must be at least 1, got {self.log_every} and "
                              f"{self.checkpoint_every}")
        self.scale.validate()
        tracking.check_report_to(self.report_to)
        tracking.check_tracking_uri(self.mlflow_tracking_uri)
        if "mlflow" in self.report_to and not self.mlflow_experiment.strip():
            raise ConfigError("mlflow_experiment must name an MLflow experiment (e.g. rau-ray)")


def materialized(items: list[dict], seed: int):
    """A Ray Dataset of plain-dict items in a seeded shuffled order, already materialised: training workers hold
    every CPU of a small cluster, so a lazy Ray Data shuffle would wait forever for a CPU of its own. The items are
    small dicts (images load later in the workers), so the driver shuffles them itself: Ray Data's
    ``random_shuffle().materialize()`` took ~3 s of executor polling per run here for a few hundred items."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # the training metrics are the progress
    order = np.random.default_rng(seed).permutation(len(items))
    return ray.data.from_items([items[i] for i in order])


_RUN_CALLBACKS: ContextVar[tuple] = ContextVar("rau_run_callbacks", default=())


@contextmanager
def run_callbacks(*callbacks):
    """Within the block, every ``fit`` in this thread also hands ``callbacks`` (Ray Train ``UserCallback``s) to the
    trainer's RunConfig: how a Ray Tune trial forwards a job's reports to Tune (``rau_ray.tune``) while the job itself
    stays unaware that it runs inside a sweep."""
    token = _RUN_CALLBACKS.set(_RUN_CALLBACKS.get() + tuple(callbacks))
    try:
        yield
    finally:
        _RUN_CALLBACKS.reset(token)


def build_trainer(loop, loop_config: dict, scale: ScaleConfig, name: str, datasets: dict | None = None,
                  callbacks: tuple | list = ()):
    """The ``TorchTrainer`` that runs ``loop(loop_config)`` on ``scale.num_workers`` workers (not started)."""
    resources = {"CPU": scale.cpus_per_worker, **({"GPU": scale.gpus_per_worker} if scale.use_gpu else {})}
    return TorchTrainer(
        loop, train_loop_config=loop_config, datasets=datasets or {},
        scaling_config=ScalingConfig(num_workers=scale.num_workers, use_gpu=scale.use_gpu,
                                     resources_per_worker=resources, placement_strategy=scale.placement_strategy),
        run_config=RunConfig(storage_path=scale.storage(), name=name,
                             failure_config=FailureConfig(max_failures=scale.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=scale.keep_checkpoints),
                             callbacks=list(callbacks) or None))


def fit(loop, loop_config: dict, scale: ScaleConfig, name: str, datasets: dict | None = None,
        job: TrainJobConfig | None = None):
    """Run ``loop(loop_config)`` on ``scale.num_workers`` Ray Train workers; returns Ray Train's Result. ``job``:
    the job's config, whose ``report_to`` reporters are checked here, before any worker starts, and then log the run
    (``rau_ray.train.tracking``).

    A failed run (after ``max_failures`` restarts) raises ``ray.train.TrainingFailedError``."""
    reporter = tracking.start(job, scale.storage()) if job is not None else None
    callbacks = _RUN_CALLBACKS.get() + ((reporter,) if reporter else ())
    status, checkpoint = "FAILED", None
    try:
        ray_session.connect()
        result = build_trainer(loop, loop_config, scale, name, datasets, callbacks).fit()
        if result.error is None:
            status = "FINISHED"
            if result.checkpoint:
                checkpoint = uri_of(result.checkpoint.filesystem, result.checkpoint.path, scale.storage_path)
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish(reporter, status, checkpoint)


def shard_batches(shard, batch_size: int, seed: int):
    """``(epoch, items)`` without end: this worker's Ray Data shard is streamed once (task items are small dicts,
    images load later), then reshuffled every epoch by a seeded generator. Streaming the shard again every epoch
    stalled on a cluster whose CPUs the training workers hold. The caller stops at its last step."""
    items = [dict(row) for row in shard.iter_rows()]
    if not items:
        raise DataError("this worker's data shard is empty: fewer training items than workers")
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(items)) if epoch else np.arange(len(items))
        for i in range(0, len(items), batch_size):
            yield epoch, [items[j] for j in order[i:i + batch_size]]
        epoch += 1


def prepare_worker(scale: ScaleConfig) -> int:
    """Start of every worker loop: torch threads = the CPUs this worker reserved (at least 1), so workers on one
    node do not oversubscribe it; freed large tensors go back to the OS (``return_freed_memory``). Returns threads."""
    threads = max(1, int(scale.cpus_per_worker))
    torch.set_num_threads(threads)
    return_freed_memory()
    return threads


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes: every larger allocation (a gathered ZeRO-3 layer, an
    activation) is its own mapping and goes back to the OS when freed. glibc otherwise raises the threshold after
    each such free, later ones come from the heap, and the process keeps every peak it ever had: a worker's memory
    would show its worst step, not what its ZeRO stage holds. False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def local_rank_zero_first(build):
    """Call ``build()`` on each node's local rank 0 first, then on the other workers (after a barrier).

    The first call builds the tiny models into the node's cache once instead of on every worker at the same time."""
    first = ray.train.get_context().get_local_rank() == 0
    distributed = dist.is_available() and dist.is_initialized()
    if first:
        result = build()
    if distributed:
        dist.barrier()
    return result if first else build()


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (model loading included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """This process's resident memory now; its maximum over training steps is what the ZeRO stage changes on CPU
    (ZeRO-3 keeps only this worker's shard of the weights between steps)."""
    return psutil.Process().memory_info().rss / 2**20
