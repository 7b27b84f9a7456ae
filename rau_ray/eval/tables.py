"""Predictions -> numbers: the evaluation job's tables, computed from plain prediction records, no model involved.

The job's workers (``rau_ray.eval.evaluate``) turn each held-out target into one record per kind; everything the
report shows is computed here from those records, so a test can feed records whose right answers are known.
Records (dicts):
- ``label``: one target image, every structure in it a region to name. ``regions`` [{"structure", "box"}] (truth,
  target pixels), ``size`` / ``ref_size`` [w, h], ``ref_boxes`` {name: box} (the retrieved reference's structures),
  ``answers`` {policy: [label or None per region]} (None: malformed answer), ``seconds`` {policy: [per answer]},
  ``error`` (no reference found: every region counts wrong).
- ``segment``: one (target, structure). ``truth`` (H, W) bool, ``spacing`` [x, y] mm, ``preds`` {method: {"mask",
  "box", "seconds", "timings", "attention" (n, slots) or None, "error"}}, ``ref_grid`` (side, side) share of each
  memory slot covered by the reference structure (for the attention diagnostics).
- ``volume``: one (volume, structure) propagated from one annotated slice. ``truth`` / ``pred`` (Z, H, W) bool,
  ``spacing`` [z, y, x] mm.
Labeling rows: SFT and GRPO are the policies' own answers, one region at a time; GRPO+OT / GRPO+FGW re-assign the
GRPO answers jointly over the target's regions by optimal transport (``rau_ray.eval.matching.assign``, the answers
as its label bonus, the reference's boxes as prototypes; a region left unassigned or matched at a cost above
``MatchConfig.unmatched_cost`` falls back to the policy's answer for that region alone); "OT (boxes only)" is the
same transport without answers,
the baseline a policy must beat. FGW appears when ``MatchConfig`` accepts ``"fgw"`` (n/a otherwise).
Use: ``labeling_table(records)``, ``segmentation_table(records)``, ``latency_table(records)``, ``volume_table(...)``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from rau_ray.eval import metrics
from rau_ray.eval.matching import MatchConfig, assign

# (row name, the policy whose answers it scores, the transport method that re-assigns them or None). "OT (boxes
# only)" is transport without any policy answer: what box geometry against the reference alone gets right, so a
# GRPO+OT gain over it is the policy's
LABEL_ROWS = (("SFT", "sft", None), ("GRPO", "grpo", None), ("OT (boxes only)", None, "emd"),
              ("GRPO+OT", "grpo", "emd"), ("GRPO+FGW", "grpo", "fgw"))
SEG_METHODS = ("SAM2-Memory-Ref", "VLM+SAM2", "CBAM-LoRA SAM2 (box)")


def match_available(method: str) -> bool:
    """Whether ``rau_ray.eval.matching`` knows ``method`` (FGW arrives there separately)."""
    try:
        MatchConfig(method=method).validate()
    except Exception:  # noqa: BLE001 -- any refusal means "not available"
        return False
    return True


def same_label(answer, truth: str) -> bool:
    """A right label: case and surrounding blanks ignored (as ``rau_ray.eval.scoring`` compares them)."""
    return isinstance(answer, str) and answer.strip().casefold() == truth.strip().casefold()


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else x


# -- labeling ----------------------------------------------------------------------------------------------------------
def row_labels(record: dict, policy: str | None, method: str | None) -> list[str | None] | None:
    """The labels a row gives the record's regions; None when the row cannot be computed (no such policy's answers,
    or the transport method is not available). ``policy`` None: transport on the boxes alone."""
    answers = record.get("answers", {}).get(policy) if policy else None
    if (policy and answers is None) or (method is not None and not match_available(method)):
        return None
    if record.get("error"):
        return [None] * len(record["regions"])
    if method is None:
        return list(answers)
    boxes = [r["box"] for r in record["regions"]]
    cfg = MatchConfig(method=method)
    plan = assign(boxes, tuple(record["size"]), record["ref_boxes"], tuple(record["ref_size"]), cfg,
                  predicted_labels=list(answers) if answers else None)
    if not answers:
        return plan.labels
    # the fallback: a region the transport leaves unassigned, or assigns at a cost above ``unmatched_cost`` (low
    # confidence), takes the policy's answer to that region asked alone (the one-region question it was asked)
    return [answer if label is None or not cost <= cfg.unmatched_cost else label
            for label, cost, answer in zip(plan.labels, plan.costs, answers)]


def labeling_table(records: list[dict]) -> dict:
    """{dataset: {"targets", "regions", "rows": {row: {"accuracy", "correct", "valid"} or None}}}, micro-averaged
    over regions; "valid": share of the policy's answers that parsed."""
    out: dict = {}
    for ds, recs in _by_dataset(records, "label").items():
        n = sum(len(r["regions"]) for r in recs)
        rows = {}
        for name, policy, method in LABEL_ROWS:
            per = [row_labels(r, policy, method) for r in recs]
            if any(p is None for p in per) or not recs:
                rows[name] = None
                continue
            correct = sum(same_label(lab, reg["structure"]) for r, p in zip(recs, per)
                          for lab, reg in zip(p, r["regions"]))
            answered = [a for r in recs if not r.get("error") for a in r["answers"][policy]] if policy else []
            rows[name] = {"accuracy": correct / n if n else None, "correct": int(correct),
                          "valid": sum(a is not None for a in answered) / len(answered) if answered else None}
        out[ds] = {"targets": len(recs), "regions": n, "failed_retrieval": sum(bool(r.get("error")) for r in recs),
                   "rows": rows}
    return out


