"""``rau export CHECKPOINT --out DIR``: a training checkpoint as artifacts others load without this project's loader.

``DIR`` is a plain peft adapter folder of the policy: ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA and
the trained ``<Seg>`` rows) beside the processor saved with ``save_pretrained`` (its tokenizer has ``<Seg>``), so

    processor = AutoProcessor.from_pretrained(DIR)
    base = AutoModelForImageTextToText.from_pretrained(<the base>)       # Qwen2.5-VL; tiny: weights/tiny/qwen2_5_vl
    base.resize_token_embeddings(len(processor.tokenizer))                # the tiny base has no spare row for <Seg>
    model = PeftModel.from_pretrained(base, DIR)

gives the policy ``RAUModel.from_checkpoint`` / ``load_policy_checkpoint`` builds (tests/unit/models/test_export.py
compares their logits). An RAU segmenter checkpoint (kind seg) exports the policy it learned its ``<Seg>`` states from
(the one it recorded, checked by digest) plus ``segmenter/``: ``model.safetensors`` (the trained projector, memory
fusion and SAM2 mask decoder, as ``RAUSegmenter.trainable_state_dict`` names them) and ``config.json`` (the model
section that rebuilds it: SAM2 + fusion; ``load_exported_segmenter``). Also ``README.md``, a model card (base model,
data manifest, steps, the run's last metrics, the command that trained it), ``train_config.yaml`` (the job config the
checkpoint recorded: ``rau train <job> --config train_config.yaml`` trains it again), ``history.jsonl`` and
``export.json`` (source, step, digests, the export command).
A checkpoint without a policy (a CBAM-LoRA or memory-ref segmenter, a segmenter trained on the bare base policy) is
refused naming it, and an existing non-empty ``DIR`` unless ``overwrite``, before anything is written; ``DIR`` is
filled as a temp folder beside it and renamed into place (``atomic.atomic_dir``).
Use: ``rau export shipped:seg --out exports/rau-tiny`` or ``export_checkpoint("runs/train/grpo-tiny", "out/grpo")``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from rau_ray.atomic import atomic_dir
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.checkpoint import (
    HISTORY,
    Checkpoint,
    _check_names,
    load_policy_checkpoint,
    load_segmenter_checkpoint,
    own_adapter,
    read_checkpoint,
    recorded_policy,
    weights_digest,
)
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.profiles import model_config_from
from rau_ray.models.prompts import SEG_TOKEN
from rau_ray.models.sam2_builder import build_sam2_model

JOBS = {"sft": "sft", "grpo": "grpo", "seg": "seg"}  # checkpoint kind -> `rau train` job
SEGMENTER = "segmenter"  # the segmenter's subfolder
METRICS_SHOWN = 24  # rows of the card's metric table


def _policy_source(ck: Checkpoint) -> Checkpoint | None:
    """The checkpoint whose policy adapter an export of ``ck`` carries (itself for sft / grpo, the recorded policy
    of a seg checkpoint, or the seg checkpoint itself when it trained the policy's LoRA); ConfigError when none."""
    if ck.kind in ("sft", "grpo"):
        return ck
    if ck.kind == "seg":
        if own_adapter(ck):
            return ck
        if ck.config.get("policy_checkpoint"):
            return recorded_policy(ck.config["policy_checkpoint"], ck.config.get("policy_sha256") or None, ck.source)
        raise ConfigError(f"{ck.source}: this segmenter checkpoint ({ck.path}) was trained on the profile's bare base "
                          "policy, so it holds no policy adapter to export; export the sft / grpo checkpoint it "
                          "should pair with, or train the segmenter with policy_checkpoint set")
    raise ConfigError(f"{ck.source}: a {ck.kind} checkpoint ({ck.path}) holds no policy; rau export writes a policy "
                      "adapter (peft): give an sft or grpo checkpoint, or an RAU segmenter (seg, mode rau) one, "
                      "which brings the policy it was trained with")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: exists and is not empty; choose another folder or pass --overwrite "
                          "(its contents are then replaced)")


