"""The evaluation report: tables (Markdown + JSON) and pictures from prediction records, with a header saying how.

Writes into the report folder: ``report.md`` (header: date, command, seed, checkpoints with their steps and training
manifests, the held-out split; then the pictures and every table), ``tables.md``, ``tables.json``,
``predictions.jsonl`` (one scored item a line, no masks) and ``pictures/``: ``gallery.png`` (target, reference,
each method's mask and box against the truth, for each dataset's worst and best case), ``label_accuracy.png``
(per-structure accuracy bars per labeling row), ``learning_curves.png`` (the training runs' histories) and
``attention.png`` (the ``<Seg>`` query's attention over the reference's memory slots, where RAU's memory attention
collapse shows: the same slots whatever the case, or none on the structure). "n/a": that piece was not given.
Use: ``write_report(out, plan, records, recall, header(plan, command, seconds))`` (``evaluate.run_eval`` calls it).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
from pathlib import Path

import matplotlib
import matplotlib.patches as patches
import numpy as np
import torch
from matplotlib import pyplot
from matplotlib.colors import ListedColormap

from rau_ray.atomic import atomic_write_figure, atomic_write_text
from rau_ray.data.manifest import Manifests
from rau_ray.eval import tables as T
from rau_ray.models.prompts import to_pil
from rau_ray.scoring.metrics import mask_to_box

COLOURS = {"SFT": "#8da0cb", "GRPO": "#66c2a5", "OT (boxes only)": "#b3b3b3", "GRPO+OT": "#fc8d62",
           "GRPO+FGW": "#e78ac3", "SFT boxes": "#c6d0e6", "GRPO boxes": "#b3e2d3",
           "GRPO+OT (given boxes)": "#fdc7ac", "GRPO+OT (mask boxes)": "#d95f02"}


# -- header ------------------------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _device() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}"


def header(plan, command: str, seconds: float) -> dict:
    cfg = plan.cfg
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
            "seed": cfg.seed, "split": cfg.split, "reference_split": cfg.reference_split,
            "profile": plan.model.profile, "commit": _git_commit(), "machine": _device(),
            "seconds": round(seconds, 1),
            "checkpoints": {k: ck.describe() for k, ck in sorted(plan.checkpoints.items())},
            "seg_policy": cfg.seg_policy if "seg" in plan.checkpoints else None,
            "match_methods": {m: T.match_available(m) for m in ("emd", "fgw")},
            "datasets": {ds.name: {"manifest": ds.manifest, "modality": ds.modality, "distribution": ds.distribution,
                                   "held_out": ds.held_out, "targets": len(ds.targets),
                                   "references": ds.reference_split or "other subjects (test-only set)"}
                         for ds in plan.datasets},
            "volumes": plan.volumes}


# -- tables ------------------------------------------------------------------------------------------------------------
def compute(records: list[dict], recall: dict, seg_scores: list[dict] | None = None) -> dict:
    """Every table from the records (``seg_scores``: ``score_segment`` of the segment records, if already made)."""
    if seg_scores is None:
        seg_scores = [T.score_segment(r) for r in records if r["kind"] == "segment"]
    out = {"retrieval": recall, "labeling": T.labeling_table(records), "per_label": T.per_label_accuracy(records),
           "segmentation": T.segmentation_table(records, seg_scores), "volumes": T.volume_table(records),
           "latency": T.latency_table(records), "attention": T.attention_summary(records),
           "reasoning": T.reasoning_table(records), "grounding": T.grounding_table(records)}
    return out


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _with_ci(row: dict | None) -> str | None:
    """An accuracy cell: "0.812 [0.700, 0.900]" (the row's 95 % interval when it has one)."""
    if not row or row.get("accuracy") is None:
        return None
    ci = row.get("ci95")
    return f"{row['accuracy']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_tables(t: dict, hdr: dict) -> str:
    dist = {name: d["distribution"] for name, d in hdr["datasets"].items()}
    order = sorted(hdr["datasets"], key=lambda n: (dist[n] != "in", n))
    parts = ["## Retrieval (DINOv2 + faiss): recall@k, own subject excluded\n",
             _table(["dataset", "distribution", "queries", "modality@1", "modality@5", "pose@1", "pose@5"],
                    [[n, dist[n], t["retrieval"].get(n, {}).get("queries"),
                      *[t["retrieval"].get(n, {}).get(k) for k in ("modality@1", "modality@5", "pose@1", "pose@5")]]
                     for n in order]),
             "\npose: same modality and within 2 slices of the query (native 2D images: same modality).\n",
             "## Labeling accuracy (every structure of a held-out target named; chance = 1 / structures)\n"]
    rows = []
    for n in order:
        lab = t["labeling"].get(n)
        if lab is None:
            rows.append([n, dist[n], "n/a", *["n/a"] * len(T.LABEL_ROWS)])
            continue
        rows.append([n, dist[n], lab["regions"], *[_with_ci(lab["rows"].get(name)) for name, *_ in T.LABEL_ROWS]])
    parts.append(_table(["dataset", "distribution", "regions", *[name for name, *_ in T.LABEL_ROWS]], rows))
    parts.append("\nGRPO+OT, GRPO+FGW, SFT boxes, GRPO boxes: from the policy's predicted boxes (its all-boxes "
                 f"answer; a true structure is right when a box matches it at IoU >= {T.MATCH_IOU} and carries its "
                 "label; transport re-labels the boxes, a doubtful label is re-asked alone). GRPO+OT (mask boxes): "
                 "the same with each box read off the chain's own `<Seg>` mask of the structure it is labelled "
                 "(segment task -> `<Seg>` -> SAM2 over the reference memory; an empty mask drops it). SFT, GRPO, "
                 "OT (boxes only), GRPO+OT (given boxes): on the true boxes. [95 % interval, bootstrap over "
                 "subjects]\n")
    gaps = [f"{n}: {g['gap']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]" for n in order
            if (g := (t["labeling"].get(n) or {}).get("grpo_minus_sft")) and g["ci95"]]
    if gaps:
        parts.append("\nGRPO's gain over SFT naming the same given regions, paired region by region [95 % interval, "
                     "bootstrap over subjects]: " + "; ".join(gaps) + "\n")
    valid = [[n, *[(t["labeling"][n]["rows"].get(p) or {}).get("valid") for p in ("SFT", "GRPO")]]
             for n in order if n in t["labeling"]]
    if valid:
        parts += ["\nShare of answers in the valid `<think>/<answer>` format:\n", _table(["dataset", "SFT", "GRPO"],
                                                                                          valid)]
    reasoning = [[n, name, r["answers"], r["with_statements"], r["statements"],
                  _with_ci({"accuracy": r["share"], "ci95": r["ci95"]})]
                 for n in order for name, r in t.get("reasoning", {}).get(n, {}).items()]
    if reasoning:
        parts += ["\n## Reasoning: relative-position statements in `<think>` (label answers), checked against the "
                  "true boxes\n", _table(["dataset", "policy", "answers", "with statements", "statements",
                                          "share true [95 % interval]"], reasoning)]
    grounding = [[n, name, r["present"], _with_ci({"accuracy": r["iou"], "ci95": r["iou_ci95"]}), r["absent"],
                  _with_ci({"accuracy": r["null"], "ci95": r["null_ci95"]})]
                 for n in order for name, r in t.get("grounding", {}).get(n, {}).items()]
    if grounding:
        parts += ["\n## Grounding: every structure the reference shows, asked by name\n",
                  _table(["dataset", "policy", "present in target", "box IoU [95 % interval]", "absent from target",
                          "answered null [95 % interval]"], grounding),
                  "\nPresent: IoU of the answered box with the true one (null or malformed = 0); absent (resected, "
                  "or out of the slice): the right answer is null. GRPO (mask boxes): GRPO's answers with each "
                  "box read off the chain's own mask of that structure (a null answer, or an empty mask, is null).\n"]
    parts.append("\n## Segmentation (2D): per (target, structure)\n")
    rows = []
    for n in order:
        for method, r in t["segmentation"].get(n, {}).items():
            dice = _with_ci({"accuracy": r["dice"], "ci95": r.get("dice_ci95")})
            rows.append([n, dist[n], method, r["n"], dice, r["giou"], r["ciou"], r["hd95"], r["box_iou"],
                         r["empty"], r["failed"]])
        for method in T.SEG_METHODS:
            if n in t["segmentation"] and method not in t["segmentation"][n]:
                rows.append([n, dist[n], method, *["n/a"] * 8])
    parts.append(_table(["dataset", "distribution", "method", "n", "Dice [95 % interval]", "gIoU", "cIoU",
                         "HD95 (mm)", "box IoU",
                         "empty masks", "failed"], rows))
    parts.append("\nDice, box IoU: means over items (Dice's interval: bootstrap over subjects); gIoU: mean "
                 "per-item IoU; cIoU: summed intersections over summed unions. HD95: mean over items where both masks are non-empty (an empty mask has no surface; "  # noqa: E501
                 "'empty masks' counts them). 'failed': no reference found (scored as an empty mask). CBAM-LoRA SAM2 "
                 "is prompted with the true box (an oracle prompt, as in interactive use).\n")
    if t["attention"]:
        parts += ["## `<Seg>` attention over reference memory slots (VLM+SAM2)\n",
                  _table(["dataset", "cases", "entropy (1 = even)", "max weight", "mass on structure",
                          "lift over area", "cross-case similarity"],
                         [[n, a["n"], a["entropy"], a["max"], a["on_structure"], a["lift"], a["cross_case_cosine"]]
                          for n, a in t["attention"].items()]),
                  "\nCollapse reads as entropy near 0 (one slot), lift near 1 (the structure's slots get no more than "
                  "their area) or cross-case similarity near 1 (the same slots whatever the case).\n"]
    parts.append("## 3D: SAM2 propagation from one annotated slice through held-out volumes\n")
    rows = [[n, s, r["n"], r["dice"], r["hd95"], r["hd95_inf"]] for n, per in t["volumes"].items()
            for s, r in per.items()]
    parts.append(_table(["volumes", "structure", "n", "3D Dice", "HD95 (mm)", "empty"], rows) + "\n\nThe key slice "
                 "(where the structure is largest) gets the true mask; SAM2's video memory carries it both ways; Dice "
                 "and HD95 over the whole volume." if rows
                 else "n/a (no volume set given, or none of its cases is in the held-out split)")
    parts.append("\n## Latency per request (ms)\n")
    parts.append(_table(["what", "n", "median", "p95"], [[k, v["n"], v["median_ms"], v["p95_ms"]]
                                                          for k, v in t["latency"].items()]))
    return "\n".join(parts) + "\n"


def failure_notes(t: dict) -> list[str]:
    """Where it fails, in sentences read off the tables (empty masks, missing references, malformed answers, a policy
    that adds nothing over box geometry, collapsed memory attention)."""
    notes = []
    for ds, per in t["segmentation"].items():
        for method, r in per.items():
            if r["n"] and r["empty"] == r["n"]:
                notes.append(f"{ds}: {method} returned an empty mask on all {r['n']} items (for SAM2's video memory: "
                             "its object-score head judged the structure absent)")
            elif r["empty"]:
                notes.append(f"{ds}: {method} returned an empty mask on {r['empty']} of {r['n']} items")
            if r["failed"]:
                notes.append(f"{ds}: no suitable reference for {r['failed']} of {r['n']} {method} items")
    for ds, lab in t["labeling"].items():
        rows = lab["rows"]
        for name in ("SFT", "GRPO"):
            if rows.get(name) and rows[name]["valid"] is not None and rows[name]["valid"] < 0.5:
                notes.append(f"{ds}: {name} answers mostly malformed ({rows[name]['valid']:.0%} valid)")
        own = [(rows[n]["accuracy"], n) for n in ("GRPO+OT", "GRPO+OT (mask boxes)")
               if rows.get(n) and rows[n]["accuracy"] is not None]
        only = rows.get("OT (boxes only)")
        if own and only and only["accuracy"] is not None and max(own)[0] <= only["accuracy"] + 1e-9:
            best, name = max(own)
            notes.append(f"{ds}: labeling from the chain's own boxes ({name} {best:.3f}) is no better than "
                         f"transport on the true boxes alone ({only['accuracy']:.3f}): the predicted boxes fall short")
        if lab["failed_retrieval"]:
            notes.append(f"{ds}: no suitable reference for {lab['failed_retrieval']} of {lab['targets']} targets")
    for ds, a in t["attention"].items():
        why = []
        if a["cross_case_cosine"] is not None and a["cross_case_cosine"] > 0.95:
            why.append(f"the same slots whatever the case (similarity {a['cross_case_cosine']:.3f})")
        if a["entropy"] is not None and a["entropy"] > 0.95:
            why.append(f"spread almost evenly (entropy {a['entropy']:.2f})")
        elif a["entropy"] is not None and a["entropy"] < 0.1:
            why.append(f"on one slot (entropy {a['entropy']:.2f})")
        if a["lift"] is not None and a["lift"] < 1.05:
            why.append(f"no more on the structure than its area (lift {a['lift']:.2f})")
        if why:
            notes.append(f"{ds}: memory attention collapse: the <Seg> query attends " + "; ".join(why))
    return notes


def header_markdown(hdr: dict) -> str:
    cks = hdr["checkpoints"]
    lines = ["| | |", "| --- | --- |", f"| date | {hdr['date']} |", f"| command | `{hdr['command']}` |",
             f"| seed | {hdr['seed']} |", f"| commit | {hdr['commit'] or 'n/a'} |", f"| machine | {hdr['machine']} |",
             f"| model profile | {hdr['profile']} |"]
    for kind in ("sft", "grpo", "seg", "cbam"):
        ck = cks.get(kind)
        lines.append(f"| {kind} checkpoint | " + (f"`{ck['path']}` (step {ck['step']}, run {ck['run']}, trained on "
                                                 f"`{ck['manifest']}` split {ck['train_split']})" if ck else "n/a")
                     + " |")
    if hdr["seg_policy"]:
        lines.append(f"| `<Seg>` of VLM+SAM2 from | {hdr['seg_policy']} policy |")
    fgw = "available" if hdr["match_methods"].get("fgw") else "not available in rau_ray.scoring.matching yet (n/a)"
    lines.append(f"| FGW matching | {fgw} |")
    lines.append(f"| held out | targets from split `{hdr['split']}` only; references from split "
                 f"`{hdr['reference_split']}` (test-only sets: other subjects) |")
    for name, d in hdr["datasets"].items():
        lines.append(f"| dataset {name} | {d['modality']}, {d['distribution']}-distribution, {d['targets']} of "
                     f"{d['held_out']} held-out images, `{d['manifest']}` |")
    lines.append(f"| wall time | {hdr['seconds']} s |")
    return "\n".join(lines) + "\n"


# -- pictures ----------------------------------------------------------------------------------------------------------
def _plt():
    matplotlib.use("Agg")
    return pyplot


def _save(fig, path: Path) -> Path:
    return atomic_write_figure(path, fig, dpi=90)


class _Images:
    """Manifest images by id, as the models see them (CT windowed)."""

    def __init__(self):
        self._manifests = Manifests()

    def get(self, manifest: str, row_id: str):
        row, image, label = self._manifests.sample(manifest, row_id)
        return np.asarray(to_pil(image, row.modality)), label, row


def _box(ax, box, colour, dashed=False):
    if box is not None:
        x1, y1, x2, y2 = box
        ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=colour,
                                       ls="--" if dashed else "-"))