def per_label_accuracy(records: list[dict]) -> dict:
    """{dataset: {row: {structure: {"n", "correct", "accuracy"}}}} for the rows that can be computed."""
    out: dict = {}
    for ds, recs in _by_dataset(records, "label").items():
        table: dict = {}
        for name, policy, method in LABEL_ROWS:
            per = [row_labels(r, policy, method) for r in recs]
            if not recs or any(p is None for p in per):
                continue
            counts: dict = defaultdict(lambda: [0, 0])
            for r, p in zip(recs, per):
                for lab, reg in zip(p, r["regions"]):
                    counts[reg["structure"]][0] += 1
                    counts[reg["structure"]][1] += same_label(lab, reg["structure"])
            table[name] = {s: {"n": n, "correct": c, "accuracy": c / n} for s, (n, c) in sorted(counts.items())}
        out[ds] = table
    return out


# -- segmentation ------------------------------------------------------------------------------------------------------
def attention_stats(attention, ref_grid) -> dict | None:
    """The ``<Seg>`` query's attention over memory slots: normalised entropy (1 = spread evenly, 0 = one slot), the
    largest weight, the attention mass on slots the reference structure covers and its lift over that area share
    (1 = no preference for the structure; a collapsed memory attention shows entropy near 0 or lift near 1)."""
    if attention is None:
        return None
    a = np.asarray(attention, dtype=np.float64).reshape(-1, np.asarray(attention).shape[-1]).mean(0)
    a = a / a.sum() if a.sum() > 0 else a
    slots = a.size
    entropy = float(-(a[a > 0] * np.log(a[a > 0])).sum() / math.log(slots)) if slots > 1 else 0.0
    out = {"entropy": entropy, "max": float(a.max()), "on_structure": None, "lift": None}
    if ref_grid is not None:
        g = np.asarray(ref_grid, dtype=np.float64).reshape(-1)
        if g.size == slots and g.sum() > 0:
            on = float((a * g).sum())
            out["on_structure"], out["lift"] = on, on / float(g.mean())
    return out


