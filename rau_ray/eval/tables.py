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
  ``predicted`` {policy: [[label, box], ...] or None}: the policy's all-boxes answer (every structure it finds,
  target pixels; None: malformed), ``reasked`` {policy: {label: box or None}}: its grounding answers to the labels
  transport left doubtful (the re-ask fallback; None: answered absent or malformed). ``mask_boxes`` {structure:
  box or None} (when the eval had the RAU segmenter): the box of the chain's own mask of each structure the
  reference shows, asked by name (segment task -> ``<Seg>`` -> SAM2 over the reference memory); None: empty mask.
Labeling rows, as the paper scores them — from the policy's *predicted* boxes: a true structure counts as correct
when a predicted box matches it (Hungarian on IoU, IoU >= 0.5) and carries its label; an unmatched one is wrong.
"SFT boxes" / "GRPO boxes": the labels of the all-boxes answer as written; GRPO+OT / GRPO+FGW: those boxes
re-labelled jointly by optimal transport against the reference's boxes (``matching.assign_with_fallback``, the
answered labels as its bonus), a label left unassigned or doubtful re-asked alone (its grounding answer's box).
"GRPO+OT (mask boxes)": the same, then each box replaced by the box of the chain's own
``<Seg>`` mask of the structure it is labelled (dropped where that mask is empty: the chain says absent), as RAU
grounds through SAM2.
On the *given* true boxes: SFT and GRPO name one region at a time (the label task); "OT (boxes only)" is transport
on the true boxes without any answer, the geometry baseline a policy must beat; "GRPO+OT (given boxes)" re-assigns
the GRPO region answers by transport (a doubtful region keeps its answer). FGW appears when ``MatchConfig``
accepts ``"fgw"`` (n/a otherwise). Each row: accuracy over regions with a 95 % bootstrap interval over subjects.
Use: ``labeling_table(records)``, ``segmentation_table(records)``, ``latency_table(records)``, ``volume_table(...)``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy.optimize import linear_sum_assignment

from rau_ray.scoring import metrics
from rau_ray.scoring.matching import MatchConfig, assign, assign_with_fallback

# (row name, the policy whose answers it scores, the transport method that re-assigns them or None, which boxes:
# "predicted" by the policy's all-boxes answer, "masks" those boxes read off the chain's <Seg> masks, or the "given"
# true ones). "OT (boxes only)" is transport without any policy answer: what box geometry against the reference alone
# gets right, so a GRPO+OT gain over it is the policy's.
LABEL_ROWS = (("SFT", "sft", None, "given"), ("GRPO", "grpo", None, "given"),
              ("OT (boxes only)", None, "emd", "given"), ("GRPO+OT", "grpo", "emd", "predicted"),
              ("GRPO+FGW", "grpo", "fgw", "predicted"), ("SFT boxes", "sft", None, "predicted"),
              ("GRPO boxes", "grpo", None, "predicted"), ("GRPO+OT (given boxes)", "grpo", "emd", "given"),
              ("GRPO+OT (mask boxes)", "grpo", "emd", "masks"))
MATCH_IOU = 0.5  # a predicted box finds a true structure at this IoU or more (Hungarian matching)
SEG_METHODS = ("SAM2-Memory-Ref", "SAM2-Memory-Ref-SFT", "VLM+SAM2", "CBAM-LoRA SAM2 (box)")


def match_available(method: str) -> bool:
    """Whether ``rau_ray.scoring.matching`` knows ``method`` (FGW arrives there separately)."""
    try:
        MatchConfig(method=method).validate()
    except Exception:  # noqa: BLE001 -- any refusal means "not available"
        return False
    return True


def same_label(answer, truth: str) -> bool:
    """A right label: case and surrounding blanks ignored (as ``rau_ray.scoring.answers`` compares them)."""
    return isinstance(answer, str) and answer.strip().casefold() == truth.strip().casefold()


def _nan_to_none(x):
    return None if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))) else x


