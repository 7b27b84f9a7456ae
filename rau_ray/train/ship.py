"""Ship a trained checkpoint with the project: ``rau ship --checkpoint runs/train/grpo-tiny --name grpo``.

A shipped checkpoint is a checkpoint folder under ``weights/tiny/rau/<name>/`` (``$RAU_WEIGHTS/rau/<name>``): the
run's ``weights.safetensors`` (byte for byte, so its digest, which segmenters record, is unchanged), its
``history.jsonl``, its ``train_state.json`` and, for a policy (sft / grpo), the same adapter as a plain peft folder
(``adapter/`` + ``processor/`` + ``policy_config.json``: ``Policy.load`` or ``PeftModel.from_pretrained`` on the
tiny base with its ``<Seg>`` row). Anything that takes a checkpoint takes it by path or as ``shipped:<name>``
(``rau eval --checkpoint shipped:grpo``, ``RAUModel.from_checkpoint(policy="shipped:grpo")``, serve_configs).
A segmenter trained on a policy is shipped after that policy: its recorded ``policy_checkpoint`` (a path of the
training machine) becomes ``shipped:<name>`` of the shipped policy with the same weights digest. The folder is
written beside its place and renamed over it; a model card (README.md) already there is kept.
Use: ``rau ship --checkpoint runs/train/sft-tiny --name sft`` (``--step N``: that checkpoint of the run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rau_ray.errors import ConfigError
from rau_ray.models.checkpoint import (
    HISTORY,
    STATE,
    WEIGHTS,
    load_policy_checkpoint,
    locate_checkpoint,
    read_checkpoint,
    shipped_root,
    weights_digest,
)
from rau_ray.train.pretrain import export


def _run_checkpoint(source: str, step: int | None) -> str:
    """``source`` itself, or with ``step`` the ``checkpoint_*`` of run folder ``source`` at that step."""
    if step is None:
        return locate_checkpoint(source)
    steps = {json.loads((f / STATE).read_text()).get("step"): f for f in Path(source).glob("checkpoint_*")
             if (f / STATE).is_file()}
    if step not in steps:
        raise ConfigError(f"{source}: no checkpoint at step {step} (its checkpoints: steps {sorted(steps)})")
    return str(steps[step])


def _shipped_policy(digest: str, where: str) -> str:
    """``shipped:<name>`` of the shipped sft / grpo checkpoint whose weights have ``digest``."""
    root = shipped_root()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if (folder / STATE).is_file():
            ck = read_checkpoint(folder)
            if ck.kind in ("sft", "grpo") and weights_digest(ck) == digest:
                return f"shipped:{folder.name}"
    raise ConfigError(f"{where} was trained on the policy with weights sha256 {digest}, which is not shipped under "
                      f"{root}: ship that policy first (rau ship --checkpoint <its run> --name grpo)")


def ship(source: str, name: str, step: int | None = None) -> dict:
    """Copy checkpoint ``source`` (a run's latest, or its ``step``) to ``shipped:<name>``; returns what was shipped."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"ship: --name must be a plain folder name, not {name!r}")
    ck = read_checkpoint(_run_checkpoint(source, step))
    config = dict(ck.config)
    if ck.kind == "seg" and config.get("policy_checkpoint"):
        config["policy_checkpoint"] = _shipped_policy(config.get("policy_sha256") or "?", str(ck.path))

    def write(tmp: Path) -> None:
        shutil.copy2(ck.path / WEIGHTS, tmp / WEIGHTS)
        if (ck.path / HISTORY).is_file():
            shutil.copy2(ck.path / HISTORY, tmp / HISTORY)
        state = json.loads((ck.path / STATE).read_text())
        (tmp / STATE).write_text(json.dumps({**state, "config": config}, indent=1, default=str))
        if ck.kind in ("sft", "grpo"):
            load_policy_checkpoint(ck).save(tmp)

    history = ck.history()
    facts = {"shipped_from": str(ck.path), "kind": ck.kind, "step": ck.step, "weights_sha256": weights_digest(ck),
             "policy_checkpoint": config.get("policy_checkpoint"), "policy_sha256": config.get("policy_sha256"),
             "last_metrics": history[-1] if history else None}
    out = export(shipped_root() / name, write, facts)
    return {"shipped": f"shipped:{name}", "path": str(out), **facts}


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder or a training run folder (its latest)")
    p.add_argument("--name", required=True, help="the folder under weights/tiny/rau/ (then shipped:<name>)")
    p.add_argument("--step", type=int, help="ship the run's checkpoint at this step instead of its latest")