def score_segment(record: dict) -> dict:
    """Per method: dice, iou, intersection, union, hd95 (mm; inf when one mask is empty), box IoU with the true
    box (0 without a box), attention diagnostics. A method that failed on the item scores as an empty mask."""
    truth = np.asarray(record["truth"], dtype=bool)
    spacing = (record["spacing"][1], record["spacing"][0])  # [x, y] mm -> array axes (rows = y, cols = x)
    true_box = metrics.mask_to_box(truth)
    out = {}
    for method, p in record["preds"].items():
        mask = np.zeros_like(truth) if p.get("mask") is None else np.asarray(p["mask"], dtype=bool)
        inter, union = int((mask & truth).sum()), int((mask | truth).sum())
        box = p.get("box")
        out[method] = {
            "dice": metrics.dice(mask, truth), "iou": metrics.iou(mask, truth), "inter": inter, "union": union,
            "hd95": metrics.hd95(mask, truth, spacing=spacing) if truth.any() or mask.any() else math.nan,
            "box_iou": float(metrics.box_iou(box, true_box)) if box is not None and true_box is not None else 0.0,
            "empty": not mask.any(), "error": p.get("error"),
            "attention": attention_stats(p.get("attention"), record.get("ref_grid"))}
    return out


def segmentation_table(records: list[dict], scores: list[dict] | None = None) -> dict:
    """{dataset: {method: {"n", "dice", "giou", "ciou", "hd95", "hd95_inf", "box_iou", "failed", attention...}}}.

    Dice / box IoU: means over items; gIoU: mean of per-item IoU; cIoU: summed intersections over summed unions
    (``metrics.giou`` / ``metrics.ciou``); HD95: mean over items where both masks are non-empty, "hd95_inf" counts
    the others (an empty prediction has no surface)."""
    recs = [r for r in records if r["kind"] == "segment"]
    scores = scores if scores is not None else [score_segment(r) for r in recs]
    grouped: dict = defaultdict(lambda: defaultdict(list))
    for r, s in zip(recs, scores):
        for method, sc in s.items():
            grouped[r["dataset"]][method].append(sc)
    out: dict = {}
    for ds in sorted(grouped):
        out[ds] = {}
        for method in [m for m in SEG_METHODS if m in grouped[ds]] + sorted(set(grouped[ds]) - set(SEG_METHODS)):
            items = grouped[ds][method]
            pairs = [(s["inter"], s["union"]) for s in items]
            hd = [s["hd95"] for s in items]
            finite = [h for h in hd if math.isfinite(h)]
            att = [s["attention"] for s in items if s["attention"]]
            row = {"n": len(items), "dice": _mean([s["dice"] for s in items]),
                   "giou": float(np.mean([1.0 if u == 0 else i / u for i, u in pairs])) if pairs else None,
                   "ciou": sum(i for i, _ in pairs) / sum(u for _, u in pairs) if sum(u for _, u in pairs) else None,
                   "hd95": float(np.mean(finite)) if finite else None, "hd95_inf": sum(math.isinf(h) for h in hd),
                   "box_iou": _mean([s["box_iou"] for s in items]), "empty": sum(s["empty"] for s in items),
                   "failed": sum(bool(s["error"]) for s in items)}
            if att:
                row["attention_entropy"] = _mean([a["entropy"] for a in att])
                row["attention_lift"] = _mean([a["lift"] for a in att if a["lift"] is not None])
            out[ds][method] = row
    return out