# -- labeling ----------------------------------------------------------------------------------------------------------
def match_regions(entries: list, regions: list[dict], min_iou: float = MATCH_IOU) -> list[str | None]:
    """The label each true region gets from labelled predicted boxes ``entries`` [(label, box)]: one-to-one
    (Hungarian on IoU), a pair counting only at ``min_iou`` or more; None for a region no box matches."""
    out: list[str | None] = [None] * len(regions)
    if not entries or not regions:
        return out
    iou = np.atleast_2d(metrics.box_iou(np.asarray([b for _, b in entries], float).reshape(-1, 4),
                                        np.asarray([r["box"] for r in regions], float).reshape(-1, 4)))
    for i, j in zip(*linear_sum_assignment(-iou)):
        if iou[i, j] >= min_iou:
            out[j] = entries[i][0]
    return out


def mask_box(record: dict, structure: str, box):
    """``box`` (a policy's box for ``structure``, or None: answered absent) read off the chain's own mask of that
    structure where the record has it (``mask_boxes``): the mask's box, or None when the mask is empty (SAM2's object
    score finds nothing there: the chain's answer is "absent"). A None box stays None."""
    if box is None:
        return None
    masks = record.get("mask_boxes") or {}
    better = masks[structure] if structure in masks else box
    return None if better is None else [float(v) for v in better]


def predicted_entries(record: dict, policy: str, method: str | None, boxes: str = "predicted") -> list:
    """The labelled boxes a predicted-boxes row scores: the policy's all-boxes answer, re-labelled by ``method``
    with the re-ask fallback (its recorded grounding answers) when given; ``boxes`` "masks": then each box read off
    the chain's own mask of the label it ends with (transport names the reference structure, SAM2 delineates it)."""
    entries = [(str(label), [float(v) for v in box]) for label, box in (record["predicted"][policy] or [])]
    if method is not None:
        reasked = (record.get("reasked") or {}).get(policy) or {}
        entries = list(assign_with_fallback([b for _, b in entries], tuple(record["size"]), record["ref_boxes"],
                                            tuple(record["ref_size"]), lambda label: reasked.get(label),
                                            MatchConfig(method=method),
                                            predicted_labels=[label for label, _ in entries]).boxes.items())
    if boxes != "masks":
        return entries
    return [(label, b) for label, b in ((label, mask_box(record, label, box)) for label, box in entries)
            if b is not None]


def row_labels(record: dict, policy: str | None, method: str | None, boxes: str = "given") -> list[str | None] | None:
    """The labels a row gives the record's regions; None when the row cannot be computed (no such policy's answers,
    or the transport method is not available). ``policy`` None: transport on the boxes alone."""
    if method is not None and not match_available(method):
        return None
    if boxes in ("predicted", "masks"):
        if not record.get("error") and (policy not in record.get("predicted", {})
                                        or (boxes == "masks" and "mask_boxes" not in record)):
            return None
        if record.get("error"):
            return [None] * len(record["regions"])
        return match_regions(predicted_entries(record, policy, method, boxes), record["regions"])
    answers = record.get("answers", {}).get(policy) if policy else None
    if policy and answers is None:
        return None
    if record.get("error"):
        return [None] * len(record["regions"])
    if method is None:
        return list(answers)
    cfg = MatchConfig(method=method)
    plan = assign([r["box"] for r in record["regions"]], tuple(record["size"]), record["ref_boxes"],
                  tuple(record["ref_size"]), cfg, predicted_labels=list(answers) if answers else None)
    if not answers:
        return plan.labels
    # the fallback: a region the transport leaves unassigned, or assigns at a cost above ``unmatched_cost`` (low
    # confidence), takes the policy's answer to that region asked alone (the one-region question it was asked)
    return [answer if label is None or not cost <= cfg.unmatched_cost else label
            for label, cost, answer in zip(plan.labels, plan.costs, answers)]


