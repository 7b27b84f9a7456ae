"""Natural-language commands for interactive segmentation -> clinical operations (SpinalSAM-R1's command layer).

A fast deterministic parser: a text is split into clauses ("and", "then", ";", ","), each clause must map to exactly
one of eleven operations, else ``CommandError`` — unrelated or hostile text never becomes an operation. Numbers may
be digits or words ("three"), coordinates "(120, 45)", "x=120 y=45" or "120,45".
Use: ``parse_command("add three points then bone window")``; CLI: ``rau command parse "undo twice"``.

Operations (exactly these fields; one JSON schema, ``OPERATION_SCHEMA``, shared with sessions and the web page):
segment{target} · add_point{positive,x,y,count} · add_box{box} · undo{steps} · redo{steps} · clear ·
set_window{preset,level,width} · goto_slice{index,delta} · propagate{direction} · export{format} · show_metrics
"""

from __future__ import annotations

import re

WINDOW_PRESETS = ("abdomen", "bone", "lung", "brain", "soft_tissue")
EXPORT_FORMATS = ("png", "nifti", "dicom-seg", "rle")
MAX_TEXT = 500  # a command is a sentence, not a document

NUMBER_WORDS = {
    "a": 1, "an": 1, "one": 1, "single": 1, "once": 1, "two": 2, "twice": 2, "couple": 2, "pair": 2, "three": 3,
    "thrice": 3, "few": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "eleven": 11, "twelve": 12, "fifteen": 15, "twenty": 20,
}
_NUM = r"(?:\d+|" + "|".join(sorted(NUMBER_WORDS, key=len, reverse=True)) + r")"
_INT = r"-?\d+(?:\.\d+)?"


class CommandError(ValueError):
    """The text (or a clause of it) maps to no operation."""


OPERATION_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "RAU-Ray interactive operation",
    "oneOf": [
        {"type": "object", "additionalProperties": False, "required": ["op", "target"],
         "properties": {"op": {"const": "segment"}, "target": {"type": "string", "minLength": 1}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "positive", "x", "y", "count"],
         "properties": {"op": {"const": "add_point"}, "positive": {"type": "boolean"},
                        "x": {"type": ["integer", "null"]}, "y": {"type": ["integer", "null"]},
                        "count": {"type": "integer", "minimum": 1}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "box"],
         "properties": {"op": {"const": "add_box"},
                        "box": {"oneOf": [{"type": "null"}, {"type": "array", "items": {"type": "integer"},
                                                             "minItems": 4, "maxItems": 4}]}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "steps"],
         "properties": {"op": {"const": "undo"}, "steps": {"type": "integer", "minimum": 1}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "steps"],
         "properties": {"op": {"const": "redo"}, "steps": {"type": "integer", "minimum": 1}}},
        {"type": "object", "additionalProperties": False, "required": ["op"], "properties": {"op": {"const": "clear"}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "preset", "level", "width"],
         "properties": {"op": {"const": "set_window"}, "preset": {"enum": [*WINDOW_PRESETS, None]},
                        "level": {"type": ["number", "null"]}, "width": {"type": ["number", "null"]}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "index", "delta"],
         "properties": {"op": {"const": "goto_slice"}, "index": {"type": ["integer", "null"]},
                        "delta": {"type": ["integer", "null"]}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "direction"],
         "properties": {"op": {"const": "propagate"}, "direction": {"enum": ["both", "forward", "backward"]}}},
        {"type": "object", "additionalProperties": False, "required": ["op", "format"],
         "properties": {"op": {"const": "export"}, "format": {"enum": list(EXPORT_FORMATS)}}},
        {"type": "object", "additionalProperties": False, "required": ["op"],
         "properties": {"op": {"const": "show_metrics"}}},
    ],
}


def _num(word: str | None, default: int = 1) -> int:
    if word is None:
        return default
    word = word.lower()
    return int(word) if word.isdigit() else NUMBER_WORDS[word]


def _xy(text: str) -> tuple[int, int] | None:
    m = (re.search(rf"x\s*[=:]\s*({_INT})\s*,?\s*(?:and\s+)?y\s*[=:]\s*({_INT})", text)
         or re.search(rf"[(\[]\s*({_INT})\s*[,;\s]\s*({_INT})\s*[)\]]", text)
         or re.search(rf"\bat\s+({_INT})\s*[,\s]\s*({_INT})\b", text)
         or re.fullmatch(rf"\s*({_INT})\s*[,\s]\s*({_INT})\s*", text))
    return (round(float(m.group(1))), round(float(m.group(2)))) if m else None


def _all_numbers(text: str) -> list[int]:
    return [round(float(v)) for v in re.findall(_INT, text)]


