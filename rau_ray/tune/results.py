"""What a sweep leaves behind: the results table (CSV + Markdown), the metric heatmap, the best trial's checkpoint.

Pure functions over trial records (``{"trial_id", "status", "config", "history"}``: what Tune's experiment state
holds per trial), so tests feed them made-up sweeps; ``records_from_experiment`` reads a real one from disk.
Every output goes to a folder or a URI (``s3://``, ``gs://``) alike, through ``rau_ray.storage``.
Use: ``rows = trial_rows(records_from_experiment(path), paths, "val_dice", "max", 300)``;
``write_table(rows, out, ...)``; ``plot_heatmap(rows, x, y, ...)``; ``export_best(best_row(rows, "val_dice", "max"), ...)``.
"""  # noqa: E501

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from ray.tune import ExperimentAnalysis

from rau_ray import storage
from rau_ray.errors import DataError
from rau_ray.models.checkpoint import STATE, locate_checkpoint, read_history

STATUSES = ("finished", "stopped early", "error", "unfinished")


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def records_from_experiment(path: str | os.PathLike) -> list[dict]:
    """One record per trial of the Tune experiment at ``path``, from its saved state (what was last checkpointed:
    after an interrupt, the trials that were running read "unfinished")."""
    analysis = ExperimentAnalysis(str(path) if storage.is_remote(path) else str(storage.local_copy(path).resolve()))
    frames = analysis.trial_dataframes
    records = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        history = frame.to_dict("records") if frame is not None and len(frame) else []
        status = {"TERMINATED": "finished", "ERROR": "error"}.get(trial.status, "unfinished")
        records.append({"trial_id": trial.trial_id, "status": status, "path": trial.path,
                        "config": dict(trial.config.get("train_loop_config", {})), "history": history})
    return records


def trial_rows(records: list[dict], paths: list[str], metric: str, mode: str, max_t: int = 0) -> list[dict]:
    """The results table: one row per trial, best first. ``metric`` = its last reported value (the one its final
    checkpoint has), ``best_<metric>`` = the best over its reports; a finished trial whose last ``step`` is below
    ``max_t`` was stopped early (by ASHA)."""
    rows = []
    for rec in records:
        history = [h for h in rec.get("history", []) if _number(h.get(metric)) is not None]
        values = [float(h[metric]) for h in history]
        last = history[-1] if history else {}
        status = rec.get("status", "finished")
        step = _number(last.get("step"))
        if status == "finished" and max_t and step is not None and step < max_t:
            status = "stopped early"
        rows.append({"trial_id": rec["trial_id"], "status": status,
                     **{p: rec.get("config", {}).get(p) for p in paths},
                     metric: values[-1] if values else None,
                     f"best_{metric}": (max(values) if mode == "max" else min(values)) if values else None,
                     "step": int(step) if step is not None else None, "reports": len(history),
                     "time_s": round(_number(last.get("time_total_s")) or 0.0, 1)})
    sign = -1 if mode == "max" else 1
    return sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0.0), r["trial_id"]))


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The trial with the best last ``metric`` among those that finished (ASHA's early stops included)."""
    ok = [r for r in rows if r["status"] in ("finished", "stopped early") and r.get(metric) is not None]
    if not ok:
        return None
    return (max if mode == "max" else min)(ok, key=lambda r: r[metric])


def short_names(paths: list[str]) -> dict[str, str]:
    """Column titles: the last part of each dotted path, the whole path where two would clash."""
    last = [p.rsplit(".", 1)[-1] for p in paths]
    return {p: (s if last.count(s) == 1 else p) for p, s in zip(paths, last)}


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3g}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}"
    return str(value)


