"""Planning of the evaluation job, on the driver: the config, the checkpoints, the held-out targets, the work items.

``plan_eval(EvalConfig(...))`` -> ``Plan``: per manifest a ``Dataset`` (held-out targets, a seeded sample of
``max_targets``; in or out of the checkpoints' training distribution), checkpoints resolved by kind (a VLM+SAM2 pair
checked to belong together; a checkpoint trained on the evaluated split refused), and one item per target and kind
(``label``, ``segment``, ``volume``). ``worker_spec(plan)`` is what every model actor gets (``rau_ray.eval.worker``).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rau_ray.data.importers import read_dataset_json
from rau_ray.data.manifest import read_manifest
from rau_ray.data.tasks import label_boxes
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.checkpoint import (
    check_pair,
    combined_config,
    read_checkpoint,
)
from rau_ray.models.profiles import get_profile

KINDS = ("sft", "grpo", "seg", "cbam", "memref")
SEG_POLICIES = ("segmenter", "grpo", "sft")


@dataclass(frozen=True)
class EvalConfig:
    manifests: tuple[str, ...]  # datasets in the project's manifest format, one table row each
    out: str = "runs/eval"  # report folder
    checkpoints: tuple[str, ...] = ()  # checkpoint or run folders; the kind (sft/grpo/seg/cbam) is read from each
    sft: str | None = None  # or name each kind explicitly
    grpo: str | None = None
    seg: str | None = None
    cbam: str | None = None
    memref: str | None = None  # a seg checkpoint of mode memory-ref: the SAM2-Memory-Ref-SFT row
    profile: str = "tiny"  # the models no checkpoint supplies (retrieval, the SAM2 baseline) come from this profile
    split: str = "test"  # held-out targets
    reference_split: str = "train"  # references (the bank); a manifest without it (test-only, OOD): all rows
    max_targets: int = 0  # per dataset, a seeded sample; 0: every held-out target
    seg_structures: int = 0  # structures segmented per target (seeded); 0: every structure it shows
    volumes: tuple[str, ...] = ()  # dataset.json of 3D volume sets; their test cases are propagated
    volume_structures: tuple[str, ...] | None = None  # None: every structure a volume shows
    seg_policy: str = "segmenter"  # <Seg> of VLM+SAM2 from: the policy the segmenter trained with, or grpo / sft
    max_new_tokens: int = 0  # label answers; 0: the policy checkpoint's own evaluation budget
    label_batch: int = 8  # label questions answered in one generate call
    gallery_cases: int = 2  # per dataset: the worst and the best case (3: and the median)
    attention_cases: int = 4
    workers: int = 0  # model actors; 0: one per cluster CPU (per GPU with use_gpu)
    cpus_per_worker: float = 1
    use_gpu: bool = False
    backend: str = "ray"  # ray: Ray Data actors; local: one worker in this process
    seed: int = 0

    def validate(self) -> None:
        if not self.manifests:
            raise ConfigError("give at least one manifest (--manifest)")
        if self.seg_policy not in SEG_POLICIES:
            raise ConfigError(f"seg_policy must be one of {', '.join(SEG_POLICIES)}, got {self.seg_policy!r}")
        if self.backend not in ("ray", "local"):
            raise ConfigError(f"backend must be ray or local, got {self.backend!r}")
        if min(self.max_targets, self.seg_structures, self.max_new_tokens, self.workers, self.gallery_cases,
               self.attention_cases) < 0 or self.label_batch < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("max_targets, seg_structures, max_new_tokens, workers, gallery_cases and "
                              "attention_cases must be >= 0, label_batch >= 1, cpus_per_worker > 0")
        if self.split == self.reference_split:
            raise ConfigError(f"split and reference_split are both {self.split!r}: targets must be held out")



# -- planning on the driver --------------------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    manifest: str  # absolute path
    modality: str
    targets: list  # ManifestRow of the held-out split (sampled)
    held_out: int  # all rows of the split
    reference_split: str | None  # None: a test-only set, references are the other subjects
    distribution: str  # "in" or "out"
    bank: str = ""


@dataclass
class Plan:
    cfg: EvalConfig
    datasets: list[Dataset]
    checkpoints: dict  # kind -> Checkpoint
    model: object  # ModelConfig of retrieval / the SAM2 baseline
    items: list[dict] = field(default_factory=list)
    volumes: list[dict] = field(default_factory=list)


def resolve_checkpoints(cfg: EvalConfig) -> dict:
    found: dict = {}
    for kind in KINDS:
        path = getattr(cfg, kind)
        if path:
            found[kind] = read_checkpoint(path, kind=kind)
    for path in cfg.checkpoints:
        ck = read_checkpoint(path)
        if ck.kind in found and found[ck.kind].path != ck.path:
            raise ConfigError(f"two {ck.kind} checkpoints given ({found[ck.kind].source} and {path}); give one each")
        found[ck.kind] = ck
    if cfg.seg_policy != "segmenter" and cfg.seg_policy not in found and "seg" in found:
        raise ConfigError(f"seg_policy {cfg.seg_policy!r} needs a {cfg.seg_policy} checkpoint")
    if cfg.seg_policy != "segmenter" and "seg" in found:
        check_pair(found[cfg.seg_policy], found["seg"])  # the VLM+SAM2 rows pair them
    return found


def _dataset_names(paths: list[Path]) -> list[str]:
    names = []
    for p in paths:
        base = p.parent.name or "dataset"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def _training_sources(cks: dict) -> set[str]:
    """The manifest ``source`` values (e.g. "phantom:ct-abdomen") the checkpoints' training manifests hold."""
    sources: set[str] = set()
    for ck in cks.values():
        trained = ck.config.get("manifest")
        if trained and Path(trained).is_file():
            sources |= {r.source for r in read_manifest(trained).rows}
    return sources


