"""The one owner of the checkpoint layout and its loader: a training run's checkpoint folder -> the model it trained.

A checkpoint folder (``write_checkpoint``, called by every training job through ``rau_ray.train.run.report``) holds
``weights.safetensors`` (only what the job trained), ``train_state.json`` ({"step", "config": the job's config, whose
``model`` section rebuilds the model}) and ``history.jsonl`` (the metric rows). Its kind follows from the config:
``sft`` / ``grpo`` (a policy adapter: LoRA + the ``<Seg>`` rows, named as peft's ``get_peft_model_state_dict``),
``seg`` (RAU's projector + memory fusion + SAM2 mask decoder, named as ``RAUSegmenter.trainable_state_dict``, plus
``policy.``-prefixed adapter keys when the policy's LoRA trained too) or ``cbam`` (SAM2's CBAM + LoRA (+ decoder)
parameters, named as in the SAM2 model). Loading is strict: a missing or unexpected tensor name is a DataError, a
shape that does not fit the rebuilt model a ConfigError. Safetensors only, never pickle. A run folder
(``checkpoint_*/`` inside, or its ``summary.json``) means its latest checkpoint; of an ``s3://`` or ``gs://`` URI
only that checkpoint is downloaded, once per node, into the local cache (``rau_ray.storage.local_copy``);
``file://`` URIs are local folders; ``shipped:<name>`` is the checkpoint the project ships in
``weights/tiny/rau/<name>`` (``rau ship``).
Use: ``write_checkpoint(folder, weights, step, config, history)``; ``read_weights_and_state(folder)`` and
``read_history(folder)`` (any job's checkpoint, local or a URI); ``ck = read_checkpoint("runs/train/sft")``;
``policy = load_policy_checkpoint(ck)``; ``RAUModel.from_checkpoint(policy="runs/train/grpo",
segmenter="runs/train/seg", bank_dir="banks/ct")``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rau_ray import storage
from rau_ray.errors import ConfigError, DataError, RauError
from rau_ray.models.cbam_lora import add_cbam_lora
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.policy import load_policy
from rau_ray.models.pretrained import weights_root
from rau_ray.models.profiles import get_profile, model_config_from
from rau_ray.models.sam2_builder import build_sam2_model

WEIGHTS = "weights.safetensors"  # what the job trained, nothing else
STATE = "train_state.json"  # {"step": N, "config": the job's config}
HISTORY = "history.jsonl"  # one metric row per line
KINDS = ("sft", "grpo", "seg", "cbam")
POLICY_PREFIX = "policy."  # a seg checkpoint that trained the policy's LoRA too keeps the adapter under this prefix


@dataclass
class Checkpoint:
    path: Path  # the local checkpoint folder
    kind: str  # sft | grpo | seg | cbam
    step: int
    config: dict  # the training job's config (train_state.json)
    weights: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)
    source: str = ""  # what was asked for (a run folder, a URI), for reports
    digest: str = field(default="", repr=False)  # weights_digest, computed once

    @property
    def model_section(self) -> dict:
        section = self.config.get("model")
        return section if isinstance(section, dict) else {"profile": "tiny"}

    def model_config(self):
        """The ModelConfig the job trained (profile + its overrides; cbam's decoder flag as the job set it)."""
        cfg = model_config_from(self.model_section, f"{self.path / STATE}: model")
        if self.kind == "cbam":
            cfg = replace(cfg, cbam_lora=replace(cfg.cbam_lora, train_mask_decoder=bool(
                self.config.get("train_mask_decoder", True))))
        return cfg

    def history(self) -> list[dict]:
        return read_history(self.path)

    def describe(self) -> dict:
        """Provenance for reports: where, what kind, which step, trained on which manifest."""
        return {"kind": self.kind, "path": str(self.path), "source": self.source, "step": self.step,
                "run": self.config.get("name"), "manifest": self.config.get("manifest"),
                "train_split": self.config.get("split", self.config.get("train_split")),
                "seed": self.config.get("seed")}


# -- the layout ------------------------------------------------------------------------------------------------------
def write_checkpoint(folder: str | os.PathLike, weights: dict[str, torch.Tensor], step: int, config: dict,
                     history: list[dict] | tuple = ()) -> Path:
    """A checkpoint in ``folder`` (created; Ray Train then moves it into the run's storage): the weights, the step and
    job config, the metric rows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS))
    (folder / STATE).write_text(json.dumps({"step": step, "config": config}))
    (folder / HISTORY).write_text("".join(json.dumps(row) + "\n" for row in history))
    return folder


def read_weights_and_state(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, train_state) of any job's checkpoint folder (a URI's: downloaded once per node,
    ``storage.local_copy``); a clear DataError when it is not one."""
    where, folder = folder, storage.local_copy(folder, "checkpoint")
    if not (folder / WEIGHTS).is_file() or not (folder / STATE).is_file():
        raise DataError(f"{where}: not a training checkpoint (expected {WEIGHTS} and {STATE})")
    return load_file(str(folder / WEIGHTS)), json.loads((folder / STATE).read_text())


def read_history(folder: str | os.PathLike) -> list[dict]:
    """The metric rows of a checkpoint folder (local or a URI: only history.jsonl is read); [] without one."""
    path = storage.join(folder, HISTORY)
    if not storage.is_file(path):
        return []
    return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


# -- the loader ------------------------------------------------------------------------------------------------------
def checkpoint_kind(config: dict, where: str = "checkpoint") -> str:
    """sft / grpo / seg / cbam / memref from the job config a checkpoint recorded."""
    if not isinstance(config, dict):
        raise DataError(f"{where}: train_state.json has no job config")
    if "mode" in config:
        if config["mode"] == "rau":
            return "seg"
        if config["mode"] == "cbam-lora":
            return "cbam"
        if config["mode"] == "memory-ref":
            return "memref"
        raise DataError(f"{where}: unknown segmenter mode {config['mode']!r}")
    if "num_generations" in config:
        return "grpo"
    if "zero_stage" in config and "tasks" in config:
        return "sft"
    raise DataError(f"{where}: cannot tell which training job wrote this checkpoint (its config names no mode, "
                    "num_generations or zero_stage)")


def _step(folder) -> int:
    try:
        return int(json.loads(storage.read_text(storage.join(folder, STATE))).get("step", -1))
    except (DataError, ValueError, AttributeError):
        return -1


def _is_checkpoint(folder) -> bool:
    return storage.is_file(storage.join(folder, WEIGHTS)) and storage.is_file(storage.join(folder, STATE))


SHIPPED = "shipped:"  # shipped:<name>: the checkpoint the project ships in weights/tiny/rau/<name> (rau ship)


def shipped_root() -> Path:
    """Where shipped checkpoints live: ``rau/`` beside the shipped tiny backbones ($RAU_WEIGHTS, else weights/tiny)."""
    return weights_root() / "rau"


def locate_checkpoint(source: str | os.PathLike) -> str:
    """Where the checkpoint folder ``source`` means lies (nothing downloaded): ``source`` itself, or the latest
    (highest step) ``checkpoint_*`` of a run folder, or the checkpoint its ``summary.json`` names, or for
    ``shipped:<name>`` the shipped checkpoint of that name. A local path comes back absolute, a URI as a URI."""
    text = str(source)
    if text.startswith(SHIPPED):
        name, root = text[len(SHIPPED):], shipped_root()
        folder = root / name
        if not name or "/" in name or not _is_checkpoint(str(folder)):
            have = sorted(f.name for f in root.iterdir() if _is_checkpoint(str(f))) if root.is_dir() else []
            raise DataError(f"{source}: no shipped checkpoint of that name in {root} (shipped: "
                            f"{', '.join(have) or 'none'})")
        return str(folder.resolve())
    if not storage.is_remote(text):
        text = str(storage.local_copy(text).resolve())  # a folder or a file:// URI: an absolute local path
    if not storage.is_dir(text, "checkpoint"):
        raise DataError(f"{source}: no such checkpoint folder")
    if _is_checkpoint(text):
        return text
    candidates = [str(storage.join(text, name)) for name in storage.list_dir(text) if name.startswith("checkpoint_")]
    candidates = [c for c in candidates if _is_checkpoint(c)]
    if not candidates and storage.is_file(storage.join(text, "summary.json")):
        try:
            named = json.loads(storage.read_text(storage.join(text, "summary.json"))).get("checkpoint")
        except (DataError, ValueError, AttributeError):
            named = None
        if isinstance(named, str) and named and storage.is_dir(named) and _is_checkpoint(named):
            return named if storage.is_remote(named) else str(storage.local_copy(named).resolve())
    if not candidates:
        raise DataError(f"{source}: not a training checkpoint (expected {WEIGHTS} and {STATE}) nor a run folder "
                        f"with checkpoint_*/ folders")
    return max(candidates, key=lambda c: (_step(c), c))


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """The local checkpoint folder ``source`` means (see ``locate_checkpoint``); a URI's checkpoint is downloaded
    once per node (``storage.local_copy``)."""
    return storage.local_copy(locate_checkpoint(source), "checkpoint").resolve()


def read_checkpoint(source: str | os.PathLike, kind: str | None = None) -> Checkpoint:
    """Read a checkpoint (or a run's latest); ``kind`` given: a ConfigError when the folder holds another kind."""
    folder = resolve_checkpoint(source)
    try:
        state = json.loads((folder / STATE).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{folder / STATE}: unreadable ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise DataError(f"{folder / STATE}: expected {{\"step\": N, \"config\": {{...}}}}")
    found = checkpoint_kind(state["config"], str(folder))
    if kind is not None and found != kind:
        raise ConfigError(f"{source}: a {found} checkpoint, not a {kind} one")
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{folder / WEIGHTS}: unreadable safetensors ({e})") from None
    return Checkpoint(folder, found, int(state.get("step", 0)), state["config"], weights, str(source))


def _check_names(weights: dict, expected: dict, where: str) -> None:
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        parts = ([f"{len(missing)} missing (e.g. {missing[0]!r})"] if missing else []) + (
            [f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})"] if unexpected else [])
        raise DataError(f"{where}: the checkpoint's tensors do not match the model its config builds: "
                        f"{', '.join(parts)}")
    for name, tensor in weights.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ConfigError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, the model "
                              f"{tuple(expected[name].shape)}; was it trained with another model config?")


def load_adapter_weights(policy, weights: dict[str, torch.Tensor], where: str) -> None:
    """A saved adapter (LoRA + trainable <Seg> rows) into the policy's ``default`` adapter, every name checked."""
    _check_names(weights, get_peft_model_state_dict(policy.model), where)
    set_peft_model_state_dict(policy.model, weights)


def weights_digest(ck: Checkpoint) -> str:
    """The first 16 hex digits of the sha256 of the checkpoint's weights file: what names a trained policy wherever
    its folder is copied (a segmenter records the digest of the policy it learned from)."""
    if not ck.digest:
        h = hashlib.sha256()
        with open(ck.path / WEIGHTS, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        ck.digest = h.hexdigest()[:16]
    return ck.digest


def own_adapter(segmenter: Checkpoint) -> dict[str, torch.Tensor]:
    """The policy adapter a seg checkpoint trained jointly (``policy.``-prefixed keys, prefix removed); {} if none."""
    return {k[len(POLICY_PREFIX):]: v for k, v in segmenter.weights.items() if k.startswith(POLICY_PREFIX)}


def trained_policy(segmenter: Checkpoint) -> str:
    """In words, the policy a seg checkpoint's segmenter learned its ``<Seg>`` states from."""
    if own_adapter(segmenter):
        return "its own policy adapter (trained jointly, kept in the checkpoint)"
    path = segmenter.config.get("policy_checkpoint")
    if path:
        return f"the policy checkpoint {path} (weights sha256 {segmenter.config.get('policy_sha256') or '?'})"
    return "the profile's base policy (no policy_checkpoint)"


def check_pair(policy: Checkpoint | None, segmenter: Checkpoint | None) -> None:
    """A ConfigError naming both unless ``segmenter`` (a seg checkpoint) learned from ``policy`` (sft / grpo): the
    projector maps one policy's ``<Seg>`` states into SAM2's space, another policy's states are noise to it."""
    if policy is None or segmenter is None or segmenter.kind != "seg" or policy.kind not in ("sft", "grpo"):
        return
    recorded = segmenter.config.get("policy_sha256") or None
    if own_adapter(segmenter) or recorded != weights_digest(policy):
        raise ConfigError(
            f"the segmenter {segmenter.source} was trained on the <Seg> states of {trained_policy(segmenter)}, not "
            f"on the {policy.kind} policy {policy.source} (weights sha256 {weights_digest(policy)}): serve each "
            f"segmenter with its own policy (leave the policy out to use it), or train one on this policy "
            f"(rau train seg with policy_checkpoint: {policy.source})")


def recorded_policy(path: str, sha256: str | None, where: str) -> Checkpoint:
    """The policy checkpoint a segmenter recorded (``policy_checkpoint``), unchanged since (``sha256``, its
    ``weights_digest``; None: not checked): a DataError when it cannot be read, a ConfigError when it changed."""
    try:
        ck = read_checkpoint(path)
    except RauError as e:
        raise DataError(f"{where}: the policy checkpoint its segmenter was trained with cannot be read ({e}); give "
                        "that policy explicitly") from None
    if sha256 and weights_digest(ck) != sha256:
        raise ConfigError(f"{where}: its policy checkpoint {ck.source} has changed since the segmenter was trained "
                          f"(weights sha256 {weights_digest(ck)}, recorded {sha256})")
    return ck


def load_policy_checkpoint(ck: Checkpoint, device: str | torch.device = "cpu", model_cfg=None):
    """The policy (Qwen2.5-VL + LoRA) of an sft / grpo checkpoint, or the one a seg checkpoint trained with (its
    recorded ``policy_checkpoint``, whose digest must still match; its own adapter when it trained one)."""
    if ck.kind == "cbam":
        raise ConfigError(f"{ck.source}: a cbam checkpoint holds no policy")
    cfg = model_cfg or ck.model_config()
    weights = ck.weights if ck.kind in ("sft", "grpo") else own_adapter(ck)
    if ck.kind == "seg" and ck.config.get("policy_checkpoint"):
        base = recorded_policy(ck.config["policy_checkpoint"], ck.config.get("policy_sha256") or "?", ck.source)
        policy = load_policy_checkpoint(base, device, replace(cfg, policy=base.model_config().policy))
        if weights:
            load_adapter_weights(policy, weights, str(ck.path))
        policy.model.to(device).eval()
        return policy
    torch.manual_seed(int(ck.config.get("seed", 0)))  # a seg checkpoint's untrained adapter as the job built it
    policy = load_policy(cfg.policy)
    if weights or ck.kind in ("sft", "grpo"):
        load_adapter_weights(policy, weights, str(ck.path))
    policy.model.to(device).eval()
    return policy


def load_segmenter_checkpoint(ck: Checkpoint, device: str = "cpu"):
    """RAU's segmenter (SAM2 + projector + memory fusion) of a seg checkpoint, trained parts loaded."""
    if ck.kind != "seg":
        raise ConfigError(f"{ck.source}: a {ck.kind} checkpoint, not a segmenter (seg, mode rau) one")
    cfg = ck.model_config()
    torch.manual_seed(int(ck.config.get("seed", 0)))
    segmenter = RAUSegmenter(build_sam2_model(replace(cfg.sam2, device=str(device))), cfg.fusion)
    weights = {k: v for k, v in ck.weights.items() if not k.startswith(POLICY_PREFIX)}
    _check_names(weights, segmenter.trainable_state_dict(), str(ck.path))
    segmenter.load_state_dict(weights, strict=False)
    return segmenter.to(device).eval()


def load_cbam_checkpoint(ck: Checkpoint, device: str = "cpu"):
    """SpinalSAM-R1's SAM2 with CBAM + LoRA (mode cbam-lora), trained parts loaded; prompt it with
    ``predictor_for(model)`` as any SAM2."""
    if ck.kind != "cbam":
        raise ConfigError(f"{ck.source}: a {ck.kind} checkpoint, not a cbam-lora segmenter one")
    cfg = ck.model_config()
    torch.manual_seed(int(ck.config.get("seed", 0)))
    sam = add_cbam_lora(build_sam2_model(replace(cfg.sam2, device=str(device))), cfg.cbam_lora)
    expected = {n: p for n, p in sam.named_parameters() if p.requires_grad}
    _check_names(ck.weights, expected, str(ck.path))
    sam.load_state_dict(ck.weights, strict=False)
    return sam.to(device).eval()


def load_memref_checkpoint(ck: Checkpoint, device: str = "cpu"):
    """SAM2-Memory-Ref-SFT (seg mode memory-ref): the RAUSegmenter with its fine-tuned decoder, used with
    ``seg_hidden=None`` (``predict(target, None, memory)``)."""
    if ck.kind != "memref":
        raise ConfigError(f"{ck.source}: a {ck.kind} checkpoint, not a memory-ref segmenter one")
    cfg = ck.model_config()
    seg = RAUSegmenter(build_sam2_model(replace(cfg.sam2, device=str(device))), cfg.fusion).memory_only()
    _check_names(ck.weights, seg.trainable_state_dict(), str(ck.path))
    seg.load_state_dict(ck.weights, strict=False)
    return seg.to(device).eval()


def combined_config(policy: Checkpoint | None = None, segmenter: Checkpoint | None = None, profile: str = "tiny"):
    """One ModelConfig for a policy checkpoint and a segmenter checkpoint used together: the segmenter's (its SAM2 and
    fusion), with the policy checkpoint's policy section; either alone: its own; neither: ``profile``."""
    check_pair(policy, segmenter)
    if segmenter is not None:
        cfg = segmenter.model_config()
        if policy is not None:
            cfg = replace(cfg, policy=policy.model_config().policy)
            try:
                cfg.validate()
            except ConfigError as e:
                raise ConfigError(f"{policy.source} and {segmenter.source} do not fit together: {e}") from None
        return cfg
    if policy is not None:
        return policy.model_config()
    return get_profile(profile)
