"""What the models are asked about a sample: per-structure boxes derived from label masks.

Use: ``boxes = label_boxes(label_map, {1: "liver", 2: "spleen"})`` -> {"liver": [x1, y1, x2, y2], ...}
(pixel corners, x2/y2 exclusive; structures without pixels are left out).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def label_boxes(label: np.ndarray, names: dict[int, str]) -> dict[str, list[int]]:
    label = np.asarray(label)
    slices = ndimage.find_objects(label.astype(np.int32))
    boxes = {}
    for value, name in sorted(names.items()):
        if 0 < value <= len(slices) and slices[value - 1] is not None:
            ys, xs = slices[value - 1]
            boxes[name] = [int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)]
    return boxes