def plan_eval(cfg: EvalConfig) -> Plan:
    """Datasets, held-out targets, work items; checks the checkpoints were not trained on the targets' split."""
    cfg.validate()
    cks = resolve_checkpoints(cfg)
    policy_ck = cks.get("grpo") or cks.get("sft")
    if "seg" in cks:  # the VLM+SAM2 model: the segmenter with its own policy, or the one seg_policy names
        model = combined_config(cks.get(cfg.seg_policy), cks["seg"], cfg.profile)
    else:
        model = policy_ck.model_config() if policy_ck else None
    if model is None:
        model = (cks["cbam"].model_config() if "cbam" in cks else get_profile(cfg.profile))
    paths = []
    for m in cfg.manifests:
        p = Path(m)
        paths.append((p / "manifest.jsonl" if p.is_dir() else p).resolve())
    trained_on = _training_sources(cks)
    datasets = []
    for path, name in zip(paths, _dataset_names(paths)):
        manifest = read_manifest(path)
        held = manifest.select(split=cfg.split)
        if not held:
            raise DataError(f"{path}: no rows in split {cfg.split!r} to evaluate on (held-out targets)")
        refs = manifest.select(split=cfg.reference_split)
        if refs:
            overlap = {r.subject for r in held} & {r.subject for r in refs} - {None, ""}
            if overlap:
                raise DataError(f"{path}: subjects {sorted(overlap)[:3]} are in both split {cfg.split!r} and "
                                f"{cfg.reference_split!r}; splits must be per subject")
        for ck in cks.values():
            trained = ck.config.get("manifest")
            split = ck.config.get("split", ck.config.get("train_split"))
            if trained and Path(trained).resolve() == path and split == cfg.split:
                raise ConfigError(f"{ck.source} was trained on split {split!r} of {path}: evaluate on held-out "
                                  f"subjects (another --split)")
        rng = np.random.default_rng([cfg.seed, len(datasets)])
        targets = held
        if cfg.max_targets and len(held) > cfg.max_targets:
            targets = [held[i] for i in sorted(rng.choice(len(held), cfg.max_targets, replace=False))]
        modality = max({r.modality for r in held}, key=lambda m: sum(r.modality == m for r in held))
        # in distribution: the checkpoints trained on this source (a held-out phantom set of another seed too);
        # without checkpoints that say, a set with a train split is, a test-only one is not
        inside = bool({r.source for r in held} & trained_on) if trained_on else bool(refs)
        datasets.append(Dataset(name, str(path), modality, targets, len(held), cfg.reference_split if refs else None,
                                "in" if inside else "out"))
    plan = Plan(cfg, datasets, cks, model)
    for n, ds in enumerate(datasets):
        manifest = read_manifest(ds.manifest)
        for row in ds.targets:
            base = {"dataset": ds.name, "manifest": ds.manifest, "target": row.id}
            if "sft" in cks or "grpo" in cks:
                plan.items.append({"kind": "label", **base})
            present = sorted(label_boxes(manifest.load(row)[1], row.label_names))
            rng = np.random.default_rng([cfg.seed, n, zlib.crc32(row.id.encode())])
            if cfg.seg_structures and len(present) > cfg.seg_structures:
                present = [present[i] for i in sorted(rng.choice(len(present), cfg.seg_structures, replace=False))]
            if present:
                plan.items.append({"kind": "segment", **base, "structures": present})
    for vol in cfg.volumes:
        p = Path(vol)
        p = p / "dataset.json" if p.is_dir() else p
        spec = read_dataset_json(p)
        name = p.parent.name
        cases = [c for c in spec.cases if c.split == cfg.split]
        plan.volumes.append({"dataset": name, "dataset_json": str(p.resolve()), "cases": [c.id for c in cases],
                             "modality": spec.modality})
        for c in cases:
            plan.items.insert(0, {"kind": "volume", "dataset": name, "dataset_json": str(p.resolve()),
                                  "case": c.id, "structures": list(cfg.volume_structures)
                                  if cfg.volume_structures is not None else None})
    return plan


def worker_spec(plan: Plan) -> dict:
    """What every model actor needs (plain JSON-able values): the model config, checkpoint paths, banks, budgets."""
    cfg = plan.cfg
    budgets = {}
    for kind in ("sft", "grpo"):
        ck = plan.checkpoints.get(kind)
        if ck is not None:
            budgets[kind] = cfg.max_new_tokens or int(ck.config.get("max_new_tokens")
                                                      or ck.config.get("max_completion_length") or 0)
    return {"model": asdict(plan.model), "device": "cuda" if cfg.use_gpu else "cpu",
            "checkpoints": {k: str(ck.path) for k, ck in plan.checkpoints.items()},
            "banks": {ds.name: ds.bank for ds in plan.datasets}, "seg_policy": cfg.seg_policy,
            "max_new_tokens": budgets, "label_batch": cfg.label_batch, "threads": cfg.cpus_per_worker}