def _overlay(ax, image, pred=None, truth=None, title=""):
    ax.imshow(image, cmap="gray")
    if pred is not None and pred.any():
        ax.imshow(np.ma.masked_where(~pred, pred), cmap=ListedColormap(["red"]), alpha=0.45, vmin=0, vmax=1)
    if truth is not None and truth.any():
        ax.contour(truth.astype(float), levels=[0.5], colors="lime", linewidths=0.9)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def gallery_cases(records: list[dict], scores: list[dict], per_dataset: int) -> list[tuple[dict, dict]]:
    """Each dataset's worst and best (and median, ...) case by the Dice of VLM+SAM2 (else the first method)."""
    pairs = [(r, s) for r, s in zip([r for r in records if r["kind"] == "segment"], scores)]
    out = []
    for ds in sorted({r["dataset"] for r, _ in pairs}):
        mine = [(r, s) for r, s in pairs if r["dataset"] == ds and s]
        if not mine or per_dataset == 0:
            continue
        key = "VLM+SAM2" if "VLM+SAM2" in mine[0][1] else next(iter(mine[0][1]))
        mine.sort(key=lambda rs: (np.nan_to_num(rs[1][key]["dice"], nan=-1.0), rs[0]["target"], rs[0]["structure"]))
        idx = sorted({round(i * (len(mine) - 1) / max(1, per_dataset - 1)) for i in range(per_dataset)})
        out += [mine[i] for i in idx]
    return out