def write_table(rows: list[dict], out_dir: str | os.PathLike, paths: list[str], metric: str, mode: str,
                title: str = "") -> dict[str, str]:
    """``results.csv`` (every column, plain values) and ``results.md`` (ranked, short titles) in ``out_dir`` (a
    folder or a URI)."""
    columns = ["trial_id", "status", *paths, metric, f"best_{metric}", "step", "reports", "time_s"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
    csv_at = storage.write_text(storage.join(out_dir, "results.csv"), buf.getvalue())

    names = short_names(paths)
    head = ["rank", "trial", "status", *[names[p] for p in paths], f"{metric} (last)", "best", "step", "reports",
            "time (s)"]
    lines = [f"# Sweep {title}".rstrip(), "",
             f"{len(rows)} trials, ranked by {metric} at the last report ({mode}).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows, 1):
        cells = [str(i), row["trial_id"], row["status"], *[_fmt(row.get(p)) for p in paths], _fmt(row.get(metric)),
                 _fmt(row.get(f"best_{metric}")), _fmt(row.get("step")), str(row.get("reports", "")),
                 f"{row['time_s']:.0f}" if row.get("time_s") is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    md_at = storage.write_text(storage.join(out_dir, "results.md"), "\n".join(lines) + "\n")
    return {"table_csv": str(csv_at), "table_md": str(md_at)}


def heatmap_cells(rows: list[dict], x: str, y: str, metric: str, mode: str):
    """(x values, y values, cells[y][x]): the row with the best ``metric`` per cell (over the other searched values),
    None where no trial of that cell reported."""
    def order(values):
        return sorted({v for v in values if v is not None}, key=lambda v: (not isinstance(v, (int, float)), v))

    xs, ys = order(r.get(x) for r in rows), order(r.get(y) for r in rows)
    pick = max if mode == "max" else min
    cells = []
    for yv in ys:
        line = []
        for xv in xs:
            cell = [r for r in rows if r.get(x) == xv and r.get(y) == yv and r.get(metric) is not None]
            line.append(pick(cell, key=lambda r: r[metric]) if cell else None)
        cells.append(line)
    return xs, ys, cells


def heatmap_grid(rows: list[dict], x: str, y: str, metric: str, mode: str):
    """(x values, y values, matrix[y][x]) of the best ``metric`` per cell; None where no trial reported."""
    xs, ys, cells = heatmap_cells(rows, x, y, metric, mode)
    return xs, ys, [[None if c is None else c[metric] for c in line] for line in cells]


def plot_heatmap(rows: list[dict], x: str, y: str, metric: str, mode: str, out: str | os.PathLike,
                 title: str = "") -> Path | str:
    """A PNG of ``metric`` over the ``x`` x ``y`` values (best per cell, annotated, with the step where ASHA stopped
    it; grey: no result) at ``out`` (a path or a URI)."""
    matplotlib.use("Agg")
    xs, ys, cells = heatmap_cells(rows, x, y, metric, mode)
    matrix = [[None if c is None else c[metric] for c in line] for line in cells]
    if not xs or not ys:
        raise DataError(f"no trial has values for both {x} and {y}: nothing to draw")
    data = np.array([[np.nan if v is None else v for v in line] for line in matrix], dtype=float)
    names = short_names([x, y])
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 2.6, 0.9 * len(ys) + 1.8))
    cmap = matplotlib.colormaps["viridis" if mode == "max" else "viridis_r"].with_extremes(bad="#dddddd")
    finite = data[np.isfinite(data)]
    image = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, origin="lower", aspect="auto",
                      vmin=finite.min() if finite.size else 0, vmax=finite.max() if finite.size else 1)
    ax.set_xticks(range(len(xs)), [_fmt(v) for v in xs])
    ax.set_yticks(range(len(ys)), [_fmt(v) for v in ys])
    ax.set_xlabel(names[x])
    ax.set_ylabel(names[y])
    best = (np.nanargmax if mode == "max" else np.nanargmin)(data) if finite.size else None
    for i in range(len(ys)):
        for j in range(len(xs)):
            text = "–" if np.isnan(data[i, j]) else f"{data[i, j]:.3f}"
            if cells[i][j] is not None and cells[i][j]["status"] == "stopped early":
                text += f"\nstopped @{cells[i][j]['step']}"  # ASHA: compared at a rung, not at the end
            bold = best is not None and (i, j) == np.unravel_index(best, data.shape)
            shade = float(image.norm(data[i, j])) if not np.isnan(data[i, j]) else 1.0
            light = (shade if mode == "max" else 1 - shade) > 0.6  # viridis' bright end: dark text
            ax.text(j, i, text, ha="center", va="center", fontsize=9, fontweight="bold" if bold else "normal",
                    color="black" if light else "white")
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(f"{title}: {metric} ({mode}, best per cell)" if title else f"{metric} ({mode}, best per cell)",
                 fontsize=10)
    fig.tight_layout()
    return storage.write_figure(out, fig)


def export_best(best: dict, config: dict, run_dir: str | os.PathLike, out_dir: str | os.PathLike, metric: str,
                job: str = "") -> dict:
    """Copy the best trial's latest checkpoint (``run_dir``: its Ray Train run) to ``out_dir/best/`` and write
    ``best.json`` (trial, its searched ``config``, metric, source); returns best.json's content. A local ``out_dir``:
    a temp copy beside it, then renamed over any older export. A URI: best.json is removed first, best/ replaced
    by an upload, and best.json written last, so a best.json always describes a complete best/."""
    source = locate_checkpoint(run_dir)  # a local folder or a URI
    local = storage.local_copy(source, "checkpoint")  # a URI's: downloaded once
    step = int(json.loads((local / STATE).read_text()).get("step", 0))
    at_step = [row for row in read_history(local) if row.get("step") == step and metric in row]
    if storage.is_remote(out_dir):
        target = storage.join(out_dir, "best")
        storage.remove(storage.join(out_dir, "best.json"))
        storage.remove(target)
        storage.upload_dir(local, target)
    else:
        out_dir = storage.local_copy(out_dir)
        target = out_dir / "best"
        tmp = Path(tempfile.mkdtemp(prefix=".best-", dir=out_dir))
        shutil.copytree(local, tmp / "best")
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=".best-old-", dir=out_dir))
            os.replace(target, old / "best")
        os.replace(tmp / "best", target)
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    info = {"job": job, "trial_id": best["trial_id"], "config": config, "metric": metric, "value": best.get(metric),
            "step": best.get("step"), "checkpoint_step": step,
            "checkpoint_metric": at_step[-1][metric] if at_step else None, "source": str(source),
            "path": str(target)}
    storage.write_text(storage.join(out_dir, "best.json"), json.dumps(info, indent=2, default=str))
    return info
