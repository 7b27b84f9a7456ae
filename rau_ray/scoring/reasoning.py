"""The reasoning check: relative-position statements in a policy's ``<think>`` text, parsed and compared with the truth.

RAU's policy reasons about where structures lie relative to each other; this reads those claims back and checks
each one against the true boxes, so "fluent" can be told from "true". A statement names two known structures and a
relation: ``the liver is left of the stomach`` (also ``right of``, ``above``, ``below``, ``larger than``,
``smaller than``; ``is`` or ``lies``, an optional ``the``). Positions are the boxes' centres in image coordinates
(left = smaller x, above = smaller y: the image as shown, not the patient's sides); sizes are box areas. A statement
is about the target unless its clause is introduced by "in the reference" (then the reference's boxes decide); one
naming a structure the image has no box for is false (it claims something that is not there).
Use: ``check(think, target_boxes, reference_boxes)`` -> ``Check(statements=[Statement...], true=k)``;
``relative_statement("liver", boxes)`` -> the true sentence the SFT targets teach.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

RELATIONS = ("left of", "right of", "above", "below", "larger than", "smaller than")


@dataclass(frozen=True)
class Statement:
    subject: str
    relation: str
    other: str
    image: str  # "target" | "reference": whose boxes decide
    true: bool
    text: str


@dataclass
class Check:
    statements: list[Statement] = field(default_factory=list)

    @property
    def true(self) -> int:
        return sum(s.true for s in self.statements)

    @property
    def share(self) -> float | None:
        return self.true / len(self.statements) if self.statements else None


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _area(box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def holds(relation: str, a, b) -> bool:
    """Whether ``a`` (a box) stands in ``relation`` to ``b``; strict (equal centres or areas are neither)."""
    (ax, ay), (bx, by) = _centre(a), _centre(b)
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by,
            "larger than": _area(a) > _area(b), "smaller than": _area(a) < _area(b)}[relation]


def _pattern(names: list[str]) -> re.Pattern:
    alt = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    rel = "|".join(re.escape(r) for r in RELATIONS)
    return re.compile(rf"\b(?:the\s+)?(?P<a>{alt})\s+(?:is|lies)\s+(?:to\s+the\s+)?(?P<rel>{rel})\s+(?:the\s+)?"
                      rf"(?P<b>{alt})\b", re.IGNORECASE)


def check(think: str, target_boxes: dict, reference_boxes: dict | None = None,
          names: list[str] | None = None) -> Check:
    """The relative-position statements of ``think`` about structures among ``names`` (default: every structure
    either image has), each checked against the boxes of the image its clause is about."""
    reference_boxes = reference_boxes or {}
    names = names or sorted(set(target_boxes) | set(reference_boxes))
    out = Check()
    if not think or not names:
        return out
    pattern = _pattern(names)
    canon = {n.casefold(): n for n in names}
    for clause in re.split(r"[.;\n]", think):
        image = "reference" if re.search(r"\bin the reference\b", clause, re.IGNORECASE) else "target"
        boxes = reference_boxes if image == "reference" else target_boxes
        for m in pattern.finditer(clause):
            a, b = canon[m["a"].casefold()], canon[m["b"].casefold()]
            rel = m["rel"].casefold()
            true = a != b and a in boxes and b in boxes and holds(rel, boxes[a], boxes[b])
            out.statements.append(Statement(a, rel, b, image, bool(true), m.group(0)))
    return out


def relative_statement(structure: str, boxes: dict) -> str:
    """A true sentence placing ``structure`` against its nearest neighbour in ``boxes`` (target pixels), along
    the axis on which they lie further apart: "the liver is left of the stomach"; "" with no neighbour."""
    if structure not in boxes:
        return ""
    cx, cy = _centre(boxes[structure])
    others = [(abs(_centre(b)[0] - cx) + abs(_centre(b)[1] - cy), n) for n, b in boxes.items() if n != structure]
    if not others:
        return ""
    _, near = min(others)
    nx, ny = _centre(boxes[near])
    if abs(nx - cx) >= abs(ny - cy) and nx != cx:
        rel = "left of" if cx < nx else "right of"
    elif ny != cy:
        rel = "above" if cy < ny else "below"
    else:
        return ""
    return f"the {structure} is {rel} the {near}"