def attention_summary(records: list[dict], method: str = "VLM+SAM2") -> dict:
    """{dataset: {"n", "entropy", "max", "on_structure", "lift", "cross_case_cosine"}} of the ``<Seg>`` attention:
    means over cases, and the mean cosine similarity between the attention maps of different cases (near 1: the
    query attends the same slots whatever the case, a collapsed memory attention)."""
    grouped: dict = defaultdict(list)
    for r in records:
        p = r["preds"].get(method) if r["kind"] == "segment" else None
        if p and p.get("attention") is not None:
            grouped[r["dataset"]].append((np.asarray(p["attention"], np.float64).reshape(
                -1, np.asarray(p["attention"]).shape[-1]).mean(0), attention_stats(p["attention"], r.get("ref_grid"))))
    out = {}
    for ds, items in sorted(grouped.items()):
        vecs = np.stack([v / (np.linalg.norm(v) or 1.0) for v, _ in items])
        n = len(items)
        cos = float((vecs @ vecs.T)[~np.eye(n, dtype=bool)].mean()) if n > 1 else None
        out[ds] = {"n": n, **{k: _mean([s[k] for _, s in items]) for k in ("entropy", "max", "on_structure", "lift")},
                   "cross_case_cosine": cos}
    return out


# -- latency, volumes, retrieval ---------------------------------------------------------------------------------------
def _stats_ms(seconds: list[float]) -> dict:
    if not seconds:
        return {"n": 0, "median_ms": None, "p95_ms": None}
    s = np.asarray(seconds, dtype=np.float64) * 1000
    return {"n": len(s), "median_ms": float(np.median(s)), "p95_ms": float(np.percentile(s, 95))}


def latency_table(records: list[dict]) -> dict:
    """Per request (one structure of one target; one answer of the label task), over all datasets: median and p95
    in ms; for VLM+SAM2 also its stages (retrieval, generate, seg_hidden, embed, decode)."""
    out: dict = {}
    for name, policy, method in LABEL_ROWS:
        if method is None:
            secs = [s for r in records if r["kind"] == "label" for s in r.get("seconds", {}).get(policy, [])]
            if secs:
                out[f"label answer ({name})"] = _stats_ms(secs)
    stages: dict = defaultdict(list)
    for method in SEG_METHODS:
        secs = [r["preds"][method]["seconds"] for r in records if r["kind"] == "segment" and method in r["preds"]
                and r["preds"][method].get("seconds") is not None]
        if secs:
            out[method] = _stats_ms(secs)
    for r in records:
        if r["kind"] == "segment" and "VLM+SAM2" in r["preds"]:
            for stage, s in (r["preds"]["VLM+SAM2"].get("timings") or {}).items():
                if stage != "total":
                    stages[stage].append(s)
    for stage, secs in stages.items():
        out[f"VLM+SAM2: {stage}"] = _stats_ms(secs)
    return out


def volume_table(records: list[dict]) -> dict:
    """{dataset: {structure or "all": {"n", "dice", "hd95", "hd95_inf"}}}: 3D Dice / HD95 (mm) of the propagated
    masks over whole volumes."""
    grouped: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["kind"] != "volume":
            continue
        truth, pred = np.asarray(r["truth"], bool), np.asarray(r["pred"], bool)
        sc = (metrics.dice(pred, truth), metrics.hd95(pred, truth, spacing=tuple(r["spacing"])))
        grouped[r["dataset"]][r["structure"]].append(sc)
        grouped[r["dataset"]]["all"].append(sc)
    out: dict = {}
    for ds, per in sorted(grouped.items()):
        out[ds] = {}
        for s in sorted(per, key=lambda k: (k == "all", k)):
            hd = [h for _, h in per[s]]
            finite = [h for h in hd if math.isfinite(h)]
            out[ds][s] = {"n": len(per[s]), "dice": _mean([d for d, _ in per[s]]),
                          "hd95": float(np.mean(finite)) if finite else None,
                          "hd95_inf": sum(math.isinf(h) for h in hd)}
    return out


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


def _by_dataset(records: list[dict], kind: str) -> dict[str, list[dict]]:
    out: dict = defaultdict(list)
    for r in records:
        if r["kind"] == kind:
            out[r["dataset"]].append(r)
    return dict(sorted(out.items()))


def clean(obj):
    """JSON-safe: nan / inf -> None, numpy scalars -> Python numbers."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return _nan_to_none(float(obj))
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj
