"""Learning curves: a run's metric history (``history.jsonl`` in its checkpoints) drawn as one PNG.

One panel per metric that changes over the run (loss, validation accuracy, rewards, Dice...), step on the x axis.
Use: ``plot_history(read_history(checkpoint_dir), "runs/sft/curves.png", title="SFT")``.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from rau_ray.storage import write_figure

# shown first, in this order, when present; any other changing metric follows
PREFERRED = ("loss", "val_accuracy", "val_label_accuracy", "val_ground_accuracy", "val_format", "reward",
             "rewards/accuracy/mean", "rewards/format/mean", "kl", "val_dice", "dice", "focal")
SKIP = ("step", "epoch", "samples_per_s", "tokens_per_s", "rss_mb", "peak_rss_mb", "resumed_from")


def curve_keys(history: list[dict]) -> list[str]:
    keys = []
    for row in history:
        keys += [k for k, v in row.items() if k not in keys and k not in SKIP and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
    changing = [k for k in keys if len({row[k] for row in history if k in row and not math.isnan(row[k])}) > 1]
    ordered = [k for k in PREFERRED if k in changing] + [k for k in changing if k not in PREFERRED]
    series, unique = set(), []
    for k in ordered:  # one task only: val_label_accuracy repeats val_accuracy, draw it once
        points = tuple((row["step"], row[k]) for row in history if k in row)
        if points not in series:
            series.add(points)
            unique.append(k)
    return unique


def plot_history(history: list[dict], out: str | Path, title: str = "", keys: list[str] | None = None,
                 max_panels: int = 8) -> Path | str:
    """The PNG at ``out`` (a path, or a URI: ``storage.write_figure``)."""
    matplotlib.use("Agg")
    keys = (keys or curve_keys(history))[:max_panels]
    if not keys:
        raise ValueError("no metric changes over the run: nothing to draw")
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in history if key in r and not math.isnan(r[key])]
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None, lw=1.5)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return write_figure(out, fig)
