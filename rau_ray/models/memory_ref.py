"""SAM2's own video memory, used two ways: the SAM2-Memory-Ref baseline and 3D propagation through a volume.

Baseline (no VLM): the reference image + mask is frame 0, the target frame 1; SAM2 propagates the mask.
3D: the slices of a volume are frames; a key slice's mask is propagated both ways. sam2 1.1.0 reads frames from
a folder of JPEGs, so frames are written (quality 100) to a temporary folder that is removed afterwards.
Use: ``mask = memory_ref_baseline(build_video_predictor(), ref_u8, ref_mask, target_u8)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rau_ray.models.sam2_builder import as_rgb_uint8


def _frames_folder(frames: list[np.ndarray], folder: Path) -> None:
    shape = frames[0].shape[:2]
    for i, frame in enumerate(frames):
        if frame.shape[:2] != shape:
            raise ValueError(f"all frames must share one size; frame {i} is {frame.shape[:2]}, frame 0 {shape}")
        Image.fromarray(as_rgb_uint8(frame)).save(folder / f"{i:05d}.jpg", quality=100)


@torch.inference_mode()
def _propagate(predictor, frames: list[np.ndarray], key: int, key_mask: np.ndarray,
               directions: tuple[bool, ...]) -> np.ndarray:
    with tempfile.TemporaryDirectory(prefix="rau-frames-") as tmp:
        _frames_folder(frames, Path(tmp))
        state = predictor.init_state(video_path=tmp)
    predictor.add_new_mask(state, frame_idx=key, obj_id=1, mask=np.asarray(key_mask, dtype=bool))
    out = np.zeros((len(frames), *frames[0].shape[:2]), dtype=bool)
    out[key] = key_mask
    for reverse in directions:
        for idx, _, logits in predictor.propagate_in_video(state, start_frame_idx=key, reverse=reverse):
            if idx != key:
                out[idx] = (logits[0, 0] > 0).cpu().numpy()
    predictor.reset_state(state)
    return out


def memory_ref_baseline(predictor, ref_image: np.ndarray, ref_mask: np.ndarray, target_image: np.ndarray) -> np.ndarray:
    """The reference mask carried to the target by SAM2's memory: (H, W) bool (target and reference same size)."""
    return _propagate(predictor, [ref_image, target_image], 0, ref_mask, (False,))[1]


def propagate_volume(predictor, slices: np.ndarray, key_index: int, key_mask: np.ndarray) -> np.ndarray:
    """Masks for every slice of a (Z, H, W) uint8 volume from one annotated key slice, in both directions."""
    if not 0 <= key_index < len(slices):
        raise ValueError(f"key_index {key_index} outside the volume's {len(slices)} slices")
    return _propagate(predictor, list(slices), key_index, key_mask, (False, True))
