"""What a reference is (an annotated image a target is compared with) and the key of the SAM2 embedding caches.

Light on purpose (numpy only): the serving processes that pass references along or key caches without running a model
(the Ingress's typed messages and sessions, the Commander) import this, not ``rau_ray.models.rau``'s models.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass
class Reference:
    image: np.ndarray  # as stored (CT in HU)
    label: np.ndarray  # integer label map
    names: dict[int, str]  # label value -> structure name
    modality: str = "CT"
    row: dict | None = None  # the bank's metadata row when retrieved
    similarity: float | None = None


def image_digest(image: np.ndarray) -> str:
    """The key of the embedding caches (SAM2 image embeddings in ``RAUModel`` and in the serving Segmenter): SHA-1
    of the pixels, shape and dtype."""
    a = np.ascontiguousarray(image)
    return hashlib.sha1(a.tobytes() + str((a.shape, a.dtype)).encode()).hexdigest()
