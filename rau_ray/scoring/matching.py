"""Global label assignment by optimal transport (pot): predicted boxes -> anatomical labels, all at once.

Use: ``assign(boxes, (w, h), prototypes, (rw, rh), MatchConfig(method="fgw")).labels``; with a re-ask of the policy
for what transport leaves out: ``assign_with_fallback(..., reask=lambda label: box_or_None).boxes``.

The policy predicts every box in the target; each box is described by its normalised centre and size, each label
by its box in the reference (the label's prototype). Independent nearest-prototype labelling (``"independent"``,
the baseline) can give two boxes the same label; transport assigns them jointly.

Unassigned labels (resected organ, out of field) — partial transport. emd, sinkhorn and fgw solve the same balanced
problem over the boxes plus one dummy sink and the labels plus one dummy source, where sending a box to the sink or
a label from the source costs ``unmatched_cost`` (tau) and sink-source costs 0. Its optimum is exactly a *partial*
transport in Lagrangian form: over plans T >= 0 with row sums <= 1 and column sums <= 1, minimise
``<T, C - 2 tau>`` — the transported mass is not fixed in advance, a box-label pair is worth matching only if its
cost is below 2 tau, and the plan equals ``ot.partial.partial_wasserstein`` run with the mass it chose
(tested). Kept rather than ``ot.partial`` with a fixed mass because how many organs are missing is unknown.

Methods: ``"emd"`` exact (``ot.emd``; integral marginals, so the optimum is an assignment); ``"sinkhorn"`` entropic
(``ot.sinkhorn``, log domain) on the same problem, each box taking its largest entry; ``"fgw"`` the structural prior:
fused Gromov–Wasserstein also matches the pairwise distances between box centres to those between the prototypes'
centres, so the layout constrains the assignment when absolute positions mislead (the field of view moved and the
nearest prototype of each box is its neighbour's). FGW is solved with ``ot.gromov.partial_fused_gromov_wasserstein``
over as many pairs as the position-only dummy-node EMD kept (the structure term counts matched pairs only, so
neither a missing organ nor a stray box distorts it; under two pairs there is no layout and fgw is plain EMD), on
squared feature distances so both terms are mean squared errors in image fractions, from two starts (the
position-only plan and pot's product plan: FGW is non-convex) keeping the lower objective. Each pair then gets a
fused cost ``sqrt((1 - alpha) * d_feat^2 + alpha * d_struct^2)``, where ``d_struct`` is the RMS mismatch between the
box's distances to the other matched boxes and the prototype's distances to theirs under the FGW plan (the pair's
share of the FGW objective), and the same dummy-node EMD decides on it: one rule, in the same units, leaves labels
unassigned for every method (``independent`` too: a box whose nearest prototype is 2 tau away or more is left out).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ot

METHODS = ("emd", "sinkhorn", "fgw", "independent")


@dataclass(frozen=True)
class MatchConfig:
    method: str = "emd"  # exact EMD by default: small problems (tens of boxes), an exact integral plan
    unmatched_cost: float = 0.25  # per side: a box and a label pair up only if their cost is below twice this
    size_weight: float = 0.5  # box width/height count less than position: organ sizes vary more between subjects
    label_bonus: float = 0.15  # cost removed where the policy itself named this label for the box
    sinkhorn_reg: float = 0.05  # entropic regularisation (method="sinkhorn"): smaller blurs less, converges slower
    # fgw: weight of the layout (pairwise centre distances) against absolute position/size. 0 is plain EMD, 1 trusts
    # only the layout, which cannot tell mirror images apart (left/right kidney have the same distances); 0.5 lets
    # the layout overrule a shifted field of view while position still breaks the layout's symmetries
    alpha: float = 0.5

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")
        checks = {"unmatched_cost": (lambda v: v > 0, "> 0"), "sinkhorn_reg": (lambda v: v > 0, "> 0"),
                  "size_weight": (lambda v: v >= 0, ">= 0"), "label_bonus": (lambda v: v >= 0, ">= 0"),
                  "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]")}
        for name, (ok, what) in checks.items():
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and ok(value)):
                raise ValueError(f"MatchConfig.{name} must be a finite number {what}, not {value!r}")


@dataclass
class Assignment:
    labels: list[str | None]  # per predicted box: the assigned label, or None (unassigned)
    costs: list[float]  # per box: cost the assignment was decided on (fgw: the fused cost); nan when unassigned
    plan: np.ndarray  # (boxes, labels) transport plan over the real nodes


def box_features(boxes: np.ndarray, size: tuple[float, float], size_weight: float) -> np.ndarray:
    """[x1, y1, x2, y2] pixels -> [cx, cy, w*s, h*s] as fractions of the image (w, h)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([size[0], size[1], size[0], size[1]])
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2,
                     (b[:, 2] - b[:, 0]) * size_weight, (b[:, 3] - b[:, 1]) * size_weight], axis=1)


