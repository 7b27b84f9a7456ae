"""Pretraining the tiny backbones on Ray Train: what the SAM2, DINOv2 and Qwen2.5-VL-base jobs share.

Each job (``pretrain_sam2``, ``pretrain_dino``, ``pretrain_policy``) trains the whole model from the tiny profile's
random init (``init: random``) on generic procedural scenes (``rau_ray.data.scenes``) and, at most, the *train*
split of the in-distribution phantoms made with the pretraining data seed, which no dataset, test or benchmark
uses. Checkpoints, resume and curves are ``rau_ray.train.run``'s. At the end the driver exports the last weights
in the layout the profile loads hub weights from (``save_pretrained`` folders; SAM2 a safetensors state dict) into
``out``: written in a temp folder beside it and renamed, so an interrupted export leaves the old weights.
Use: ``rau pretrain sam2 --config jobs/configs/pretrain-sam2-tiny.yaml`` (``jobs/pretrain.py`` for ray job submit).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rau_ray.atomic import atomic_dir
from rau_ray.data.manifest import assign_splits
from rau_ray.data.phantoms.common import subject_id
from rau_ray.errors import ConfigError

IN_DISTRIBUTION = ("ct-abdomen", "xray-angio")  # ultrasound and xray-msk are never trained on by anything
PRETRAIN_DATA_SEED = 1001  # phantom subjects of pretraining; datasets use 0.., held-out benchmarks 7777
BENCHMARK_SEED = 7777  # benchmarks/backbones.py: subjects and scenes no training run saw


@dataclass(frozen=True)
class PretrainData:
    """What a pretraining run sees: scenes and the train split of phantom subjects (``data:`` in the YAML)."""

    scenes: int = 2000  # generic scenes (seeded stream ``seed``), re-drawn with new augmentations each epoch
    phantoms: tuple[str, ...] = ("ct-abdomen",)  # in-distribution phantoms only
    phantom_subjects: int = 60  # subjects made per phantom; only those assign_splits puts in train are used
    seed: int = PRETRAIN_DATA_SEED  # scenes and phantom subjects; never a dataset's or a benchmark's seed
    size: int = 128  # image side in pixels

    def validate(self) -> None:
        bad = [p for p in self.phantoms if p not in IN_DISTRIBUTION]
        if bad:
            raise ConfigError(f"data.phantoms: {', '.join(bad)} cannot be pretrained on (out of distribution or "
                              f"unknown); choose from {', '.join(IN_DISTRIBUTION)}")
        if self.scenes < 0 or self.phantom_subjects < 0 or self.scenes + self.phantom_subjects == 0:
            raise ConfigError("data.scenes and data.phantom_subjects must be >= 0 and not both 0")
        if self.seed == BENCHMARK_SEED:
            raise ConfigError(f"data.seed {BENCHMARK_SEED} is the held-out benchmark's seed; pick another")
        if not 32 <= self.size <= 512:
            raise ConfigError(f"data.size must be within 32..512 px, got {self.size}")


def phantom_train_subjects(data: PretrainData) -> dict[str, list[int]]:
    """Subject indices per phantom that ``assign_splits`` puts in train for ``data.seed`` (val/test never used)."""
    out = {}
    for name in data.phantoms:
        ids = [subject_id(i) for i in range(data.phantom_subjects)]
        split = assign_splits(ids, seed=data.seed)
        out[name] = [i for i, s in enumerate(ids) if split[s] == "train"]
    return out


def export(out: str | os.PathLike, write: Callable[[Path], None], facts: dict) -> Path:
    """Write a weights folder atomically: ``write(tmp)`` fills a temp folder beside ``out`` (plus ``training.json``
    with ``facts``: data, objective, steps, wall time, command, seed), which then replaces ``out``. A model card
    (README.md) already in ``out`` is kept."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        write(tmp)
        facts = {"command": " ".join(sys.argv), "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 **facts}
        (tmp / "training.json").write_text(json.dumps(facts, indent=1, default=str))
        if (out / "README.md").is_file():
            shutil.copy2(out / "README.md", tmp / "README.md")
        for f in tmp.rglob("*"):  # a weights folder is for everyone who can read the checkout
            f.chmod(0o755 if f.is_dir() else 0o644)
    return out


def job_facts(cfg, result, objective: str, started: float) -> dict:
    """What a model card says about a run: its config, objective, steps, wall time and last metrics."""
    return {"objective": objective, "config": asdict(cfg), "wall_time_s": round(time.time() - started, 1),
            "metrics": result.metrics}