def draw_gallery(cases, path: Path, images: _Images) -> Path | None:
    if not cases:
        return None
    plt = _plt()
    methods = [m for m in T.SEG_METHODS if any(m in r["preds"] for r, _ in cases)]
    cols = 2 + len(methods)
    fig, axes = plt.subplots(len(cases), cols, figsize=(2.3 * cols, 2.45 * len(cases)), squeeze=False)
    for row_axes, (r, s) in zip(axes, cases):
        image, _, _ = images.get(r["manifest"], r["target"])
        truth = np.asarray(r["truth"], bool)
        _overlay(row_axes[0], image, None, truth, f"{r['dataset']}: {r['target']}\n{r['structure']} (truth)")
        _box(row_axes[0], mask_to_box(truth), "lime", dashed=True)
        if r.get("reference"):
            ref_img, ref_label, ref_row = images.get(r["manifest"], r["reference"])
            by_name = {v: k for k, v in ref_row.label_names.items()}
            ref_mask = ref_label == by_name.get(r["structure"], -1)
            _overlay(row_axes[1], ref_img, None, ref_mask, f"reference {r['reference']}\n"
                                                           f"similarity {_f(r.get('similarity'), 2)}")
        else:
            row_axes[1].axis("off")
            row_axes[1].set_title(f"no reference:\n{(r.get('error') or '')[:60]}", fontsize=7)
        for ax, m in zip(row_axes[2:], methods):
            if m not in r["preds"]:
                ax.axis("off")
                ax.set_title(f"{m}: n/a", fontsize=7)
                continue
            p = r["preds"][m]
            mask = None if p.get("mask") is None else np.asarray(p["mask"], bool)
            _overlay(ax, image, mask, truth, f"{m}\nDice {_f(s[m]['dice'], 2)}, box IoU {_f(s[m]['box_iou'], 2)}")
            _box(ax, mask_to_box(truth), "lime", dashed=True)
            _box(ax, p.get("box"), "red")
    fig.suptitle("red: prediction (mask, box); green: truth (contour, dashed box)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    return _save(fig, path)


def draw_label_bars(per_label: dict, path: Path) -> Path | None:
    data = {ds: rows for ds, rows in per_label.items() if rows}
    if not data:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(data), 1, figsize=(max(6.0, 0.75 * max(len(next(iter(r.values())))
                                                                          for r in data.values())), 2.8 * len(data)),
                             squeeze=False)
    for ax, (ds, rows) in zip(axes[:, 0], data.items()):
        names = sorted({s for per in rows.values() for s in per})
        width = 0.8 / len(rows)
        for i, (row, per) in enumerate(rows.items()):
            x = np.arange(len(names)) + (i - (len(rows) - 1) / 2) * width
            ax.bar(x, [per.get(s, {}).get("accuracy", 0) for s in names], width, label=row,
                   color=COLOURS.get(row))
        ax.set_xticks(np.arange(len(names)), [f"{s}\n(n={next(iter(rows.values())).get(s, {}).get('n', 0)})"
                                              for s in names], fontsize=7, rotation=30, ha="right")
        ax.set_ylim(0, 1.3)
        ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
        ax.set_ylabel("accuracy")
        ax.set_title(f"{ds}: labeling accuracy per structure", fontsize=9)
        ax.legend(fontsize=7, ncol=len(rows), loc="upper center")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


