"""The evaluation job: held-out targets of any manifest -> predictions on Ray model actors -> tables + pictures.

For each manifest (a dataset): a reference bank over its train split (a test-only, out-of-distribution set: over all
its rows, a query's own subject always excluded), retrieval recall, then one work item per held-out target (``split``,
default test; a seeded sample of ``max_targets``):
- ``label``: every structure in the target is a region the SFT and GRPO policies name (``<think>/<answer>`` label
  task, the retrieved reference's boxes in the prompt); the OT / FGW rows re-assign the GRPO answers jointly;
- ``segment``: for each structure (all, or ``seg_structures`` of them): SAM2-Memory-Ref (SAM2's video memory, the
  reference as frame 0), VLM+SAM2 (``RAUModel.predict``: policy -> ``<Seg>`` -> memory fusion -> SAM2, with its
  attention over the reference's memory slots and per-stage timings) and CBAM-LoRA SAM2 prompted with the true box;
- ``volume``: each test case of a 3D volume set (``volumes``: dataset.json of an MSD / nnU-Net folder) and
  structure: SAM2's video predictor propagates the mask of the slice where the structure is largest through the
  volume; 3D Dice / HD95 over the volume.
Planning is ``rau_ray.eval.plan``, the model actors ``rau_ray.eval.worker``; this module is the driver.
Items run on Ray Data ``map_batches`` with a pool of model actors (``EvalWorker``: every model built once per actor,
lazily), a progress bar on the driver; ``backend="local"`` runs one worker in-process. Workers return prediction
records; every number comes from them in ``rau_ray.eval.tables``; ``rau_ray.eval.report`` writes ``report.md``,
``tables.md``, ``tables.json``, ``predictions.jsonl`` and ``pictures/``. A missing checkpoint leaves its rows n/a.
Use: ``rau eval --manifest data/ct/manifest.jsonl --checkpoint runs/train/sft --checkpoint runs/train/grpo
--checkpoint runs/train/seg --out runs/eval`` or ``run_eval(EvalConfig(manifests=(...,), checkpoints=(...,)))``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import ray.data
from tqdm import tqdm

from rau_ray import ray_session
from rau_ray.config import from_dict, load_config
from rau_ray.errors import ConfigError, RauError
from rau_ray.eval import report
from rau_ray.eval.plan import KINDS, EvalConfig, Plan, plan_eval, worker_spec
from rau_ray.eval.worker import EvalWorker, unpack
from rau_ray.models.retrieval import Embedder, ReferenceBank, recall_at_k


# -- running -----------------------------------------------------------------------------------------------------------
def _build_banks(plan: Plan, out: Path, backend: str) -> None:
    for ds in plan.datasets:
        bank = ReferenceBank.build(ds.manifest, plan.model.retrieval, split=ds.reference_split, backend=backend,
                                   progress=backend == "ray")
        ds.bank = str(bank.save(out / "banks" / ds.name).resolve())


def _recall(bank_dir: str, retrieval_cfg, manifest: str, split: str) -> dict:
    embedder = Embedder(retrieval_cfg)
    return recall_at_k(ReferenceBank.load(bank_dir, embedder), embedder, manifest, split=split)


def _ray_env(quiet: bool = False) -> dict:
    """The driver's model cache for the workers; ``quiet``: no per-call progress bars of sam2 / transformers in the
    actors' logs (the driver's bar counts items)."""
    env = {"RAU_CACHE": os.environ["RAU_CACHE"]} if "RAU_CACHE" in os.environ else {}
    if quiet:
        env.update(TQDM_DISABLE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    return {"env_vars": env} if env else {}


def retrieval_recall(plan: Plan, backend: str) -> dict:
    """recall@1/@5 per dataset (``recall_at_k``: same modality, nearest pose), one Ray task each."""
    if backend == "local":
        return {ds.name: _recall(ds.bank, plan.model.retrieval, ds.manifest, plan.cfg.split) for ds in plan.datasets}

    ray_session.connect()
    task = ray.remote(_recall).options(num_cpus=1, runtime_env=_ray_env() or None)
    refs = {ds.name: task.remote(ds.bank, plan.model.retrieval, ds.manifest, plan.cfg.split) for ds in plan.datasets}
    return {name: ray.get(ref) for name, ref in refs.items()}


def predict_all(plan: Plan, worker_cls=EvalWorker, progress: bool = True) -> list[dict]:
    """Every item through the model actors (Ray Data map_batches) or one in-process worker: prediction records."""
    spec = worker_spec(plan)
    items = plan.items
    records: list[dict] = []
    with tqdm(total=len(items), unit="item", desc="evaluating", disable=not progress) as bar:
        if plan.cfg.backend == "local" or not items:
            worker = worker_cls(spec)
            for item in items:
                records += worker.run(item)
                bar.update(1)
            return records

        ray_session.connect()
        ray.data.DataContext.get_current().enable_progress_bars = False  # this bar counts items instead
        cfg = plan.cfg
        slots = ray.cluster_resources().get("GPU", 0) if cfg.use_gpu else (ray_session.cluster_cpus()
                                                                            / cfg.cpus_per_worker)
        workers = max(1, min(cfg.workers or int(slots), len(items)))
        ds = ray.data.from_items([{"item": json.dumps(it)} for it in items], override_num_blocks=len(items))
        pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)  # no queue behind a slow item
        ds = ds.map_batches(worker_cls, fn_constructor_kwargs={"spec": spec}, batch_size=1, compute=pool,
                            num_cpus=cfg.cpus_per_worker, num_gpus=1 if cfg.use_gpu else None,
                            runtime_env=_ray_env(quiet=True))
        for row in ds.iter_rows():
            records += unpack(str(row["records"]), bytes(row["arrays"]))
            bar.update(1)
    return records


def run_eval(cfg: EvalConfig, command: str | None = None, worker_cls=EvalWorker, progress: bool = True) -> dict:
    """Plan, build banks, measure recall, predict every item, write the report; returns its summary."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    plan = plan_eval(cfg)
    out.mkdir(parents=True, exist_ok=True)
    _build_banks(plan, out, cfg.backend)
    recall = retrieval_recall(plan, cfg.backend)
    records = predict_all(plan, worker_cls, progress)
    header = report.header(plan, command or " ".join(shlex.quote(a) for a in sys.argv), time.perf_counter() - t0)
    return report.write_report(out, plan, records, recall, header)


