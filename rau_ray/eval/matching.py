"""Global label assignment by optimal transport (pot): predicted boxes -> anatomical labels, all at once.

The policy predicts every box in the target; each box is described by its normalised centre and size, each label
by its box in the reference (the label's prototype). Independent nearest-prototype labelling can give two boxes the
same label; transport assigns them jointly. Dummy source/sink nodes at ``unmatched_cost`` let a label stay
unassigned (a resected organ, out of field) instead of being forced onto a wrong box.
Use: ``assign(boxes, (w, h), prototypes, (rw, rh), MatchConfig(method="emd")).labels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ot

METHODS = ("emd", "sinkhorn", "independent")


@dataclass(frozen=True)
class MatchConfig:
    method: str = "emd"  # exact EMD by default: small problems (tens of boxes), an exact integral plan
    unmatched_cost: float = 0.25  # per side: a box and a label pair up only if their cost is below twice this
    size_weight: float = 0.5  # box width/height count less than position: organ sizes vary more between subjects
    label_bonus: float = 0.15  # cost removed where the policy itself named this label for the box
    sinkhorn_reg: float = 0.05  # entropic regularisation (method="sinkhorn"): smaller blurs less, converges slower

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, not {self.method!r}")


@dataclass
class Assignment:
    labels: list[str | None]  # per predicted box: the assigned label, or None (unassigned)
    costs: list[float]  # per box: cost of its assignment (nan when unassigned)
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


def _with_dummies(cost: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced problem over boxes + one dummy sink, labels + one dummy source: integral marginals, so EMD's
    optimal vertex is an assignment; leaving a box or a label out costs ``tau`` each."""
    n, m = cost.shape
    big = np.zeros((n + 1, m + 1))
    big[:n, :m] = cost
    big[:n, m] = tau
    big[n, :m] = tau
    a = np.concatenate([np.ones(n), [m]])
    b = np.concatenate([np.ones(m), [n]])
    return a, b, big


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
        a, b, big = _with_dummies(cost, tau)
        if cfg.method == "emd":
            full = ot.emd(a, b, big)
        else:
            full = ot.sinkhorn(a / a.sum(), b / b.sum(), big, cfg.sinkhorn_reg, method="sinkhorn_log",
                               numItermax=5000) * a.sum()
        plan = full[:n, :m]
        plan = np.where(plan >= full[:n, m:m + 1], plan, 0.0)  # a box mostly sent to the sink stays unassigned
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