def export_checkpoint(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> dict:
    """Export checkpoint ``source`` (a folder, a run's latest, a URI or ``shipped:<name>``) into folder ``out``;
    returns what was written (export.json's facts)."""
    out = Path(out).expanduser().resolve()
    _check_out(out, overwrite)
    ck = read_checkpoint(source)
    policy_ck = _policy_source(ck)
    facts = {"source": str(source), "path": str(ck.path), "kind": ck.kind, "step": ck.step,
             "weights_sha256": weights_digest(ck), "command": " ".join(["rau", *sys.argv[1:]])
             if Path(sys.argv[0]).name == "rau" else " ".join(sys.argv),
             "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if policy_ck is not ck:
        facts["policy"] = {"source": policy_ck.source, "path": str(policy_ck.path), "kind": policy_ck.kind,
                           "step": policy_ck.step, "weights_sha256": weights_digest(policy_ck)}
    with atomic_dir(out) as tmp:
        policy = load_policy_checkpoint(ck)  # the same loader eval and Serve use (a seg: its recorded policy)
        policy.model.save_pretrained(tmp)
        policy.processor.save_pretrained(tmp)
        facts["base_model"] = policy.model.peft_config["default"].base_model_name_or_path
        facts["seg_token_id"] = policy.seg_token_id
        facts["files"] = ["adapter_config.json", "adapter_model.safetensors"]
        if ck.kind == "seg":
            segmenter = load_segmenter_checkpoint(ck)
            (tmp / SEGMENTER).mkdir()
            save_file(segmenter.trainable_state_dict(), str(tmp / SEGMENTER / "model.safetensors"))
            cfg = ck.model_config()
            (tmp / SEGMENTER / "config.json").write_text(json.dumps({
                "kind": "rau-segmenter", "model": ck.model_section, "sam2": asdict(cfg.sam2),
                "fusion": asdict(cfg.fusion), "policy_sha256": weights_digest(policy_ck), "step": ck.step,
                "load": "rau_ray.models.export.load_exported_segmenter(folder)"}, indent=1, default=str))
            facts["files"] += [f"{SEGMENTER}/model.safetensors", f"{SEGMENTER}/config.json"]
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(ck.config, sort_keys=False))
        if policy_ck is not ck:
            (tmp / "policy_train_config.yaml").write_text(yaml.safe_dump(policy_ck.config, sort_keys=False))
        if (ck.path / HISTORY).is_file():
            (tmp / HISTORY).write_bytes((ck.path / HISTORY).read_bytes())
        (tmp / "README.md").write_text(model_card(ck, policy_ck, facts, policy.cfg))  # replaces peft's template
        (tmp / "export.json").write_text(json.dumps(facts, indent=1, default=str))
        for f in tmp.rglob("*"):  # for whoever may read the folder (safetensors and mkdtemp write private modes)
            f.chmod(0o755 if f.is_dir() else 0o644)
    return {"out": str(out), **facts}


def load_exported_segmenter(folder: str | os.PathLike, device: str = "cpu") -> RAUSegmenter:
    """The RAU segmenter of an export: SAM2 + projector + memory fusion rebuilt from ``segmenter/config.json``, its
    trained tensors from ``segmenter/model.safetensors`` (every name checked)."""
    folder = Path(folder)
    sub = folder / SEGMENTER if (folder / SEGMENTER).is_dir() else folder
    if not (sub / "config.json").is_file() or not (sub / "model.safetensors").is_file():
        raise DataError(f"{folder}: no exported segmenter (expected {SEGMENTER}/config.json and model.safetensors)")
    saved = json.loads((sub / "config.json").read_text())
    cfg = model_config_from(saved["model"], f"{sub / 'config.json'}: model")
    segmenter = RAUSegmenter(build_sam2_model(replace(cfg.sam2, device=str(device))), cfg.fusion)
    weights = load_file(str(sub / "model.safetensors"))
    _check_names(weights, segmenter.trainable_state_dict(), str(sub))
    segmenter.load_state_dict(weights, strict=False)
    return segmenter.to(device).eval()


def _last_metrics(history: list[dict]) -> list[tuple[str, float, int]]:
    """(metric, its last value, at step) over a run's history rows."""
    last: dict[str, tuple[float, int]] = {}
    for row in history:
        for key, value in row.items():
            if key not in ("step", "resumed_from") and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                last[key] = (float(value), int(row.get("step", -1)))
    val = sorted(k for k in last if k.startswith(("val_", "reward", "rewards/")))
    rest = sorted(k for k in last if k not in val)
    return [(k, *last[k]) for k in (val + rest)[:METRICS_SHOWN]]


def _describe_run(ck: Checkpoint, config_file: str) -> list[str]:
    cfg = ck.config
    job = JOBS.get(ck.kind, ck.kind)
    lines = [f"- checkpoint: `{ck.source}` (`{ck.path}`), kind {ck.kind}, step {ck.step}, weights sha256 "
             f"{weights_digest(ck)}",
             f"- data: manifest `{cfg.get('manifest')}`, split {cfg.get('split', cfg.get('train_split'))!r}"
             + (f", held out {cfg.get('val_split')!r}" if cfg.get("val_split") else "")
             + (f", tasks {', '.join(cfg['tasks'])}" if cfg.get("tasks") else ""),
             f"- training: `rau train {job} --config {config_file}` (the job config it recorded, in this folder); "
             f"lr {cfg.get('lr')}, max_steps {cfg.get('max_steps')}, seed "
             f"{cfg.get('seed')}, {cfg.get('scale', {}).get('num_workers')} Ray Train workers"]
    if ck.kind == "grpo" and cfg.get("sft_checkpoint"):
        lines.append(f"- started from the SFT checkpoint `{cfg['sft_checkpoint']}`")
    if ck.kind == "seg":
        lines.append(f"- `<Seg>` states from the policy `{cfg.get('policy_checkpoint')}` (weights sha256 "
                     f"{cfg.get('policy_sha256')}), answers {cfg.get('answers', 'teacher-forced')!r}")
    return lines


def model_card(ck: Checkpoint, policy_ck: Checkpoint, facts: dict, policy_cfg) -> str:
    """README.md of an export: what it is, its base model, data, training, the run's last metrics, how to load it."""
    title = "policy adapter + RAU segmenter" if ck.kind == "seg" else f"{ck.kind.upper()} policy adapter"
    base = facts["base_model"]
    tiny = policy_cfg.model == "tiny"
    lines = [f"# RAU-Ray export: {title} (`{ck.config.get('name', ck.path.name)}`)", "",
             f"Exported {facts['exported']} by `{facts['command']}` from `{facts['source']}` (step {ck.step}). "
             "Reference-based anatomical understanding: a Qwen2.5-VL policy (LoRA + the `<Seg>` token) that names "
             "and grounds structures of a target image against an annotated reference"
             + (", and the RAU segmenter that turns its `<Seg>` state into a SAM2 mask through the reference's "
                "memory." if ck.kind == "seg" else "."),
             "", "**Not for** clinical or diagnostic use.", "", "## Base model", "",
             f"- policy: `{policy_cfg.model}`"
             + (" — RAU-Ray's tiny Qwen2.5-VL base (`weights/tiny/qwen2_5_vl` of the RAU-Ray repository, "
                "`rau pretrain policy`)" if tiny else " (Hugging Face hub)")
             + f"; peft's `base_model_name_or_path`: `{base}`; dtype {policy_cfg.dtype}",
             f"- LoRA r {policy_cfg.lora_rank}, alpha {policy_cfg.lora_alpha}, on "
             f"{', '.join(policy_cfg.lora_targets)} of the language model; trained rows of `{SEG_TOKEN}` (token id "
             f"{facts['seg_token_id']}) in the input embedding and the output head (peft trainable tokens)"]
    if ck.kind == "seg":
        cfg = ck.model_config()
        lines.append(f"- segmenter: SAM2 `{cfg.sam2.checkpoint or cfg.sam2.init}` (frozen image encoder and memory; "
                     f"mask decoder trained: {bool(ck.config.get('train_mask_decoder', True))}), projector "
                     f"{cfg.fusion.llm_hidden_size} -> {cfg.fusion.projector_dim}, {cfg.fusion.num_heads} heads")
    lines += ["", "## Data and training", ""]
    if policy_ck is not ck:
        lines += ["Policy:", *_describe_run(policy_ck, "policy_train_config.yaml"), "", "Segmenter:"]
    lines += [*_describe_run(ck, "train_config.yaml"), ""]
    runs = [("", ck)] if policy_ck is ck else [(" of the policy", policy_ck), (" of the segmenter", ck)]
    for which, run in runs:
        metrics = _last_metrics(run.history())
        if metrics:
            lines += [f"## Metrics{which} (its run's history, the last value of each)", "",
                      "| metric | value | step |", "| --- | --- | --- |",
                      *[f"| {k} | {v:.4g} | {s} |" for k, v, s in metrics], ""]
    base_code = "weights/tiny/qwen2_5_vl" if tiny else base
    lines += ["## Load", "", "```python",
              "from peft import PeftModel",
              "from transformers import AutoModelForImageTextToText, AutoProcessor", "",
              "processor = AutoProcessor.from_pretrained(EXPORT)",
              f"base = AutoModelForImageTextToText.from_pretrained({base_code!r})",
              "base.resize_token_embeddings(len(processor.tokenizer))  # room for <Seg> (no-op where it has one)",
              "policy = PeftModel.from_pretrained(base, EXPORT)"]
    if ck.kind == "seg":
        lines += ["", "from rau_ray.models.export import load_exported_segmenter  # RAU-Ray's code",
                  "segmenter = load_exported_segmenter(EXPORT)"]
    lines += ["```", "", "With RAU-Ray: `RAUModel.from_checkpoint(policy=..., segmenter=...)` on the checkpoint "
              f"itself (`{facts['source']}`).", "", "## Files", "",
              "- `adapter_config.json`, `adapter_model.safetensors`: the peft adapter; `tokenizer*.json`, "
              "`processor_config.json`, `chat_template.jinja`: the processor with `<Seg>`"]
    if ck.kind == "seg":
        lines.append(f"- `{SEGMENTER}/model.safetensors`, `{SEGMENTER}/config.json`: the segmenter's trained tensors "
                     "and the model section that rebuilds it")
    lines += ["- `train_config.yaml`" + (", `policy_train_config.yaml`" if policy_ck is not ck else "")
              + ": the job config(s) the checkpoint recorded; `history.jsonl`: every logged metric row; "
              "`export.json`: source, step, weights digests, the export command", ""]
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="a checkpoint folder, a training run folder (its latest), a URI or "
                                      "shipped:<name> (sft, grpo or an RAU segmenter)")
    p.add_argument("--out", required=True, help="the folder to write (peft adapter + processor, segmenter, card)")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists and is not empty")
