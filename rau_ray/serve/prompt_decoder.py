"""SAM2's prompt encoder + mask decoder next to the sessions: a click is decoded in the Ingress itself, on the image's
embedding fetched once from the Segmenter (which ran the encoder), so a click costs no handle hop.

This is SAM's split — the heavy image encoder runs once per image where the accelerator is, the light prompt
decoder runs for every click close to the user — applied to the serving graph. It pays where a hop costs more than
the decode: the CPU profile (tiny SAM2: ~1 ms decode vs ~2-3 ms per hop on 2 cores). On GPUs keep
``prompt_decoding: segmenter`` (serve_configs/gpu.yaml): SAM2.1-large's features are ~16 MB per image to ship and its
decoder is fast on the GPU the Segmenter already holds.
Use: ``decoder = PromptDecoder(segmenter)`` (a loaded RAUSegmenter; its image encoder is dropped here),
``decoder.put(key, features)`` with what ``Segmenter.embedding`` returns (``Features``),
``decoder.predict(key, points, ...)`` -> ``Prompted``.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch

from rau_ray.models.sam2_builder import ImageEmbedding, predict_with_prompts
from rau_ray.serve.messages import Features, Prompted


def features_to_numpy(embedding: ImageEmbedding) -> Features:
    """An ImageEmbedding -> plain float32 arrays (what a handle call ships; Ray pickles numpy cheaply; a GPU
    Segmenter's features are bf16, which numpy has not)."""
    f = embedding.features
    return Features(f["image_embed"].detach().float().cpu().numpy(),
                    tuple(t.detach().float().cpu().numpy() for t in f["high_res_feats"]),
                    tuple(int(v) for v in embedding.orig_hw))


class PromptDecoder:
    """Point/box prompts -> masks on cached embeddings (an LRU of ``capacity`` images)."""

    def __init__(self, segmenter, capacity: int = 32):
        self.predictor = segmenter.predictor
        self.predictor.model.image_encoder = torch.nn.Identity()  # never run here: the Segmenter encodes images
        self.device = next(self.predictor.model.sam_mask_decoder.parameters()).device
        self.capacity = int(capacity)
        self._embeddings: OrderedDict = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._embeddings

    def put(self, key: str, features: Features) -> None:
        def tensor(a):
            return torch.tensor(np.asarray(a), device=self.device)  # a copy: arrays from Ray may be read-only

        emb = ImageEmbedding({"image_embed": tensor(features.image_embed),
                              "high_res_feats": [tensor(a) for a in features.high_res_feats]},
                             tuple(features.orig_hw))
        self._embeddings[key] = emb
        self._embeddings.move_to_end(key)
        while len(self._embeddings) > self.capacity:
            self._embeddings.popitem(last=False)

    def predict(self, key: str, points: list | None = None, labels: list | None = None,
                box: list | None = None) -> Prompted:
        """The mask (bool (H, W)) and score for the prompts, as ``Segmenter.prompt`` answers (KeyError when the
        image's embedding is not here: ``put`` it first); ``cached`` is the caller's to say."""
        emb = self._embeddings[key]
        self._embeddings.move_to_end(key)
        t0 = time.perf_counter()
        mask, score = decode_prompts(self.predictor, emb, points, labels, box)
        return Prompted(mask, score, timings={"embed": 0.0, "decode": time.perf_counter() - t0})


def decode_prompts(predictor, embedding, points: list | None, labels: list | None,
                   box: list | None) -> tuple[np.ndarray, float]:
    """SAM2 on a cached embedding with point ([[x, y], ...], labels 1/0) and/or box [x1, y1, x2, y2] prompts ->
    (bool (H, W) mask, score): the one decode both the Segmenter and the Ingress run."""
    pts = np.asarray(points, dtype=np.float32) if points else None
    lab = np.asarray(labels, dtype=np.int32) if points else None
    bx = np.asarray(box, dtype=np.float32) if box is not None else None
    with torch.no_grad():
        masks, scores, _ = predict_with_prompts(predictor, embedding, pts, lab, bx, multimask=False)
    return np.asarray(masks[0]) > 0, float(scores[0])