def _clauses(text: str) -> list[str]:
    parts = re.split(r"\s*(?:;|\band then\b|\bthen\b|\bafterwards\b|\band\b|,(?=\s*[a-z]{3,}\b(?!\s*[=:]))|\.\s)\s*",
                     text)
    return [p.strip(" .!?") for p in parts if p and p.strip(" .!?")]


def _parse_clause(c: str) -> dict:
    # undo / redo: "undo", "undo twice", "undo the last 3 steps", "go back two steps"
    m = re.fullmatch(rf"(?:please\s+)?(undo|redo|go back|step back|revert)(?:\s+(?:the\s+)?(?:last\s+)?({_NUM})"
                     r"(?:\s+(?:steps?|times|actions?|changes?|edits?))?)?(?:\s+(?:that|it|this|last|the last "
                     r"(?:step|action|change|edit)))?", c)
    if m:
        return {"op": "redo" if m.group(1) == "redo" else "undo", "steps": _num(m.group(2))}
    if re.fullmatch(r"(?:please\s+)?(?:clear|reset|start over|remove (?:all|everything)|erase (?:all|everything)|wipe)"
                    r"(?:\s+(?:all|everything|the mask|the points|all points|points|prompts|clicks|the prompts|the segmentation|"
                    r"it))?", c):
        return {"op": "clear"}
    if re.fullmatch(r"(?:please\s+)?(?:show|display|compute|report|what(?:'s| is| are))\s+(?:the\s+)?"
                    r"(?:metrics|stats|statistics|dice|volume|measurements?|scores?)(?:\s+\w+)?", c):
        return {"op": "show_metrics"}
    # windows: "bone window", "switch to lung window", "window 40/400", "level 40 width 400", "w 400 l 40"
    m = re.search(r"\b(abdomen|abdominal|bone|lung|brain|soft[ _-]?tissue)\s+(?:window|preset|setting)\b", c) or \
        re.fullmatch(r"(?:set |switch to |use |apply )?(?:the )?(?:window(?:ing)?|preset)\s+(?:to\s+)?"
                     r"(abdomen|abdominal|bone|lung|brain|soft[ _-]?tissue)", c)
    if m:
        preset = m.group(1).replace("abdominal", "abdomen").replace(" ", "_").replace("-", "_")
        return {"op": "set_window", "preset": "soft_tissue" if preset.startswith("soft") else preset,
                "level": None, "width": None}
    if re.search(r"\b(window|level|width|wl|ww)\b|\b[wl]\s*[:=]", c):
        lv = re.search(rf"\b(?:level|wl|l|center|centre)\s*[=:]?\s*({_INT})", c)
        wd = re.search(rf"\b(?:width|ww|w)\s*[=:]?\s*({_INT})", c)
        pair = re.search(rf"({_INT})\s*[/,]\s*({_INT})", c)
        if lv and wd:
            return {"op": "set_window", "preset": None, "level": float(lv.group(1)), "width": float(wd.group(1))}
        if pair and re.search(r"\bwindow\b", c):
            return {"op": "set_window", "preset": None, "level": float(pair.group(1)), "width": float(pair.group(2))}
    # slices: "go to slice 45", "slice 12", "next slice", "previous slice", "move up 5 slices", "back 3 slices"
    if re.search(r"\bslices?\b", c):
        if m := re.fullmatch(r"(?:go to |goto |jump to |show |open )?(?:the )?slice (?:number |no\.? |#)?(\d+)", c):
            return {"op": "goto_slice", "index": int(m.group(1)), "delta": None}
        if m := re.fullmatch(rf"(?:go |move |scroll |step )?(?:to (?:the )?)?(next|previous|prev|up|down|forward|"
                             rf"back(?:ward)?)(?:\s+({_NUM}))?\s+slices?", c):
            sign = 1 if m.group(1) in ("next", "up", "forward") else -1
            return {"op": "goto_slice", "index": None, "delta": sign * _num(m.group(2))}
        if m := re.fullmatch(rf"(?:go |move |scroll |step )(up|down|forward|back(?:ward)?)\s+({_NUM})\s+slices?", c):
            sign = 1 if m.group(1) in ("up", "forward") else -1
            return {"op": "goto_slice", "index": None, "delta": sign * _num(m.group(2))}
    # propagation through the volume
    if m := re.fullmatch(r"(?:please\s+)?(?:propagate|track|extend|spread)(?: the mask| it| this| the segmentation)?"
                         r"(?:\s+(?:to|through|across|into|in))?(?:\s+(?:all|the|other|every))*(?:\s+(?:slices|volume|"
                         r"frames))?(?:\s+(both ways|both directions|in both directions|forward|forwards|upwards|up|"
                         r"backward|backwards|downwards|down))?", c):
        d = m.group(1) or "both"
        return {"op": "propagate", "direction": "forward" if d.startswith(("forward", "up")) else
                "backward" if d.startswith(("backward", "down")) else "both"}
    # export
    if m := re.fullmatch(r"(?:please\s+)?(?:export|save|download|write)(?: the)?(?: mask| segmentation| result| it)?"
                         r"(?:\s+(?:as|to|in))?(?:\s+(?:a|an))?(?:\s+(png|nifti|nii|nii\.gz|dicom[ -]?seg|dicom|rle|"
                         r"coco rle))?(?:\s+(?:file|format))?", c):
        fmt = (m.group(1) or "png").replace(" ", "-")
        fmt = {"nii": "nifti", "nii.gz": "nifti", "dicom": "dicom-seg", "dicomseg": "dicom-seg",
               "coco-rle": "rle"}.get(fmt, fmt)
        return {"op": "export", "format": fmt}
    # boxes: "draw a box from (10,20) to (100,200)", "add box 10 20 100 200", "add a box"
    if m := re.fullmatch(r"(?:please\s+)?(?:add|draw|place|put|make)\s+(?:a\s+)?(?:bounding\s+)?box(.*)", c):
        nums = _all_numbers(m.group(1))
        if len(nums) == 4:
            x1, y1, x2, y2 = nums
            return {"op": "add_box", "box": [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]}
        if nums:
            raise CommandError(f"a box needs four coordinates (x1, y1, x2, y2); got {nums} in {c!r}")
        return {"op": "add_box", "box": None}
    # points: "add three points", "add a negative point at (120, 45)", "click at x=10 y=20", "exclude 120,45"
    if m := re.fullmatch(rf"(?:please\s+)?(?:add|place|put|click|drop|mark|include|exclude|remove)"
                         rf"(?:\s+({_NUM}))?(?:\s+(?:more|extra|additional))?(?:\s+(positive|negative|foreground|"
                         rf"background|inclusion|exclusion))?(?:\s+(?:points?|clicks?|seeds?))?(.*)", c):
        rest = m.group(3) or ""
        has_point_word = re.search(r"\b(points?|clicks?|seeds?)\b", c) or c.startswith("click")
        xy = _xy(rest) or _xy(c.split(" ", 1)[1] if " " in c else "")  # "exclude 55, 66": no count, a position
        if has_point_word or xy or c.startswith(("include", "exclude")):
            if rest.strip() and not xy and not re.fullmatch(r"\s*(?:here|there|on (?:it|the \w+( \w+)?)|in the "
                                                           r"(?:\w+ ?){1,3})\s*", rest):
                raise CommandError(f"cannot read a point position in {c!r}; use (x, y) or x=.. y=..")
            negative = (m.group(2) in ("negative", "background", "exclusion") or c.startswith(("exclude", "remove")))
            count = _num(m.group(1)) if m.group(1) else 1
            return {"op": "add_point", "positive": not negative, "x": xy[0] if xy else None,
                    "y": xy[1] if xy else None, "count": 1 if xy else count}
    # segmentation of a named structure
    if m := re.fullmatch(r"(?:please\s+|can you\s+|could you\s+)?(?:segment|outline|delineate|contour|mask|find|"
                         r"locate|show me|show|highlight|select|label|where is)\s+(?:the\s+)?([a-z][a-z0-9 '_-]{1,40}?)"
                         r"(?:\s+please)?", c):
        target = m.group(1).strip()
        if target in ("it", "this", "that", "everything", "all", "me"):
            raise CommandError(f"which structure? {c!r} names none")
        return {"op": "segment", "target": target}
    raise CommandError(f"not a command: {c!r}")


def parse_command(text: str) -> list[dict]:
    """Parse a command text into operations, in order. Raises CommandError when any part is not a command."""
    if not isinstance(text, str):
        raise CommandError(f"a command must be text, got {type(text).__name__}")
    if len(text) > MAX_TEXT:
        raise CommandError(f"command too long ({len(text)} characters; at most {MAX_TEXT})")
    clean = re.sub(r"\s+", " ", text.lower().replace("’", "'")).strip()
    clean = re.sub(r"\ba (couple|pair|few) of\b", r"\1", clean)
    if not clean:
        raise CommandError("empty command")
    ops: list[dict] = []
    for clause in _clauses(clean):
        try:
            ops.append(_parse_clause(clause))
        except CommandError:
            # "segment the liver and spleen": a bare structure name continues the previous segment clause
            if ops and ops[-1]["op"] == "segment" and re.fullmatch(r"(?:the )?[a-z][a-z '-]{1,30}", clause) \
                    and len(clause.split()) <= 4:
                ops.append({"op": "segment", "target": re.sub(r"^the ", "", clause)})
            else:
                raise
    if not ops:
        raise CommandError(f"not a command: {text!r}")
    return ops
