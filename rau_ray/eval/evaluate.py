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
Items run on Ray Data ``map_batches`` with a pool of model actors (``EvalWorker``: every model built once per actor,
lazily), a progress bar on the driver; ``backend="local"`` runs one worker in-process. Workers return prediction
records; every number comes from them in ``rau_ray.eval.tables``; ``rau_ray.eval.report`` writes ``report.md``,
``tables.md``, ``tables.json``, ``predictions.jsonl`` and ``pictures/``. A missing checkpoint leaves its rows n/a.
Use: ``rau eval --manifest data/ct/manifest.jsonl --checkpoint runs/train/sft --checkpoint runs/train/grpo
--checkpoint runs/train/seg --out runs/eval`` or ``run_eval(EvalConfig(manifests=(...,), checkpoints=(...,)))``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shlex
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray.data
import torch
from PIL import Image
from tqdm import tqdm

from rau_ray import ray_session
from rau_ray.config import from_dict, load_config
from rau_ray.data import formats
from rau_ray.data.importers import axial_slice, read_dataset_json, to_display
from rau_ray.data.manifest import Manifests, read_manifest
from rau_ray.data.tasks import label_boxes
from rau_ray.errors import ConfigError, DataError, RauError
from rau_ray.eval import reasoning, report
from rau_ray.eval.matching import MatchConfig, assign_with_fallback
from rau_ray.eval.metrics import mask_to_box
from rau_ray.eval.tables import match_available
from rau_ray.models import pipeline
from rau_ray.models.checkpoint import (
    check_pair,
    combined_config,
    load_cbam_checkpoint,
    load_memref_checkpoint,
    load_policy_checkpoint,
    read_checkpoint,
)
from rau_ray.models.memory_ref import memory_ref_baseline, propagate_volume
from rau_ray.models.profiles import ModelConfig, get_profile
from rau_ray.models.prompts import to_pil
from rau_ray.models.rau import RAUModel
from rau_ray.models.retrieval import Embedder, ReferenceBank, recall_at_k
from rau_ray.models.sam2_builder import build_video_predictor, embed_image, predict_with_prompts, predictor_for

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


# -- records on the wire: JSON + the arrays in one npz -----------------------------------------------------------------
def pack(records: list[dict]) -> tuple[str, bytes]:
    arrays: dict[str, np.ndarray] = {}

    def walk(x):
        if isinstance(x, np.ndarray):
            key = f"a{len(arrays)}"
            arrays[key] = x
            return {"__array__": key}
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, (np.floating, np.integer, np.bool_)):
            return x.item()
        return x

    text = json.dumps(walk(records))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return text, buf.getvalue()


