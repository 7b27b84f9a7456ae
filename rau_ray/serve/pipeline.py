"""The calls between deployments behind the routes: retrieve -> policy -> segment, labelling, and the sessions' prompts.

``Pipeline`` holds the Ingress's handles to the Retriever, Policy, Segmenter and Commander and makes every handle
call the routes need, with the typed messages of ``rau_ray.serve.messages``:

- ``call``: one handle call, retried while Serve replaces a replica that died (``ActorUnavailableError`` & co.),
  then 503; one that does not answer within ``timeout_s`` is a 504.
- ``segment_one``: a structure's whole route. The Retriever's reference (or the client's), then the Policy's answer
  and the Segmenter's mask with the Segmenter working alongside the Policy: its ``prepare`` (embeddings, reference
  memory) runs while the Policy generates and the Policy's pending response is handed straight to
  ``Segmenter.segment``, routed (``multiplexed_model_id`` = the image's digest) to the replica holding the image.
- ``label``: the Policy's boxes (or the client's), a label per box, global OT matching (``rau_ray.scoring.matching``).
- ``prompt`` / ``segment``: what a ``Session`` asks of the models (the pipeline is the sessions' backend). A click
  is decoded where ``prompt_decoding`` puts the prompt decoder: on the Segmenter replica holding the image's
  embedding, or in the Ingress itself (``PromptDecoder``, on the features fetched once per image).
A user's problem (no reference, a structure the reference lacks) is an ``ApiError`` 422, a replica's failure a 503.
Use: ``p = Pipeline(handles, timeout_s=120, retries=3, decoder=prompt_decoder(spec) or None)``;
``result, mask = await p.segment_one(image, "CT", "liver", None, "rle")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import ray.exceptions as rx
import torch

from rau_ray.data.tasks import label_boxes
from rau_ray.models.prompts import to_pil
from rau_ray.models.reference import Reference, image_digest
from rau_ray.scoring.matching import MatchConfig, assign
from rau_ray.serve import codecs, metrics
from rau_ray.serve.deployments import load_segmenter
from rau_ray.serve.http import ApiError, BankReference, ClientReference, ReferenceChoice
from rau_ray.serve.messages import Answer, BankInfo, Features, NoReference, NotHeld, Prompted, Question, Segmentation
from rau_ray.serve.prompt_decoder import PromptDecoder
from rau_ray.serve.sessions import mask_box

try:
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    _SERVE_UNAVAILABLE: tuple = (BackPressureError, DeploymentUnavailableError)
except ImportError:  # older Ray
    _SERVE_UNAVAILABLE = ()

log = logging.getLogger("rau_ray.serve")
UNAVAILABLE = (rx.RayActorError, rx.ActorUnavailableError, *_SERVE_UNAVAILABLE)  # a replica gone: retry, then 503
DEPLOYMENTS = ("retriever", "policy", "segmenter", "commander")


@dataclass(frozen=True)
class DecoderSpec:
    """The SAM2 whose prompt decoder runs in the Ingress (``prompt_decoding: ingress``): the Segmenter's model."""

    profile: str = "tiny"
    policy_checkpoint: str | None = None
    segmenter_checkpoint: str | None = None
    device: str = "cpu"
    threads: int | None = 1
    capacity: int = 32  # images whose features the Ingress keeps


def prompt_decoder(spec: DecoderSpec) -> PromptDecoder:
    """The Ingress's PromptDecoder: the Segmenter's SAM2 (same checkpoint), on a GPU only if this replica has one."""
    if spec.threads:
        torch.set_num_threads(int(spec.threads))
    device = "cuda" if spec.device != "cpu" and torch.cuda.is_available() else "cpu"
    _, segmenter = load_segmenter(spec.profile, spec.policy_checkpoint, spec.segmenter_checkpoint, device)
    return PromptDecoder(segmenter, spec.capacity)


async def _await(response):
    return await response


