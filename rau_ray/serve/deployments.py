"""The model deployments of the serving graph: Retriever, Policy, Segmenter (the Commander, which holds no model,
is ``rau_ray.serve.commander``). Each loads its models once
per replica (in ``__init__``), answers Serve's health check, and is called by the Ingress through
``DeploymentHandle``s (``rau_ray.serve.pipeline``) with the typed messages of ``rau_ray.serve.messages``.

- ``Retriever``: DINOv2 + faiss reference bank (a bank folder, or ``bank_dir: null``: the small CT phantom bank of
  ``rau_ray.models.retrieval.phantom_bank``, built at start-up) -> ``Retrieved`` (the reference image, its label map
  and names) or ``NoReference``.
- ``Policy``: Qwen2.5-VL + LoRA; ``answer(Question) -> Answer`` is dynamically batched with ``@serve.batch``
  (``max_batch_size`` set per deployment, 1 = unbatched); a malformed answer is teacher-forced so ``<Seg>`` still
  yields a hidden state.
- ``Segmenter``: SAM2 + projector + memory fusion; SAM2 image embeddings in an LRU cache keyed by the image's hash,
  so point/box prompts on an image already seen skip the encoder; ``prepare`` builds the embeddings and reference
  memory while the Policy generates, ``segment`` decodes the <Seg> query; ``embedding`` ships an image's features to
  an Ingress that decodes clicks itself (``prompt_decoding: ingress``).
The models come from the checkpoints as ``RAUModel.from_checkpoint`` builds them (``rau_ray.models.checkpoint``).
Use: ``rau_ray.serve.app.build_app({...})`` wires them; each class is also usable in-process via ``.func_or_class``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch
from ray import serve

from rau_ray.data.manifest import ManifestRow, read_manifest
from rau_ray.errors import DataError
from rau_ray.models import checkpoint as ckpt
from rau_ray.models import pipeline, retrieval
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.policy import load_policy
from rau_ray.models.precision import sam2_autocast
from rau_ray.models.profiles import ModelConfig
from rau_ray.models.rau import RAUModel
from rau_ray.models.reference import Reference, image_digest
from rau_ray.models.retrieval import Embedder, ReferenceBank
from rau_ray.models.sam2_builder import build_sam2_model
from rau_ray.serve.messages import (
    Answer,
    BankInfo,
    Features,
    NoReference,
    NotHeld,
    Prompted,
    Question,
    Retrieved,
    Segmentation,
)
from rau_ray.serve.prompt_decoder import decode_prompts, features_to_numpy

serve_log = logging.getLogger("ray.serve")  # Serve's logger: the replica's log and console


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass(frozen=True)
class Models:
    """The ModelConfig a replica serves and the checkpoints it comes from (None: the profile's own parts)."""

    cfg: ModelConfig
    policy: ckpt.Checkpoint | None
    segmenter: ckpt.Checkpoint | None


def resolve_models(profile: str, policy_checkpoint: str | None, segmenter_checkpoint: str | None,
                   device: str) -> Models:
    """The checkpoints read and the config they were trained with (``checkpoint.combined_config``, SAM2 on
    ``device``), resolved as ``RAUModel.from_checkpoint`` resolves them; every deployment loads its part from this."""
    p = ckpt.read_checkpoint(policy_checkpoint) if policy_checkpoint else None
    s = ckpt.read_checkpoint(segmenter_checkpoint, kind="seg") if segmenter_checkpoint else None
    cfg = ckpt.combined_config(p, s, profile)
    cfg = replace(cfg, sam2=replace(cfg.sam2, device=str(device)))
    cfg.validate()
    return Models(cfg, p, s)


def load_segmenter(profile: str, policy_checkpoint: str | None, segmenter_checkpoint: str | None, device: str):
    """(ModelConfig, RAUSegmenter in eval mode): the SAM2 + fusion the Segmenter serves, from the seg checkpoint or
    the profile (the Ingress loads the same for ``prompt_decoding: ingress``)."""
    m = resolve_models(profile, policy_checkpoint, segmenter_checkpoint, device)
    seg = (ckpt.load_segmenter_checkpoint(m.segmenter, device) if m.segmenter is not None
           else RAUSegmenter(build_sam2_model(m.cfg.sam2), m.cfg.fusion).to(device).eval())
    return m.cfg, seg


# A synthetic question each replica answers once at start-up, so torch's lazy first-call work (kernel selection,
# allocator growth) happens before the replica is ready rather than in the first user's request.
_WARM_UP = Question("segment", np.full((64, 64, 3), 90, np.uint8), {"liver": [8, 8, 40, 40]},
                    np.full((64, 64, 3), 100, np.uint8), "CT", structure="liver")


@serve.deployment(name="Retriever", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16,
                  health_check_period_s=10)
class Retriever:
    def __init__(self, profile: str = "tiny", bank_dir: str | None = None, policy_checkpoint: str | None = None,
                 segmenter_checkpoint: str | None = None, device: str = "cpu", threads: int | None = 1,
                 phantom_subjects: int = 6, phantom_size: int = 128):
        _threads(threads)
        cfg = resolve_models(profile, policy_checkpoint, segmenter_checkpoint, _device(device)).cfg
        if bank_dir is None:
            bank_dir = retrieval.phantom_bank(tempfile.mkdtemp(prefix="rau-serve-bank-"), phantom_subjects,
                                              phantom_size)
        embedder = Embedder(replace(cfg.retrieval, device=_device(device)))
        bank = ReferenceBank.load(bank_dir, embedder)
        serve_log.info("reference bank: %s", bank.index_description())  # which index, on which device, which faiss
        self._model = RAUModel(cfg, None, None, embedder, bank)  # retrieval only: retrieve() is the shared code
        self._rows = {r["id"]: r for r in bank.rows}
        self._info = BankInfo(tuple(sorted({n for r in bank.rows for n in r["labels"].values()})),
                              tuple(sorted({r["modality"] for r in bank.rows})), len(self._rows))

    def structures(self) -> BankInfo:
        return self._info

    async def retrieve(self, target: np.ndarray, modality: str, structure: str | None = None,
                       reference_id: str | None = None) -> Retrieved | NoReference:
        """The reference for ``target``: the bank entry ``reference_id``, else the most similar one showing
        ``structure``. No such id, or nothing similar enough, is a ``NoReference`` (the user's problem, not a
        replica failure). Async (run on the replica's event loop) so a request costs no hop to a worker thread; it
        computes for a few milliseconds."""
        t0 = time.perf_counter()
        try:
            if reference_id is not None:
                row = self._rows.get(reference_id)
                if row is None:
                    return NoReference(f"no reference {reference_id!r} in the bank ({len(self._rows)} entries)")
                manifest = self._model._manifests.get(row["manifest"]) or read_manifest(row["manifest"])
                self._model._manifests[row["manifest"]] = manifest
                mrow = ManifestRow(**{k: v for k, v in row.items() if k in ManifestRow.__dataclass_fields__})
                image, label = manifest.load(mrow)
                ref = Reference(image, label, mrow.label_names, mrow.modality, row, 1.0)
            else:
                ref = self._model.retrieve(target, modality, structure=structure)
        except DataError as e:
            return NoReference(str(e))
        row = {"id": ref.row["id"], "subject": ref.row.get("subject")} if ref.row else None
        return Retrieved(replace(ref, row=row), time.perf_counter() - t0)

    def check_health(self) -> None:
        if self._model.bank is None or len(self._rows) == 0:
            raise RuntimeError("no reference bank loaded")


@serve.deployment(name="Policy", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32,
                  health_check_period_s=10)
class Policy:
    """One ``answer(question)`` per question; Serve collects concurrent ones into a batch (``_answer_batch``)."""

    def __init__(self, profile: str = "tiny", policy_checkpoint: str | None = None,
                 segmenter_checkpoint: str | None = None, device: str = "cpu", threads: int | None = 1,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.02, max_new_tokens: int | None = None):
        _threads(threads)
        device = _device(device)
        m = resolve_models(profile, policy_checkpoint, segmenter_checkpoint, device)
        trained = m.policy or m.segmenter
        self.policy = (ckpt.load_policy_checkpoint(trained, device, m.cfg) if trained
                       else load_policy(m.cfg.policy))
        self.policy.model.to(device).eval()
        self.max_new_tokens = int(max_new_tokens or m.cfg.max_new_tokens)
        self._answer_batch.set_max_batch_size(int(max_batch_size))
        self._answer_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
        self._batch_wait = float(batch_wait_timeout_s)
        self.batches: list[int] = []  # sizes of the last batches (benchmarks read them)
        self._waiting, self._last_done = 0, 0.0  # answer() calls in progress; when the last one ended
        self.answer_many([_WARM_UP])  # the first generate() pays torch's lazy set-up: not the first user
        self.batches.clear()

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float | None = None) -> dict:
        """Change the dynamic batching of this replica (benchmarks compare batched and unbatched)."""
        self._answer_batch.set_max_batch_size(int(max_batch_size))
        if batch_wait_timeout_s is not None:
            self._answer_batch.set_batch_wait_timeout_s(float(batch_wait_timeout_s))
            self._batch_wait = float(batch_wait_timeout_s)
        self.batches.clear()
        return {"max_batch_size": int(max_batch_size)}

    def batch_sizes(self) -> list[int]:
        return list(self.batches[-1000:])

    async def answer(self, question: Question) -> Answer:
        """One question's answer. Arriving alone at a replica that has been idle longer than the batch wait, it is
        answered at once (under low load the wait would only add latency); otherwise it goes through
        ``@serve.batch``. Generation blocks this replica's event loop, so requests arriving meanwhile find it just
        busy when it ends and form the next batch."""
        self._waiting += 1
        try:
            if self._waiting == 1 and time.monotonic() - self._last_done > self._batch_wait:
                return self.answer_many([question])[0]
            return await self._answer_batch(question)
        finally:
            self._waiting -= 1
            self._last_done = time.monotonic()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _answer_batch(self, questions: list[Question]) -> list[Answer]:
        return self.answer_many(questions)

    def answer_many(self, questions: list[Question]) -> list[Answer]:
        """Questions -> answers, one generate() call for all."""
        self.batches.append(len(questions))
        asked = [pipeline.ask(self.policy.processor, q.task, q.target, q.ref_image, q.ref_boxes,
                              structure=q.structure, region=q.region, modality=q.modality or "CT")
                 for q in questions]
        t0 = time.perf_counter()
        completions = self.policy.generate([a.messages for a in asked], max_new_tokens=self.max_new_tokens)
        gen = (time.perf_counter() - t0) / len(questions)
        out = []
        for q, a, completion in zip(questions, asked, completions):
            parsed = a.parse(completion)
            timings, seg_hidden = {"generate": gen, "batch": len(questions)}, None
            if q.task == "segment":
                t1 = time.perf_counter()
                seg_hidden = pipeline.seg_state(self.policy, a, completion).float().cpu().numpy()
                timings["seg_hidden"] = time.perf_counter() - t1
            out.append(Answer(completion, parsed.label if parsed else None, None if parsed else parsed.message,
                              box=parsed.box if parsed and parsed.box is not None else None,
                              boxes=parsed.boxes if parsed and parsed.boxes else None, timings=timings,
                              seg_hidden=seg_hidden))
        return out

    def check_health(self) -> None:
        if self.policy is None:
            raise RuntimeError("policy not loaded")


