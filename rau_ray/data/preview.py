"""Preview datasets as a picture: a grid of images with coloured label overlays and a legend per dataset.

Takes 2D datasets (``manifest.jsonl``) and 3D ones (``dataset.json``: the most-labelled axial slice of each case).
Use: ``rau data preview data/ct data/angio --out grid.png`` (one block of rows per dataset).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch

from rau_ray.atomic import atomic_write_figure
from rau_ray.data import formats
from rau_ray.data.importers import axial_slice, read_dataset_json
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import DataError


def _spread(n_total: int, n: int) -> list[int]:
    return sorted({int(round(i)) for i in np.linspace(0, n_total - 1, min(n, n_total))})


def load_examples(folder: Path, n: int) -> tuple[str, list[tuple[str, np.ndarray, np.ndarray, str]], dict[int, str]]:
    """(title, [(caption, image, label, modality)], label names) for up to n samples spread over the dataset."""
    if (folder / "manifest.jsonl").is_file() or folder.suffix == ".jsonl":
        m = read_manifest(folder)
        rows = sorted(m.rows, key=lambda r: r.id)
        picked = [rows[i] for i in _spread(len(rows), n)]
        names: dict[int, str] = {}
        for r in picked:
            names.update(r.label_names)
        title = f"{folder.name}: {len(rows)} samples, {rows[0].modality}"
        return title, [(r.id, *m.load(r), r.modality) for r in picked], names
    if (folder / "dataset.json").is_file():
        spec = read_dataset_json(folder / "dataset.json")
        out = []
        for i in _spread(len(spec.cases), n):
            case = spec.cases[i]
            image, _, _ = formats.read_nifti(case.image)
            label = formats.read_nifti_label(case.label)
            k = int(np.argmax((label > 0).reshape(-1, label.shape[2]).sum(0)))
            out.append((f"{case.id} z={k}", axial_slice(image, k), axial_slice(label, k), spec.modality))
        return f"{spec.name}: {len(spec.cases)} volumes, {spec.modality}", out, spec.labels
    raise DataError(f"{folder}: neither manifest.jsonl nor dataset.json found")


def to_grey(image: np.ndarray, modality: str, window="abdomen") -> np.ndarray:
    if modality == "CT":
        return formats.apply_window(image, window)
    return np.asarray(image, dtype=np.float32)


def preview(folders: list[str | Path], out: str | Path, n: int = 8, cols: int = 4, window="abdomen") -> Path:
    """Draw up to ``n`` samples of each dataset folder, ``cols`` a row; write the PNG atomically."""
    matplotlib.use("Agg")
    blocks = [load_examples(Path(f), n) for f in folders]
    rows_per = [math.ceil(len(ex) / cols) for _, ex, _ in blocks]
    fig, axes = plt.subplots(sum(rows_per), cols, figsize=(2.6 * cols + 2.4, 2.9 * sum(rows_per)), squeeze=False)
    cmap = plt.get_cmap("tab20")
    r0 = 0
    for (title, examples, names), nrows in zip(blocks, rows_per):
        for j in range(nrows * cols):
            ax = axes[r0 + j // cols][j % cols]
            ax.axis("off")
            if j >= len(examples):
                continue
            caption, image, label, modality = examples[j]
            ax.imshow(to_grey(image, modality, window), cmap="gray", interpolation="nearest")
            overlay = np.zeros(label.shape + (4,))
            for value in np.unique(label[label > 0]):
                overlay[label == value] = (*cmap((int(value) - 1) % 20)[:3], 0.45)
            ax.imshow(overlay, interpolation="nearest")
            ax.set_title(caption, fontsize=8)
        axes[r0][0].text(0, 1.18, title, transform=axes[r0][0].transAxes, fontsize=11, weight="bold")
        handles = [Patch(color=cmap((v - 1) % 20), label=f"{v} {name}") for v, name in sorted(names.items())]
        axes[r0][cols - 1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8,
                                  frameon=False)
        r0 += nrows
    fig.tight_layout()
    return atomic_write_figure(out, fig)