def _valid_share(recs: list[dict], policy: str | None, boxes: str) -> float | None:
    if policy is None:
        return None
    if boxes in ("predicted", "masks"):
        answered = [r["predicted"][policy] for r in recs if not r.get("error") and policy in r.get("predicted", {})]
    else:
        answered = [a for r in recs if not r.get("error") for a in r["answers"][policy]]
    return sum(a is not None for a in answered) / len(answered) if answered else None


def labeling_table(records: list[dict]) -> dict:
    """{dataset: {"targets", "regions", "rows": {row: {"accuracy", "ci95", "correct", "valid"} or None},
    "grpo_minus_sft"}}, micro-averaged over regions, the interval resampling subjects; "valid": share of the policy's
    answers that parsed (per region for the label task, per target for the all-boxes answer); "grpo_minus_sft":
    GRPO's gain over SFT naming the same given regions, {"gap", "ci95"} paired region by region (the interval
    resampling subjects, so both policies' answers move together), or None without both."""
    out: dict = {}
    for ds, recs in _by_dataset(records, "label").items():
        n = sum(len(r["regions"]) for r in recs)
        subjects = [r.get("subject") or r["target"] for r in recs for _ in r["regions"]]
        rows, hits_of = {}, {}
        for name, policy, method, boxes in LABEL_ROWS:
            per = [row_labels(r, policy, method, boxes) for r in recs]
            if any(p is None for p in per) or not recs:
                rows[name] = None
                continue
            hits = [float(same_label(lab, reg["structure"])) for p, r in zip(per, recs)
                    for lab, reg in zip(p, r["regions"])]
            rows[name] = {"accuracy": sum(hits) / n if n else None, "ci95": metrics.grouped_bootstrap(hits, subjects),
                          "correct": int(sum(hits)), "valid": _valid_share(recs, policy, boxes)}
            hits_of[name] = hits
        gap = None
        if n and "SFT" in hits_of and "GRPO" in hits_of:
            diff = [g - s for g, s in zip(hits_of["GRPO"], hits_of["SFT"])]
            gap = {"gap": sum(diff) / n, "ci95": metrics.grouped_bootstrap(diff, subjects)}
        out[ds] = {"targets": len(recs), "regions": n, "failed_retrieval": sum(bool(r.get("error")) for r in recs),
                   "rows": rows, "grpo_minus_sft": gap}
    return out


def per_label_accuracy(records: list[dict]) -> dict:
    """{dataset: {row: {structure: {"n", "correct", "accuracy"}}}} for the rows that can be computed."""
    out: dict = {}
    for ds, recs in _by_dataset(records, "label").items():
        table: dict = {}
        for name, policy, method, boxes in LABEL_ROWS:
            per = [row_labels(r, policy, method, boxes) for r in recs]
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


def reasoning_table(records: list[dict]) -> dict:
    """{dataset: {"SFT" / "GRPO": {"answers", "with_statements", "statements", "true", "share", "ci95"}}}: the
    relative-position statements of the label answers' ``<think>`` (``scoring.reasoning``), the share true with a 95 %
    interval over subjects. From ``reasoning`` {policy: [[made, true] per answer]} of the label records."""
    out: dict = {}
    for ds, recs in _by_dataset(records, "label").items():
        table = {}
        for name, policy in (("SFT", "sft"), ("GRPO", "grpo")):
            per = [(r.get("subject") or r["target"], c) for r in recs
                   for c in (r.get("reasoning") or {}).get(policy, [])]
            if not per:
                continue
            hits = [float(k < true) for _, (made, true) in per for k in range(made)]
            groups = [subject for subject, (made, _) in per for _ in range(made)]
            made = sum(c[0] for _, c in per)
            table[name] = {"answers": len(per), "with_statements": sum(c[0] > 0 for _, c in per),
                           "statements": made, "true": int(sum(hits)),
                           "share": sum(hits) / made if made else None,
                           "ci95": metrics.grouped_bootstrap(hits, groups)}
        if table:
            out[ds] = table
    return out