SKIP = ("step", "epoch", "resumed_from", "samples_per_s", "tokens_per_s", "rss_mb", "peak_rss_mb")
PREFERRED = ("loss", "val_accuracy", "val_label_accuracy", "rewards/accuracy/mean", "reward", "kl", "val_dice",
             "val_dice_interactive", "val_format")


def draw_curves(histories: dict[str, list[dict]], path: Path, per_run: int = 3) -> Path | None:
    runs = {}
    for kind, hist in histories.items():
        keys, series = [], set()
        for k in PREFERRED + tuple(k for row in hist for k in row):
            pts = tuple((row["step"], row[k]) for row in hist if isinstance(row.get(k), (int, float))
                        and not isinstance(row.get(k), bool) and math.isfinite(row[k]))
            if (k not in keys and k not in SKIP and len({v for _, v in pts}) > 1
                    and pts not in series):  # a series drawn under another name once (val_dice_single...) is skipped
                keys.append(k)
                series.add(pts)
        if keys:
            runs[kind] = keys[:per_run]
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(runs), per_run, figsize=(3.6 * per_run, 2.5 * len(runs)), squeeze=False)
    for row_axes, (kind, keys) in zip(axes, runs.items()):
        for ax, key in zip(row_axes, keys):
            pts = [(r["step"], r[key]) for r in histories[kind] if isinstance(r.get(key), (int, float))
                   and math.isfinite(r[key])]
            ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 30 else None, lw=1.4)
            ax.set_title(f"{kind.upper()}: {key}", fontsize=8)
            ax.set_xlabel("step", fontsize=7)
            ax.grid(alpha=0.3)
        for ax in row_axes[len(keys):]:
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def draw_attention(cases, path: Path, images: _Images) -> Path | None:
    cases = [(r, s) for r, s in cases if r["preds"].get("VLM+SAM2", {}).get("attention") is not None]
    if not cases:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(cases), 3, figsize=(8.4, 2.6 * len(cases)), squeeze=False)
    for row_axes, (r, s) in zip(axes, cases):
        p = r["preds"]["VLM+SAM2"]
        att = np.asarray(p["attention"], float).reshape(-1, np.asarray(p["attention"]).shape[-1]).mean(0)
        side = int(round(math.sqrt(att.size)))
        ref_img, ref_label, ref_row = images.get(r["manifest"], r["reference"])
        by_name = {v: k for k, v in ref_row.label_names.items()}
        ref_mask = ref_label == by_name.get(r["structure"], -1)
        h, w = ref_mask.shape
        a = s["VLM+SAM2"]["attention"] or {}
        row_axes[0].imshow(ref_img, cmap="gray")
        row_axes[0].imshow(att.reshape(side, side), cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5),
                           interpolation="nearest", vmin=0, vmax=float(att.max()) or 1.0)
        row_axes[0].contour(ref_mask.astype(float), levels=[0.5], colors="cyan", linewidths=0.9)
        row_axes[0].set_title(f"{r['reference']}: {r['structure']}\nentropy {_f(a.get('entropy'), 2)}, "
                              f"lift {_f(a.get('lift'), 2)}", fontsize=7)
        row_axes[0].axis("off")
        row_axes[1].bar(np.arange(att.size), np.sort(att)[::-1], width=1.0, color="#555")
        row_axes[1].axhline(1 / att.size, color="red", lw=0.8, ls="--")
        row_axes[1].set_title(f"{att.size} slots, sorted (red: even)", fontsize=7)
        row_axes[1].tick_params(labelsize=6)
        image, _, _ = images.get(r["manifest"], r["target"])
        mask = None if p.get("mask") is None else np.asarray(p["mask"], bool)
        _overlay(row_axes[2], image, mask, np.asarray(r["truth"], bool),
                 f"target {r['target']}\nDice {_f(s['VLM+SAM2']['dice'], 2)}")
    fig.suptitle("<Seg> attention over the reference's memory slots (cyan: the structure in the reference)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    return _save(fig, path)


# -- everything --------------------------------------------------------------------------------------------------------
def write_report(out: str | Path, plan, records: list[dict], recall: dict, hdr: dict) -> dict:
    out = Path(out)
    pictures = out / "pictures"
    pictures.mkdir(parents=True, exist_ok=True)
    seg = [r for r in records if r["kind"] == "segment"]
    scores = [T.score_segment(r) for r in seg]
    t = compute(records, recall, scores)
    images = _Images()
    cases = gallery_cases(records, scores, plan.cfg.gallery_cases)
    att_cases = [c for c in cases if "VLM+SAM2" in c[0]["preds"]]
    extra = [(r, s) for r, s in zip(seg, scores) if "VLM+SAM2" in r["preds"] and all(r is not c[0] for c in att_cases)]
    att_cases = (att_cases + extra)[:plan.cfg.attention_cases]
    drawn = {"gallery": draw_gallery(cases, pictures / "gallery.png", images),
             "label_accuracy": draw_label_bars(t["per_label"], pictures / "label_accuracy.png"),
             "learning_curves": draw_curves({k: plan.checkpoints[k].history() for k in ("sft", "grpo", "seg", "cbam")
                                             if k in plan.checkpoints},
                                            pictures / "learning_curves.png"),
             "attention": draw_attention(att_cases, pictures / "attention.png", images)}
    tables_md = markdown_tables(t, hdr)
    atomic_write_text(out / "tables.json", json.dumps(T.clean({"header": hdr, **t}), indent=1) + "\n")
    atomic_write_text(out / "tables.md", tables_md)
    lines = []
    for r, s in zip(seg, scores):
        lines.append(json.dumps(T.clean({k: v for k, v in r.items() if k not in ("truth", "preds", "ref_grid")}
                                        | {"scores": {m: {k: v for k, v in sc.items()} for m, sc in s.items()}})))
    for r in records:
        if r["kind"] == "label":
            lines.append(json.dumps(T.clean(r)))
        elif r["kind"] == "volume":
            lines.append(json.dumps(T.clean({k: v for k, v in r.items() if k not in ("truth", "pred")})))
    atomic_write_text(out / "predictions.jsonl", "".join(line + "\n" for line in lines))
    captions = {"gallery": "Where it fails: each dataset's worst and best case", "label_accuracy":
                "Labeling accuracy per structure", "learning_curves": "Learning curves of the training runs",
                "attention": "`<Seg>` attention over reference memory slots"}
    pics = "\n".join(f"### {captions[k]}\n\n![{k}](pictures/{Path(p).name})\n" if p else
                     f"### {captions[k]}\n\nn/a\n" for k, p in drawn.items())
    notes = failure_notes(t)
    where = "\n".join(f"- {n}" for n in notes) if notes else "- nothing flagged"
    report = (f"# RAU-Ray evaluation report\n\n{header_markdown(hdr)}\n## Where it fails\n\n{where}\n\n"
              f"## Pictures\n\n{pics}\n{tables_md}")
    atomic_write_text(out / "report.md", report)
    return T.clean({"report": str(out / "report.md"), "tables": str(out / "tables.json"),
            "pictures": {k: str(v) if v else None for k, v in drawn.items()},
            "labeling": {ds: {row: (v or {}).get("accuracy") if v else None for row, v in lab["rows"].items()}
                         for ds, lab in t["labeling"].items()},
            "segmentation_dice": {ds: {m: r["dice"] for m, r in per.items()} for ds, per in t["segmentation"].items()},
            "volumes_dice": {ds: per.get("all", {}).get("dice") for ds, per in t["volumes"].items()},
            "retrieval": recall, "failures": notes, "seconds": hdr["seconds"]})