def unpack(text: str, blob: bytes) -> list[dict]:
    """``pack``'s records back; a worker's RauError is raised again here."""
    data = json.loads(text)
    if isinstance(data, dict):
        raise (ConfigError if data.get("error") == "ConfigError" else DataError)(data.get("message", "worker error"))
    arrays = np.load(io.BytesIO(blob), allow_pickle=False)

    def walk(x):
        if isinstance(x, dict):
            return arrays[x["__array__"]] if set(x) == {"__array__"} else {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(data)


# -- the model actor ---------------------------------------------------------------------------------------------------
def _u8(image: np.ndarray, modality: str) -> np.ndarray:
    """An image as SAM2 and the policy see it: (H, W, 3) uint8 (CT windowed)."""
    return np.asarray(to_pil(image, modality))


def _resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    if arr.shape[:2] == tuple(hw):
        return arr
    im = Image.fromarray(arr.astype(np.uint8) if not nearest else arr.astype(np.uint8) * 255)
    out = np.asarray(im.resize((hw[1], hw[0]), Image.NEAREST if nearest else Image.BILINEAR))
    return out > 127 if nearest else out


def slot_grid(mask: np.ndarray, slots: int) -> np.ndarray:
    """Share of each memory slot (a side x side grid over SAM2's square input) covered by ``mask``."""
    side = int(round(math.sqrt(slots)))
    t = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    return torch.nn.functional.interpolate(t, size=(side, side), mode="area")[0, 0].numpy()


class EvalWorker:
    """One model actor: builds what its items need once (policies, RAU, SAM2 video predictor, CBAM-LoRA SAM2,
    embedder + banks) and turns items into prediction records. ``spec``: see ``_worker_spec``."""

    def __init__(self, spec: dict):
        torch.set_num_threads(max(1, int(spec.get("threads", 1))))
        self.spec = spec
        self._built: dict = {}
        self._samples = Manifests()  # manifests read once per actor

    # -- lazily built models ---------------------------------------------------------------------------------------
    def _once(self, key: str, build):
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def model_config(self):
        return self._once("cfg", lambda: from_dict(ModelConfig, self.spec["model"], "eval model config"))

    def checkpoint(self, kind: str):
        path = self.spec["checkpoints"].get(kind)
        return None if path is None else self._once(f"ck:{kind}", lambda: read_checkpoint(path, kind=kind))

    def policy(self, kind: str):
        return self._once(f"policy:{kind}", lambda: load_policy_checkpoint(self.checkpoint(kind), self.spec["device"]))

    def embedder(self):
        return self._once("embedder", lambda: Embedder(self.model_config().retrieval, device=self.spec["device"]))

    def retriever(self, dataset: str):
        """A RAUModel shell holding only the dataset's bank: ``retrieve`` as the model itself does it."""
        def build():
            bank = ReferenceBank.load(self.spec["banks"][dataset], self.embedder())
            return RAUModel(self.model_config(), None, None, self.embedder(), bank)

        return self._once(f"retriever:{dataset}", build)

    def rau(self):
        def build():
            seg = self.checkpoint("seg")
            which = self.spec["seg_policy"]
            policy = self.checkpoint(which) if which != "segmenter" else None
            return RAUModel.from_checkpoint(policy=policy, segmenter=seg, device=self.spec["device"])

        return None if self.checkpoint("seg") is None else self._once("rau", build)

    def video_predictor(self):
        return self._once("video", lambda: build_video_predictor(replace(self.model_config().sam2,
                                                                          device=self.spec["device"])))

    def cbam(self):
        ck = self.checkpoint("cbam")
        return None if ck is None else self._once("cbam", lambda: predictor_for(
            load_cbam_checkpoint(ck, self.spec["device"])))

    def memref(self):
        ck = self.checkpoint("memref")
        return None if ck is None else self._once("memref", lambda: load_memref_checkpoint(ck, self.spec["device"]))

    def sample(self, manifest_path: str, row_id: str):
        return self._samples.sample(manifest_path, row_id)

    # -- Ray Data entry ----------------------------------------------------------------------------------------------
    def __call__(self, batch: dict) -> dict:
        texts, blobs = [], []
        for item in batch["item"]:
            try:
                text, blob = pack(self.run(json.loads(str(item))))
            except RauError as e:  # the user's error (a corrupt image...): Ray Data would keep only its text
                text, blob = json.dumps({"error": type(e).__name__, "message": str(e)}), b""
            texts.append(text)
            blobs.append(blob)
        return {"records": np.array(texts, dtype=object), "arrays": np.array(blobs, dtype=object)}

    def run(self, item: dict) -> list[dict]:
        return {"label": self.label, "segment": self.segment, "volume": self.volume}[item["kind"]](item)

    # -- labeling ----------------------------------------------------------------------------------------------------
    def label(self, item: dict) -> list[dict]:
        row, image, label = self.sample(item["manifest"], item["target"])
        regions = label_boxes(label, row.label_names)
        policies = [k for k in ("sft", "grpo") if self.spec["checkpoints"].get(k)]
        rec = {"kind": "label", "dataset": item["dataset"], "manifest": item["manifest"], "target": row.id,
               "subject": row.subject, "size": [int(label.shape[1]), int(label.shape[0])],
               "regions": [{"structure": s, "box": b} for s, b in regions.items()], "reference": None,
               "ref_boxes": {}, "ref_size": [int(label.shape[1]), int(label.shape[0])], "error": None,
               "answers": {}, "seconds": {}}
        try:
            ref = self.retriever(item["dataset"]).retrieve(image, row.modality, exclude_subject=row.subject or None)
        except DataError as e:
            rec.update(error=str(e), answers={p: [None] * len(regions) for p in policies})
            return [rec]
        rec.update(reference=ref.row["id"], similarity=ref.similarity, ref_boxes=label_boxes(ref.label, ref.names),
                   ref_size=[int(ref.label.shape[1]), int(ref.label.shape[0])])
        rec.update(predicted={}, reasked={}, reasoning={}, grounded={})
        for p in policies:
            rec["answers"][p], rec["seconds"][p], rec["reasoning"][p] = self._ask(p, ref, image, row.modality,
                                                                                   regions)
            rec["predicted"][p], rec["reasked"][p] = self._boxes(p, ref, image, row.modality, rec)
            rec["grounded"][p] = self._ground(p, ref, image, row.modality, rec["ref_boxes"])
        return [rec]

    def _ground(self, kind: str, ref, image, modality: str, ref_boxes: dict) -> list:
        """The ground task for every structure the reference shows, present in the target or not (then the right
        answer is ``null``): [[structure, box in target pixels or None, answer valid]]."""
        processor = self.policy(kind).processor
        questions = [pipeline.ask(processor, "ground", image, ref.image, ref_boxes, structure=s, modality=modality,
                                  reference_modality=ref.modality) for s in ref_boxes]
        out = []
        for s, question, text in zip(ref_boxes, questions, self._generate(kind, questions, self._budget(kind))):
            answer = question.parse(text)
            out.append([s, None if not answer or answer.box is None else [float(v) for v in answer.box],
                        answer is not None])
        return out

    def _budget(self, kind: str) -> int:
        """New tokens a policy's answer may take: the eval's setting, else its checkpoint's own budget."""
        return self.spec["max_new_tokens"].get(kind) or self.model_config().max_new_tokens

    def _generate(self, kind: str, questions: list, budget: int) -> list[str]:
        step, texts = self.spec["label_batch"], []
        for i in range(0, len(questions), step):
            texts += self.policy(kind).generate([q.messages for q in questions[i:i + step]], max_new_tokens=budget)
        return texts

    def _boxes(self, kind: str, ref, image, modality: str, rec: dict) -> tuple[list | None, dict]:
        """The policy's all-boxes answer ([[label, box]] in target pixels, None when malformed) and, for the
        transport rows (GRPO), its grounding answers to every label transport leaves doubtful (the re-ask
        fallback of ``matching.assign_with_fallback``; which labels those are does not depend on the answers)."""
        processor, ref_boxes, budget = self.policy(kind).processor, rec["ref_boxes"], self._budget(kind)
        q = pipeline.ask(processor, "all_boxes", image, ref.image, ref_boxes, modality=modality,
                         reference_modality=ref.modality)
        parsed = q.parse(self._generate(kind, [q], budget + 24 * len(ref_boxes))[0])  # ~24 tokens a box
        predicted = [[label, [float(v) for v in box]] for label, box in parsed.boxes] if parsed else None
        if kind != "grpo":
            return predicted, {}
        pred = predicted or []
        doubtful: list[str] = []
        for method in [m for m in ("emd", "fgw") if match_available(m)]:
            assign_with_fallback([b for _, b in pred], tuple(rec["size"]), ref_boxes, tuple(rec["ref_size"]),
                                 lambda label: doubtful.append(label), MatchConfig(method=method),
                                 predicted_labels=[label for label, _ in pred])
        doubtful = sorted(set(doubtful))
        questions = [pipeline.ask(processor, "ground", image, ref.image, ref_boxes, structure=s, modality=modality,
                                  reference_modality=ref.modality) for s in doubtful]
        reasked = {}
        for s, question, text in zip(doubtful, questions, self._generate(kind, questions, budget)):
            answer = question.parse(text)
            reasked[s] = None if not answer or answer.box is None else [float(v) for v in answer.box]
        return predicted, reasked

    def _ask(self, kind: str, ref, image, modality: str, regions: dict) -> tuple[list, list, list]:
        """The policy's label answers to each region, seconds per answer, and per answer the relative-position
        statements of its ``<think>`` [made, true] (``eval.reasoning``; the target's regions and the reference's
        boxes decide)."""
        policy = self.policy(kind)
        ref_boxes = label_boxes_of(ref)
        questions = [pipeline.ask(policy.processor, "label", image, ref.image, ref_boxes, region=b, modality=modality,
                                  reference_modality=ref.modality) for b in regions.values()]
        answers, seconds, checked, step = [], [], [], self.spec["label_batch"]
        for i in range(0, len(questions), step):
            t0 = time.perf_counter()
            texts = self._generate(kind, questions[i:i + step], self._budget(kind))
            dt = (time.perf_counter() - t0) / len(texts)
            for question, text in zip(questions[i:i + step], texts):
                parsed = question.parse(text)
                answers.append(parsed.label if parsed else None)
                seconds.append(dt)
                said = reasoning.check(parsed.think if parsed else "", regions, ref_boxes)
                checked.append([len(said.statements), said.true])
        return answers, seconds, checked

    # -- segmentation ------------------------------------------------------------------------------------------------
    def segment(self, item: dict) -> list[dict]:
        row, image, label = self.sample(item["manifest"], item["target"])
        by_name = {v: k for k, v in row.label_names.items()}
        tgt_u8 = _u8(image, row.modality)
        rau, cbam, memref = self.rau(), self.cbam(), self.memref()
        cbam_embedding = memref_embedding = None
        slots = (self.model_config().sam2.image_size // 16) ** 2
        out = []
        for s in item["structures"]:
            truth = label == by_name[s]
            rec = {"kind": "segment", "dataset": item["dataset"], "manifest": item["manifest"], "target": row.id,
                   "subject": row.subject, "structure": s, "spacing": list(row.spacing), "truth": truth, "reference": None, "error": None,  # noqa: E501
                   "preds": {}}
            methods = (["SAM2-Memory-Ref"] + (["SAM2-Memory-Ref-SFT"] if memref else []) + (["VLM+SAM2"] if rau else [])
                       + (["CBAM-LoRA SAM2 (box)"] if cbam else []))
            t0 = time.perf_counter()
            try:
                ref = self.retriever(item["dataset"]).retrieve(image, row.modality, structure=s,
                                                               exclude_subject=row.subject or None)
            except DataError as e:
                rec["error"] = str(e)
                rec["preds"] = {m: {"mask": None, "box": None, "seconds": None, "error": str(e)} for m in methods}
                out.append(rec)
                continue
            t_retrieval = time.perf_counter() - t0
            ref_mask = ref.label == {v: k for k, v in ref.names.items()}[s]
            rec.update(reference=ref.row["id"], similarity=ref.similarity, ref_grid=slot_grid(ref_mask, slots))

            t0 = time.perf_counter()
            ref_u8 = _resize(_u8(ref.image, ref.modality), truth.shape, nearest=False)
            mask = memory_ref_baseline(self.video_predictor(), ref_u8, _resize(ref_mask, truth.shape, True), tgt_u8)
            rec["preds"]["SAM2-Memory-Ref"] = {"mask": mask, "box": mask_to_box(mask),
                                               "seconds": time.perf_counter() - t0 + t_retrieval}
            if memref:  # the same memory route after fine-tuning on the training pairs, no <Seg> query
                t0 = time.perf_counter()
                if memref_embedding is None:
                    memref_embedding = memref.set_image(tgt_u8)
                memory = memref.encode_reference(memref.set_image(ref_u8), _resize(ref_mask, truth.shape, True))
                m = np.asarray(memref.predict(memref_embedding, None, memory)[0]) > 0
                rec["preds"]["SAM2-Memory-Ref-SFT"] = {"mask": m, "box": mask_to_box(m),
                                                       "seconds": time.perf_counter() - t0 + t_retrieval}
            if rau:
                p = rau.predict(image, s, reference=ref, modality=row.modality)
                timings = {**p.timings, "retrieval": t_retrieval}
                timings["total"] = sum(v for k, v in timings.items() if k != "total")
                rec["preds"]["VLM+SAM2"] = {"mask": p.mask, "box": p.box, "seconds": timings["total"],
                                            "timings": timings, "attention": p.attention, "label": p.label,
                                            "format_error": p.format_error}
            if cbam:
                t0 = time.perf_counter()
                if cbam_embedding is None:
                    cbam_embedding = embed_image(cbam, tgt_u8)
                masks, _, _ = predict_with_prompts(cbam, cbam_embedding, box=np.asarray(mask_to_box(truth), float))
                m = np.asarray(masks[0]) > 0
                rec["preds"]["CBAM-LoRA SAM2 (box)"] = {"mask": m, "box": mask_to_box(m),
                                                        "seconds": time.perf_counter() - t0}
            out.append(rec)
        return out

    # -- 3D ----------------------------------------------------------------------------------------------------------
    def volume(self, item: dict) -> list[dict]:
        spec = read_dataset_json(item["dataset_json"])
        case = next(c for c in spec.cases if c.id == item["case"])
        image, spacing, _ = formats.read_nifti(case.image)
        labels = formats.read_nifti_label(case.label)
        if image.ndim == 4:
            image = image[..., 0]
        display = formats.apply_window(image, "abdomen") if spec.modality == "CT" else to_display(image, spec.modality)
        z = labels.shape[2]
        slices = np.stack([axial_slice(display, k) for k in range(z)])
        lab = np.stack([axial_slice(labels, k) for k in range(z)])
        sp = (float(spacing[2]), float(spacing[1]), float(spacing[0]))  # (Z, rows = y, cols = x)
        out = []
        wanted = item.get("structures")
        for value, name in sorted(spec.labels.items()):
            truth = lab == value
            if (wanted is not None and name not in wanted) or not truth.any():
                continue
            key = int(truth.reshape(z, -1).sum(1).argmax())
            t0 = time.perf_counter()
            pred = propagate_volume(self.video_predictor(), slices, key, truth[key])
            out.append({"kind": "volume", "dataset": item["dataset"], "case": case.id, "structure": name,
                        "key_slice": key, "slices": z, "spacing": list(sp), "truth": truth, "pred": pred,
                        "seconds": time.perf_counter() - t0})
        return out


def label_boxes_of(ref) -> dict:
    return label_boxes(ref.label, ref.names)


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


def _worker_spec(plan: Plan) -> dict:
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
    spec = _worker_spec(plan)
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
    parser.add_argument("--config", help="eval config YAML (fields of rau_ray.eval.evaluate.EvalConfig)")
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