def grounding_table(records: list[dict]) -> dict:
    """{dataset: {"SFT" / "GRPO" / "GRPO (mask boxes)": {"present", "iou", "iou_ci95", "absent", "null",
    "null_ci95"}}}: the ground task asked for every structure the reference shows. Present in the target: box IoU
    with the truth (a null or malformed answer scores 0); absent (resected, or out of the slice): the share answered
    ``null``. 95 % intervals over subjects. From ``grounded`` {policy: [[structure, box or None, valid]]} of the
    label records; "GRPO (mask boxes)": GRPO's answers with each box read off the chain's mask of that structure
    (``mask_boxes``; an empty mask answers null)."""
    out: dict = {}
    for ds, recs in _by_dataset(records, "label").items():
        table = {}
        for name, policy, masks in (("SFT", "sft", False), ("GRPO", "grpo", False),
                                    ("GRPO (mask boxes)", "grpo", True)):
            if masks and not any("mask_boxes" in r for r in recs):
                continue
            ious, iou_groups, nulls, null_groups = [], [], [], []
            for r in recs:
                truth = {x["structure"]: x["box"] for x in r["regions"]}
                for structure, box, valid in (r.get("grounded") or {}).get(policy, []):
                    box = mask_box(r, structure, box) if masks else box
                    subject = r.get("subject") or r["target"]
                    if structure in truth:
                        ious.append(float(metrics.box_iou(box, truth[structure])) if box is not None else 0.0)
                        iou_groups.append(subject)
                    else:
                        nulls.append(float(valid and box is None))
                        null_groups.append(subject)
            if ious or nulls:
                table[name] = {"present": len(ious), "iou": _mean(ious),
                               "iou_ci95": metrics.grouped_bootstrap(ious, iou_groups),
                               "absent": len(nulls), "null": _mean(nulls),
                               "null_ci95": metrics.grouped_bootstrap(nulls, null_groups)}
        if table:
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
    """{dataset: {method: {"n", "dice", "dice_ci95", "giou", "ciou", "hd95", "hd95_inf", "box_iou", "failed",
    attention...}}}.

    Dice / box IoU: means over items (Dice with a 95 % bootstrap interval over subjects); gIoU: mean of per-item IoU; cIoU: summed intersections over summed unions
    (``metrics.giou`` / ``metrics.ciou``); HD95: mean over items where both masks are non-empty, "hd95_inf" counts
    the others (an empty prediction has no surface)."""  # noqa: E501
    recs = [r for r in records if r["kind"] == "segment"]
    scores = scores if scores is not None else [score_segment(r) for r in recs]
    grouped: dict = defaultdict(lambda: defaultdict(list))
    subjects: dict = defaultdict(lambda: defaultdict(list))
    for r, s in zip(recs, scores):
        for method, sc in s.items():
            grouped[r["dataset"]][method].append(sc)
            subjects[r["dataset"]][method].append(r.get("subject") or r["target"])
    out: dict = {}
    for ds in sorted(grouped):
        out[ds] = {}
        for method in [m for m in SEG_METHODS if m in grouped[ds]] + sorted(set(grouped[ds]) - set(SEG_METHODS)):
            items = grouped[ds][method]
            dices = [s["dice"] for s in items]
            pairs = [(s["inter"], s["union"]) for s in items]
            hd = [s["hd95"] for s in items]
            finite = [h for h in hd if math.isfinite(h)]
            att = [s["attention"] for s in items if s["attention"]]
            row = {"n": len(items), "dice": _mean(dices),
                   "dice_ci95": metrics.grouped_bootstrap(dices, subjects[ds][method]) if dices else None,
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
    for name, policy, method, boxes in LABEL_ROWS:
        if method is None and boxes == "given":
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