def reference_used(ref: Reference) -> dict:
    """What a response says about the reference: its bank id and similarity, or ``{"id": "client"}``."""
    return {"id": ref.row["id"], "similarity": ref.similarity} if ref.row else {"id": "client"}


class Pipeline:
    def __init__(self, handles: dict, timeout_s: float = 120.0, retries: int = 3,
                 decoder: PromptDecoder | None = None):
        """``handles``: {retriever, policy, segmenter, commander: DeploymentHandle}; ``decoder``: the Ingress's
        PromptDecoder, or None (clicks are decoded by the Segmenter)."""
        self.handles, self.timeout_s, self.retries, self.decoder = dict(handles), float(timeout_s), retries, decoder
        self._known: BankInfo | None = None

    # -- plumbing ------------------------------------------------------------------------------------------------
    def handle(self, which: str, route_key: str | None = None):
        """The deployment's handle; with ``route_key`` (an image digest) Serve routes to a replica that has seen
        that image (model multiplexing used as cache affinity: see ``Segmenter._holds``)."""
        h = self.handles[which]
        if not h.is_initialized:
            try:  # route on this replica's event loop (every call here is made on it): no thread hop per call
                h._init(_run_router_in_separate_loop=False)
            except (TypeError, RuntimeError) as e:  # a Ray without the option: its default router
                log.info("handle %s: default router (%s)", which, e)
        return h.options(multiplexed_model_id=route_key) if route_key else h

    async def call(self, which: str, method: str, *args, route_key: str | None = None, **kwargs):
        """A handle call with retries while Serve replaces a dead replica; 503 when it stays unavailable."""
        last = None
        for attempt in range(self.retries):
            response = getattr(self.handle(which, route_key), method).remote(*args, **kwargs)
            try:
                return await asyncio.wait_for(_await(response), self.timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, f"{which} did not answer within {self.timeout_s:g} s") from None
            except UNAVAILABLE as e:
                last = e
                log.warning("%s.%s unavailable (attempt %d): %s", which, method, attempt + 1, type(e).__name__)
                await asyncio.sleep(0.3 * (attempt + 1))
        raise ApiError(503, f"the {which} is unavailable right now ({type(last).__name__}); Serve is replacing it, "
                            "retry shortly", headers={"Retry-After": "2"})

    async def ready(self) -> dict[str, str]:
        """Each deployment's answer to a cheap call: "ok", or why not."""
        checks = {"retriever": ("structures", ()), "policy": ("batch_sizes", ()),
                  "segmenter": ("cache_info", ()), "commander": ("parse", ("undo",))}

        async def one(name, method, args):
            try:
                await asyncio.wait_for(_await(getattr(self.handle(name), method).remote(*args)), 10)
                return name, "ok"
            except Exception as e:  # noqa: BLE001 - any failure means not ready
                return name, f"{type(e).__name__}: {e}"[:200]

        return dict(await asyncio.gather(*(one(n, m, a) for n, (m, a) in checks.items())))

    async def known_structures(self) -> BankInfo:
        if self._known is None:
            self._known = await self.call("retriever", "structures")
        return self._known

    # -- segmentation --------------------------------------------------------------------------------------------
    async def retrieve(self, target: np.ndarray, modality: str, structure: str | None,
                       choice: ReferenceChoice) -> tuple[Reference, float]:
        """(reference, seconds): the client's reference, or the Retriever's (a bank id, else the most similar)."""
        if isinstance(choice, ClientReference):
            names = dict(choice.names) or {choice.values[0]: structure}  # one value, named after the structure
            return Reference(choice.image, choice.label, names, choice.modality, None, None), 0.0
        bank_id = choice.id if isinstance(choice, BankReference) else None
        out = await self.call("retriever", "retrieve", target, modality, structure, bank_id)
        if isinstance(out, NoReference):
            raise ApiError(422, out.message)
        return out.reference, out.seconds

    async def policy_then_segmenter(self, question: Question, ref_mask: np.ndarray
                                    ) -> tuple[Answer, Segmentation, float]:
        """The Policy's answer and the Segmenter's mask, with the Segmenter working alongside the Policy (see the
        module's docstring). Returns (answer, segmentation, time the answer arrived). When a replica is unavailable,
        falls back to the calls one after the other, each with ``call``'s retries."""
        tgt_u8 = question.target
        key, token = image_digest(tgt_u8), uuid.uuid4().hex
        images = (tgt_u8, question.ref_image, ref_mask)
        try:
            pol_resp = self.handle("policy").answer.remote(question)
            segmenter = self.handle("segmenter", key)  # prepare and segment go to the replica holding the image
            prepared = segmenter.prepare.remote(token, *images)
            seg_resp = segmenter.segment.remote(token, pol_resp)
            pol = await asyncio.wait_for(_await(pol_resp), self.timeout_s)
            t_pol = time.perf_counter()
            seg = await asyncio.wait_for(_await(seg_resp), self.timeout_s)
            with contextlib.suppress(Exception):  # its failure, if any, is the segment call's below
                await prepared
            if isinstance(seg, NotHeld):  # prepared on another replica (or lost): send the images
                seg = await self.call("segmenter", "segment", token, pol.seg_hidden, *images, route_key=key)
            return pol, seg, t_pol
        except asyncio.TimeoutError:
            raise ApiError(504, f"the policy or segmenter did not answer within {self.timeout_s:g} s") from None
        except UNAVAILABLE as e:
            log.warning("policy -> segmenter chain unavailable (%s); calling one after the other",
                        type(e).__name__)
        pol = await self.call("policy", "answer", question)
        t_pol = time.perf_counter()
        return pol, await self.call("segmenter", "segment", token, pol.seg_hidden, *images, route_key=key), t_pol

    async def segment_one(self, target: np.ndarray, modality: str, structure: str, choice: ReferenceChoice,
                          mask_format: str | None, reasoning: bool = True) -> tuple[dict, np.ndarray]:
        """(what /v1/segment answers for one structure, its mask bool (H, W))."""
        t0 = time.perf_counter()
        timings = {}
        ref, timings["retrieval"] = await self.retrieve(target, modality, structure, choice)
        by_name = {v: k for k, v in ref.names.items()}
        if structure not in by_name:
            raise ApiError(422, f"structure {structure!r} is not annotated in the reference; it has "
                                f"{', '.join(sorted(by_name))}", known=sorted(by_name))
        ref_mask = ref.label == by_name[structure]
        if not ref_mask.any():
            raise ApiError(422, f"structure {structure!r} has no pixels in the reference image")
        question = Question("segment", np.asarray(to_pil(ref.image, ref.modality)), label_boxes(ref.label, ref.names),
                            np.asarray(to_pil(target, modality)), modality, structure=structure)
        t1 = time.perf_counter()
        pol, seg, t_pol = await self.policy_then_segmenter(question, ref_mask)
        timings["policy"] = t_pol - t1
        timings.update({f"policy_{k}": v for k, v in pol.timings.items() if k != "batch"})
        timings["segmenter"] = time.perf_counter() - t_pol
        timings.update({f"segmenter_{k}": v for k, v in seg.timings.items()})
        timings["total"] = time.perf_counter() - t0
        for stage in ("retrieval", "policy", "segmenter"):
            metrics.stage(stage, timings[stage])
        out = {"structure": structure, "label": pol.label or structure, "box": mask_box(seg.mask),
               "score": round(float(seg.score), 4), "reference": reference_used(ref),
               "format_error": pol.format_error, "policy_batch": pol.timings.get("batch"),
               "cached_embedding": bool(seg.cached), "timings_ms": {k: round(1000 * v, 2) for k, v in timings.items()}}
        if reasoning:
            out["reasoning"] = pol.completion
        if mask_format:
            out["mask"] = codecs.encode_mask(seg.mask, mask_format)
        return out, seg.mask

    async def label(self, image: np.ndarray, modality: str, boxes: list | None, method: str,
                    choice: ReferenceChoice) -> dict:
        """What /v1/label answers: each box (the client's; else the Policy's; else the reference's, scaled) named
        by the Policy, then the names assigned globally by optimal transport against the reference's layout."""
        t0 = time.perf_counter()
        cfg = MatchConfig(method=method)
        h, w = image.shape
        ref, _ = await self.retrieve(image, modality, None, choice)
        protos = label_boxes(ref.label, ref.names)
        rh, rw = ref.label.shape
        ref_u8, tgt_u8 = np.asarray(to_pil(ref.image, ref.modality)), np.asarray(to_pil(image, modality))
        source = "client"
        if boxes is None:  # the policy's boxes for every structure; failing that, the reference's, scaled
            ans = await self.call("policy", "answer", Question("all_boxes", ref_u8, protos, tgt_u8, modality))
            boxes, source = [b for _, b in ans.boxes or []], "policy"
            if not boxes:
                boxes = [[b[0] * w / rw, b[1] * h / rh, b[2] * w / rw, b[3] * h / rh] for b in protos.values()]
                source = "reference"
        answers = await asyncio.gather(*(self.call("policy", "answer", Question(
            "label", ref_u8, protos, tgt_u8, modality, region=[int(round(v)) for v in b])) for b in boxes))
        predicted = [a.label for a in answers]
        result = assign(boxes, (w, h), protos, (rw, rh), cfg, predicted)
        regions = [{"box": [round(float(v), 1) for v in b], "label": lab, "policy_label": p,
                    "cost": None if c != c else round(c, 4)}
                   for b, lab, p, c in zip(boxes, result.labels, predicted, result.costs)]
        return {"regions": regions, "boxes_from": source, "method": method, "reference": reference_used(ref),
                "timings_ms": {"total": round(1000 * (time.perf_counter() - t0), 2)}}

    # -- the sessions' backend -----------------------------------------------------------------------------------
    async def prompt(self, image: np.ndarray, points, labels, box, key: str | None = None) -> dict:
        """Point/box prompts on an image's cached SAM2 embedding, for a ``Session``: {mask, score, cached, timings}.
        ``prompt_decoding: ingress``: decoded right here (``PromptDecoder``) on the embedding fetched once from the
        Segmenter; ``segmenter``: decoded by the Segmenter replica holding the embedding. Either way the image's
        digest goes first (routed to the replica holding it, so no pixels travel) and the image itself only when
        that replica lacks it (first prompt, eviction, a replaced replica). ``key``: the image's digest when the
        caller has it (a session keeps it per slice)."""
        t_prompt = time.perf_counter()
        key = key or image_digest(image)
        if self.decoder is None:
            got: Prompted = await self._on_segmenter("prompt", image, key, points, labels, box)
            cached = got.cached
        else:
            cached = True
            if key not in self.decoder:
                t0 = time.perf_counter()
                features: Features = await self._on_segmenter("embedding", image, key)
                metrics.stage("embedding", time.perf_counter() - t0)
                self.decoder.put(key, features)
                cached = features.cached
            got = self.decoder.predict(key, points, labels, box)
        metrics.cache(cached)
        metrics.stage("prompt", time.perf_counter() - t_prompt)
        return {"mask": got.mask, "score": got.score, "cached": cached, "timings": got.timings}

    async def _on_segmenter(self, method: str, image: np.ndarray, key: str, *args):
        out = await self.call("segmenter", method, key, *args, route_key=key)
        if isinstance(out, NotHeld):
            out = await self.call("segmenter", method, image, *args, route_key=key)
        return out

    async def segment(self, session, target: str) -> dict:
        """The full pipeline on a session's current slice; besides the mask, what /v1/segment returns for the
        structure (the policy's reasoning, label, box, timings), so a session's segment result needs no second
        request."""
        out, mask = await self.segment_one(session.current_image(), session.modality, target, None, None)
        return {"mask": mask, **{k: out.get(k) for k in ("score", "reference", "label", "box", "reasoning",
                                                        "format_error", "timings_ms")}}