def cost_matrix(boxes, size, prototypes: dict[str, list[float]], proto_size, cfg: MatchConfig,
                predicted_labels: list[str | None] | None = None) -> tuple[np.ndarray, list[str]]:
    names = list(prototypes)
    fb = box_features(boxes, size, cfg.size_weight)
    fp = box_features(np.array([prototypes[n] for n in names]), proto_size, cfg.size_weight)
    cost = ot.dist(fb, fp, metric="euclidean")
    if predicted_labels is not None:
        for i, lab in enumerate(predicted_labels):
            if lab in names:
                cost[i, names.index(lab)] = max(0.0, cost[i, names.index(lab)] - cfg.label_bonus)
    return cost, names


def structure_matrix(boxes, size) -> np.ndarray:
    """Pairwise distances between normalised box centres: the layout FGW matches (invariant to a shifted field)."""
    centres = box_features(boxes, size, 0.0)[:, :2]
    return ot.dist(centres, centres, metric="euclidean")


def _with_dummies(cost: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced problem over boxes + one dummy sink, labels + one dummy source: integral marginals, so EMD's
    optimal vertex is an assignment; leaving a box or a label out costs ``tau`` each (partial transport, module doc)."""
    n, m = cost.shape
    big = np.zeros((n + 1, m + 1))
    big[:n, :m] = cost
    big[:n, m] = tau
    big[n, :m] = tau
    a = np.concatenate([np.ones(n), [m]])
    b = np.concatenate([np.ones(m), [n]])
    return a, b, big


def _partial_plan(cost: np.ndarray, tau: float, method: str, reg: float) -> np.ndarray:
    n, m = cost.shape
    a, b, big = _with_dummies(cost, tau)
    if method == "sinkhorn":
        full = ot.sinkhorn(a / a.sum(), b / b.sum(), big, reg, method="sinkhorn_log", numItermax=5000) * a.sum()
    else:
        full = ot.emd(a, b, big)
    plan = full[:n, :m]
    return np.where(plan >= full[:n, m:m + 1], plan, 0.0)  # a box mostly sent to the sink stays unassigned


def _fgw_plan(feat: np.ndarray, start: np.ndarray, c_boxes: np.ndarray, c_protos: np.ndarray,
              alpha: float) -> np.ndarray:
    """Partial FGW moving as many pairs as ``start`` (the position-only partial plan, 0/1) matched, from that start
    and from pot's product plan; the plan (in pairs, not fractions) with the lower objective."""
    k = start.sum()
    p, q = np.full(feat.shape[0], 1.0 / k), np.full(feat.shape[1], 1.0 / k)
    sq = feat ** 2
    best, best_loss = None, math.inf
    for g0 in (start / k * (1 - 1e-9), None):  # pot asserts a start's marginals are <= p, q: shave the rounding
        plan, log = ot.gromov.partial_fused_gromov_wasserstein(sq, c_boxes, c_protos, p, q, m=1.0 - 1e-9,
                                                               alpha=alpha, G0=g0, symmetric=True, log=True,
                                                               warn=False)
        loss = float(log["partial_fgw_dist"])
        if loss < best_loss - 1e-12:
            best, best_loss = plan, loss
    return best * k


def _structure_cost(plan: np.ndarray, c_boxes: np.ndarray, c_protos: np.ndarray) -> np.ndarray:
    """RMS mismatch, per box-label pair (i, j), between box i's distances to the other matched boxes and label j's
    distances to their labels under ``plan``; rows i and column j of the plan are left out (0 with no other pair)."""
    total = plan.sum()
    rows, cols = plan.sum(1), plan.sum(0)
    full = ((c_boxes ** 2) @ rows)[:, None] + ((c_protos ** 2) @ cols)[None, :] - 2 * c_boxes @ plan @ c_protos.T
    own = plan @ (c_protos ** 2) + (c_boxes ** 2) @ plan  # the terms of row i and of column j
    weight = total - rows[:, None] - cols[None, :] + plan
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = np.where(weight > 1e-9, (full - own) / weight, 0.0)
    return np.sqrt(np.clip(sq, 0.0, None))


def assign(boxes, size, prototypes: dict[str, list[float]], proto_size, cfg: MatchConfig = MatchConfig(),
           predicted_labels: list[str | None] | None = None) -> Assignment:
    """Assign each predicted box a label (or None). ``size``/``proto_size`` are (width, height) of the images."""
    cfg.validate()
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0 or not prototypes:
        return Assignment([None] * len(boxes), [float("nan")] * len(boxes), np.zeros((len(boxes), len(prototypes))))
    cost, names = cost_matrix(boxes, size, prototypes, proto_size, cfg, predicted_labels)
    n, m = cost.shape
    tau = cfg.unmatched_cost
    if cfg.method == "independent":  # the baseline: nearest prototype for each box on its own
        plan = np.zeros_like(cost)
        plan[np.arange(n), cost.argmin(1)] = 1.0
    else:
        plan = _partial_plan(cost, tau, "emd" if cfg.method == "fgw" else cfg.method, cfg.sinkhorn_reg)
        start = (plan > 0.5) & (cost < 2 * tau)
        if cfg.method == "fgw" and cfg.alpha > 0 and start.sum() > 1:  # under two pairs there is no layout
            c_boxes = structure_matrix(boxes, size)
            c_protos = structure_matrix(np.array([prototypes[k] for k in names]), proto_size)
            fgw = _fgw_plan(cost, start.astype(np.float64), c_boxes, c_protos, cfg.alpha)
            cost = np.sqrt((1 - cfg.alpha) * cost ** 2 + cfg.alpha * _structure_cost(fgw, c_boxes, c_protos) ** 2)
            plan = _partial_plan(cost, tau, "emd", cfg.sinkhorn_reg)
    labels: list[str | None] = []
    costs: list[float] = []
    for i in range(n):
        j = int(plan[i].argmax())
        if plan[i, j] <= 0 or cost[i, j] >= 2 * tau:
            labels.append(None)
            costs.append(float("nan"))
        else:
            labels.append(names[j])
            costs.append(float(cost[i, j]))
    return Assignment(labels, costs, plan)


@dataclass
class Grounded:
    boxes: dict[str, list[float]]  # label -> box: from transport, or from the policy re-asked for that label
    fallback: list[str]  # labels whose box came from ``reask``
    absent: list[str]  # labels re-asked that the policy answered absent (None or no valid box): no box
    assignment: Assignment  # the transport result before the fallback
    unassigned_boxes: list[int] = field(default_factory=list)  # boxes no label was kept for (surplus / doubtful)


def _valid_box(value) -> list[float] | None:
    try:
        box = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(box) != 4 or not all(math.isfinite(v) for v in box) or not (box[0] < box[2] and box[1] < box[3]):
        return None
    return box


def assign_with_fallback(boxes, size, prototypes: dict[str, list[float]], proto_size,
                         reask: Callable[[str], Sequence[float] | None], cfg: MatchConfig = MatchConfig(),
                         predicted_labels: list[str | None] | None = None,
                         max_cost: float | None = None) -> Grounded:
    """``assign``, then for every label left unassigned or assigned at a cost above ``max_cost`` (default
    ``cfg.unmatched_cost``: transport keeps pairs up to twice that, the upper half is doubtful) ask ``reask(label)``
    — the caller's grounding question to the policy for that label alone — for its box in target pixels, or None
    for absent. The re-asked answer replaces the doubtful transport box; labels are asked in prototype order."""
    max_cost = cfg.unmatched_cost if max_cost is None else max_cost
    if not (isinstance(max_cost, (int, float)) and max_cost >= 0):
        raise ValueError(f"max_cost must be a number >= 0, not {max_cost!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    result = assign(boxes, size, prototypes, proto_size, cfg, predicted_labels)
    kept: dict[str, list[float]] = {}
    unassigned = []
    for i, (label, cost) in enumerate(zip(result.labels, result.costs)):
        if label is not None and cost <= max_cost:
            kept[label] = [float(v) for v in boxes[i]]
        else:
            unassigned.append(i)
    out, fallback, absent = {}, [], []
    for label in prototypes:
        if label in kept:
            out[label] = kept[label]
            continue
        box = _valid_box(reask(label))
        if box is None:
            absent.append(label)
        else:
            out[label] = box
            fallback.append(label)
    return Grounded(out, fallback, absent, result, unassigned)