# -- command line and Ray job ------------------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("--config", help="eval config YAML (fields of rau_ray.eval.plan.EvalConfig)")
    parser.add_argument("--manifest", action="append", help="a dataset's manifest.jsonl (or folder); repeat for more")
    parser.add_argument("--checkpoint", action="append", help="a checkpoint or run folder (sft, grpo, seg, cbam or "
                                                              "memref: read from it); repeat for more")
    for kind in KINDS:
        parser.add_argument(f"--{kind}", help=f"the {kind} checkpoint or run folder (instead of --checkpoint)")
    parser.add_argument("--out", help="report folder (default: runs/eval)")
    parser.add_argument("--split", help="held-out split of the targets (default: test)")
    parser.add_argument("--volumes", action="append", help="dataset.json of a 3D volume set (slice propagation)")
    parser.add_argument("--volume-structures", help="comma-separated structures to propagate (default: all)")
    parser.add_argument("--max-targets", type=int, help="held-out targets per dataset (seeded sample; 0: all)")
    parser.add_argument("--seg-structures", type=int, help="structures segmented per target (0: all)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--profile", choices=("tiny", "paper"), help="models no checkpoint supplies (default tiny)")
    parser.add_argument("--workers", type=int, help="model actors (default: one per CPU)")
    parser.add_argument("--backend", choices=("ray", "local"))


def config_from_args(args) -> EvalConfig:
    overrides = {"manifests": args.manifest, "checkpoints": args.checkpoint, "out": args.out, "split": args.split,
                 "volumes": args.volumes, "max_targets": args.max_targets, "seg_structures": args.seg_structures,
                 "seed": args.seed, "profile": args.profile, "workers": args.workers, "backend": args.backend,
                 **{k: getattr(args, k) for k in KINDS},
                 "volume_structures": [s.strip() for s in args.volume_structures.split(",") if s.strip()]
                 if args.volume_structures else None}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.config:
        return load_config(args.config, EvalConfig, overrides)
    if not overrides.get("manifests"):
        raise ConfigError("give --manifest (or --config with manifests)")
    return from_dict(EvalConfig, overrides, "rau eval")


def main() -> None:
    """Entry point of ``jobs/eval.py``."""
    parser = argparse.ArgumentParser(description="Ray job: evaluation report (rau_ray.eval.evaluate).")
    add_arguments(parser)
    args = parser.parse_args()
    try:
        print(json.dumps(run_eval(config_from_args(args)), indent=2, default=str))
    except RauError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