PREPARED_KEPT = 64  # prepare()d requests a Segmenter replica keeps for their segment() (a lost one is recomputed)
EMBEDDING_ROUTES = 256  # image keys a Segmenter replica advertises for routing (tiny strings; LRU)


@serve.deployment(name="Segmenter", ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=16,
                  health_check_period_s=5)
class Segmenter:
    def __init__(self, profile: str = "tiny", policy_checkpoint: str | None = None,
                 segmenter_checkpoint: str | None = None, device: str = "cpu", threads: int | None = 1,
                 embedding_cache: int | None = None):
        _threads(threads)
        self.device = _device(device)  # SAM2 runs under sam2_autocast(self.device): bf16 on CUDA, fp32 on CPU
        cfg, seg = load_segmenter(profile, policy_checkpoint, segmenter_checkpoint, self.device)
        if embedding_cache:
            cfg = replace(cfg, embedding_cache=int(embedding_cache))
        self._model = RAUModel(cfg, None, seg)  # image_embedding(): the LRU cache keyed by image hash
        self.seg = seg
        with sam2_autocast(self.device):
            self._model.image_embedding(_WARM_UP.target)  # first-call set-up here, not in the first request
        self._model._embeddings.clear()
        self._prepared: OrderedDict[str, tuple] = OrderedDict()  # prepare()d requests waiting for their segment()

    def _embedding(self, image: np.ndarray):
        held = self._held(image_digest(image))  # one hash per call; only a miss hashes again (next to the encoder)
        if held is not None:
            return held
        t0 = time.perf_counter()
        with sam2_autocast(self.device):
            embedding = self._model.image_embedding(image)
        return embedding, False, time.perf_counter() - t0

    @serve.multiplexed(max_num_models_per_replica=EMBEDDING_ROUTES)
    async def _holds(self, image_key: str) -> str:
        """Serve's model multiplexing used for cache affinity: the Ingress calls with
        ``multiplexed_model_id=image_digest(image)``, this replica reports the keys it has seen to the controller,
        and Serve's router sends later prompts on the same image to this replica, where the embedding is cached
        (the embeddings themselves stay in ``RAUModel``'s LRU)."""
        return image_key

    async def _note_route(self) -> None:
        key = serve.get_multiplexed_model_id()
        if key:
            await self._holds(key)

    async def prepare(self, token: str, target: np.ndarray, ref_image: np.ndarray, ref_mask: np.ndarray) -> bool:
        """The part of RAU's route that needs no <Seg> query — the target's and the reference's SAM2 embeddings and
        the reference memory — done while the Policy generates (the Ingress sends this alongside Policy.answer,
        routed like ``segment``) and kept under ``token`` for the ``segment`` call that follows: on a new image
        the encoder's time is hidden behind generation, and the images are off the critical path."""
        await self._note_route()
        self._prepared[token] = self._prepare(target, ref_image, ref_mask)
        while len(self._prepared) > PREPARED_KEPT:
            self._prepared.popitem(last=False)
        return True

    def _prepare(self, target, ref_image, ref_mask) -> tuple:
        tgt, cached, t_embed = self._embedding(target)
        ref, _, t_ref = self._embedding(ref_image)
        t0 = time.perf_counter()
        with torch.no_grad(), sam2_autocast(self.device):
            memory = self.seg.encode_reference(ref, np.asarray(ref_mask, dtype=bool))
        return tgt, memory, cached, {"embed": t_embed + t_ref, "memory": time.perf_counter() - t0}

    async def segment(self, token: str, seg_hidden: np.ndarray | Answer, target: np.ndarray | None = None,
                      ref_image: np.ndarray | None = None,
                      ref_mask: np.ndarray | None = None) -> Segmentation | NotHeld:
        """RAU's route: reference memory + the <Seg> query -> the target's mask and score. ``seg_hidden``: the
        (1, hidden) array, or the Policy's whole ``Answer``, so the Ingress can pass the Policy's pending response
        straight here. The embeddings and memory come from the ``prepare`` call of the same ``token``, or from the
        images given here; ``NotHeld`` when neither (another replica prepared it: the caller sends the images)."""
        await self._note_route()
        if isinstance(seg_hidden, Answer):
            seg_hidden = seg_hidden.seg_hidden
        prepared = self._prepared.pop(token, None)
        if prepared is None:
            if target is None:
                return NotHeld("prepared request")
            prepared = self._prepare(target, ref_image, ref_mask)
        tgt, memory, cached, timings = prepared
        t0 = time.perf_counter()
        with torch.no_grad(), sam2_autocast(self.device):
            logits, score, _ = self.seg.predict(tgt, torch.as_tensor(seg_hidden), memory)
        mask = (logits > 0).cpu().numpy()
        return Segmentation(mask, float(score), cached, {**timings, "decode": time.perf_counter() - t0})

    async def prompt(self, image: np.ndarray | str, points: list | None = None, labels: list | None = None,
                     box: list | None = None) -> Prompted | NotHeld:
        """SAM2 with point / box prompts on the image's cached embedding (the encoder runs on a cache miss only).
        ``image`` may be the image's digest alone (``image_digest``): a click then ships a few bytes instead of the
        image; if this replica does not hold that embedding the answer is ``NotHeld`` and the caller sends the
        image."""
        await self._note_route()
        found = self._held(image)
        if found is None:
            return NotHeld()
        emb, cached, t_embed = found
        t0 = time.perf_counter()
        with sam2_autocast(self.device):
            mask, score = decode_prompts(self.seg.predictor, emb, points, labels, box)
        return Prompted(mask, score, cached, {"embed": t_embed, "decode": time.perf_counter() - t0})

    async def embedding(self, image: np.ndarray | str) -> Features | NotHeld:
        """The image's SAM2 features as arrays (``prompt_decoder.features_to_numpy``) and whether the encoder was
        skipped, for an Ingress that decodes prompts itself; ``NotHeld`` for a digest this replica does not hold
        (the caller then sends the image)."""
        await self._note_route()
        found = self._held(image)
        if found is None:
            return NotHeld()
        emb, cached, t_embed = found
        return replace(features_to_numpy(emb), cached=cached, timings={"embed": t_embed})

    def _held(self, image: np.ndarray | str):
        """(embedding, cached, seconds) for an image, or for its digest when this replica holds it (else None)."""
        if not isinstance(image, str):
            return self._embedding(image)
        emb = self._model._embeddings.get(image)
        if emb is None:
            return None
        self._model._embeddings.move_to_end(image)
        return emb, True, 0.0

    def cache_info(self) -> dict:
        return {"entries": len(self._model._embeddings), "pid": os.getpid()}

    def check_health(self) -> None:
        if self.seg is None:
            raise RuntimeError("segmenter not loaded")
