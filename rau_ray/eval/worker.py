"""The evaluation job's model actor: items of a ``Plan`` -> prediction records (``rau_ray.eval.plan``, ``tables``).

``EvalWorker(spec)`` builds what its items need once, lazily (policies, the RAU model, SAM2's video predictor,
CBAM-LoRA SAM2, the embedder and reference banks); ``worker(batch)`` (Ray Data ``map_batches``) or
``worker.run(item)`` (in-process) returns records. ``pack`` / ``unpack`` carry records (JSON + one npz of the arrays)
across the actor boundary; a worker's ``RauError`` is re-raised on the driver.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from rau_ray.config import from_dict
from rau_ray.data import formats
from rau_ray.data.importers import axial_slice, read_dataset_json, to_display
from rau_ray.data.manifest import Manifests
from rau_ray.data.tasks import label_boxes
from rau_ray.errors import ConfigError, DataError, RauError
from rau_ray.eval.tables import match_available
from rau_ray.models import pipeline
from rau_ray.models.checkpoint import (
    load_cbam_checkpoint,
    load_memref_checkpoint,
    load_policy_checkpoint,
    read_checkpoint,
)
from rau_ray.models.memory_ref import memory_ref_baseline, propagate_volume
from rau_ray.models.profiles import ModelConfig
from rau_ray.models.prompts import to_pil
from rau_ray.models.rau import RAUModel
from rau_ray.models.retrieval import Embedder, ReferenceBank
from rau_ray.models.sam2_builder import build_video_predictor, embed_image, predict_with_prompts, predictor_for
from rau_ray.scoring import reasoning
from rau_ray.scoring.matching import MatchConfig, assign_with_fallback
from rau_ray.scoring.metrics import mask_to_box


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
    embedder + banks) and turns items into prediction records. ``spec``: see ``plan.worker_spec``."""

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
        if self.rau() is not None and "grpo" in policies:  # boxes read off the chain's own masks (tables.mask_box)
            t0 = time.perf_counter()
            rec["mask_boxes"] = self._mask_boxes(ref, image, row.modality, list(rec["ref_boxes"]))
            rec["mask_seconds"] = time.perf_counter() - t0
        return [rec]

    def _mask_boxes(self, ref, image, modality: str, structures: list[str]) -> dict:
        """{structure: the box of the chain's own mask of it (``RAUModel.predict_many``: the segment task ->
        ``<Seg>`` -> SAM2 over the reference memory), None where the mask is empty}; ``structures``: the
        reference's (each has pixels there)."""
        if not structures:
            return {}
        return {p.structure: mask_to_box(p.mask)
                for p in self.rau().predict_many(image, structures, reference=ref, modality=modality)}

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
        statements of its ``<think>`` [made, true] (``scoring.reasoning``; the target's regions and the reference's
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
