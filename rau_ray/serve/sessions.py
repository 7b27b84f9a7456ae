"""Interactive sessions: one user's image (or volume), masks, prompts and window, with undo/redo, expiry and a limit.

A ``Session`` applies the eleven operations of ``rau_ray.commands`` to its state; operations that need a model
(segment, point / box prompts, propagate) call an async ``backend`` (the Ingress: Segmenter / the full pipeline), so
this module has no Ray in it and is unit-tested with a fake backend. Every state-changing operation pushes a
snapshot on the undo stack (bounded); ``undo``/``redo`` move between snapshots. The ``SessionStore`` keys sessions
by unguessable ids (``secrets.token_urlsafe``), so one user's state is never reachable by another without the id;
idle sessions expire after ``ttl_s`` (then ``SessionGone`` -> 410), and at most ``max_sessions`` live at once
(``SessionLimit`` -> 429).
Use: ``store = SessionStore(ttl_s=900, max_sessions=64)``; ``s = store.create(image, "CT", (1, 1))``;
``await s.apply(ops, backend)``; ``store.get(s.id)``; ``store.delete(s.id)``. A whole volume, structure by
structure, as a session does it (key slice, segment, propagate): ``await segment_volume(volume, "CT", spacing,
"liver", backend)`` (what ``rau pacs segment`` / ``POST /v1/pacs/segment`` run).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from rau_ray.data.formats import get_window
from rau_ray.models.prompts import to_pil
from rau_ray.models.reference import image_digest

MAX_HISTORY = 50
MAX_POINTS = 64
MAX_PROPAGATE = 256


class SessionError(Exception):
    """A command that cannot apply to this session's state (-> 422)."""


def dicom_seg_refusal(kind: str | None) -> str:
    """Why a session without DICOM sources has no DICOM-SEG. A DICOM Segmentation is a derived object: it names
    its patient, study and source images by UID so a PACS / viewer files it beside the images it outlines. A PNG,
    JPEG or NIfTI carries none of that, and wrapping it in an invented Secondary Capture would make a SEG that
    belongs to no patient's study and references images no archive holds: worse than no SEG for a clinical user.
    So DICOM-SEG is only offered for sessions opened from DICOM."""
    name = {"png": "PNG", "jpeg": "JPEG", "nifti": "NIfTI"}.get(kind or "", kind)
    came = f"a {name} image" if name else "an image that is not DICOM"
    return (f"DICOM-SEG needs a DICOM source: this session was opened from {came}, which names no patient, study "
            "or source images for a segmentation to reference. Export png, rle or nifti, or open the session from "
            "the DICOM file")


class SessionGone(Exception):
    """The session expired or was deleted (-> 410)."""


class SessionNotFound(Exception):
    """No such session id was ever issued here (-> 404)."""


class SessionLimit(Exception):
    """Too many live sessions (-> 429)."""


@dataclass(frozen=True)
class State:
    """One snapshot; masks are never modified in place, so snapshots share arrays."""

    slice: int = 0
    masks: dict = field(default_factory=dict)  # slice index -> bool (H, W)
    scores: dict = field(default_factory=dict)  # slice index -> model score of that mask
    points: tuple = ()  # ((x, y, 1|0), ...) on the current slice
    box: tuple | None = None  # (x1, y1, x2, y2) on the current slice
    window: tuple = ("abdomen", 40.0, 400.0)  # (preset or None, level, width): display only
    structure: str | None = None


def mask_box(mask: np.ndarray) -> list[int] | None:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


class Session:
    def __init__(self, image: np.ndarray, modality: str, spacing: tuple, sid: str | None = None,
                 sources: tuple = (), kind: str | None = None):
        self.id = sid or secrets.token_urlsafe(18)
        # the source DICOM datasets' metadata (no pixels), one per slice, for DICOM-SEG export; () otherwise
        self.sources = tuple(sources or ())
        self.kind = kind  # the format the image came in: png | jpeg | dicom | nifti (None: unknown)
        self.volume = image if image.ndim == 3 else image[None]  # (Z, H, W)
        self.modality = modality or "CT"
        self.spacing = tuple(float(s) for s in spacing)
        self.state = State(window=("abdomen", *get_window("abdomen")) if self.modality == "CT"
                           else (None, 127.5, 255.0))
        self.undo_stack: list[State] = []
        self.redo_stack: list[State] = []
        self.created = self.last_used = time.monotonic()
        self.lock = asyncio.Lock()
        self._model_inputs: dict[int, tuple[np.ndarray, str]] = {}  # slice -> (model input, its digest)

    # -- facts ---------------------------------------------------------------------------------------------------
    @property
    def is_volume(self) -> bool:
        return self.volume.shape[0] > 1

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.volume.shape[1:])

    def current_image(self) -> np.ndarray:
        return self.volume[self.state.slice]

    def model_input(self, index: int | None = None) -> np.ndarray:
        """The (H, W, 3) uint8 image the models see for a slice (fixed abdomen window for CT), kept so its hash —
        the Segmenter's embedding-cache key — stays the same across prompts."""
        return self._model_input(index)[0]

    def model_input_key(self, index: int | None = None) -> str:
        """That image's digest (``rau_ray.models.reference.image_digest``), computed once per slice, not per click."""
        return self._model_input(index)[1]

    def _model_input(self, index: int | None) -> tuple[np.ndarray, str]:
        i = self.state.slice if index is None else index
        if i not in self._model_inputs:
            if len(self._model_inputs) > 32:
                self._model_inputs.pop(next(iter(self._model_inputs)))
            image = np.asarray(to_pil(self.volume[i], self.modality))
            self._model_inputs[i] = (image, image_digest(image))
        return self._model_inputs[i]

    def mask(self, index: int | None = None) -> np.ndarray:
        i = self.state.slice if index is None else index
        m = self.state.masks.get(i)
        return m if m is not None else np.zeros(self.shape, dtype=bool)

    def metrics(self) -> dict:
        sx, sy = self.spacing[0], self.spacing[1]
        sz = self.spacing[2] if len(self.spacing) > 2 else 1.0
        cur = self.mask()
        total = int(sum(int(m.sum()) for m in self.state.masks.values()))
        out = {"slice": self.state.slice, "area_px": int(cur.sum()), "area_mm2": round(float(cur.sum()) * sx * sy, 2),
               "score": self.state.scores.get(self.state.slice), "box": mask_box(cur),
               "slices_with_mask": sorted(int(k) for k, m in self.state.masks.items() if m.any())}
        if self.is_volume:
            out["volume_ml"] = round(total * sx * sy * sz / 1000.0, 3)
        return out

    def summary(self) -> dict:
        s = self.state
        return {"id": self.id, "shape": list(self.shape), "slices": int(self.volume.shape[0]), "slice": s.slice,
                "modality": self.modality, "spacing": list(self.spacing), "source_format": self.kind,
                "exports": ["png", "rle", "nifti"] + (["dicom-seg"] if self.sources else []),
                "window": {"preset": s.window[0], "level": s.window[1], "width": s.window[2]},
                "structure": s.structure, "points": [list(p) for p in s.points],
                "box": list(s.box) if s.box else None, "can_undo": len(self.undo_stack),
                "can_redo": len(self.redo_stack)}

    # -- history -------------------------------------------------------------------------------------------------
    def _push(self, new: State) -> None:
        self.undo_stack.append(self.state)
        del self.undo_stack[:-MAX_HISTORY]
        self.redo_stack.clear()
        self.state = new

    def undo(self, steps: int = 1) -> int:
        n = 0
        while n < steps and self.undo_stack:
            self.redo_stack.append(self.state)
            self.state = self.undo_stack.pop()
            n += 1
        return n

    def redo(self, steps: int = 1) -> int:
        n = 0
        while n < steps and self.redo_stack:
            self.undo_stack.append(self.state)
            self.state = self.redo_stack.pop()
            n += 1
        return n

    # -- operations ----------------------------------------------------------------------------------------------
    def _check_xy(self, x: float, y: float) -> None:
        h, w = self.shape
        if not (0 <= x < w and 0 <= y < h):
            raise SessionError(f"point ({x}, {y}) is outside the image ({w}x{h}; x in [0, {w - 1}], "
                               f"y in [0, {h - 1}])")

    def _auto_points(self, count: int, positive: bool) -> list[tuple]:
        """Positions for "add three points" (no coordinates): inside the current mask for positive points, just
        outside its box for negative ones."""
        m = self.mask()
        if not m.any():
            raise SessionError("where? there is no mask to place points in; give a position, e.g. "
                               "'add a point at 40, 50'")
        if positive:
            ys, xs = np.nonzero(m)
            idx = np.linspace(0, len(xs) - 1, count + 2)[1:-1].round().astype(int)
            return [(int(xs[i]), int(ys[i]), 1) for i in idx]
        x1, y1, x2, y2 = mask_box(m)
        h, w = self.shape
        ring = [((x1 + x2) // 2, max(0, y1 - 2)), ((x1 + x2) // 2, min(h - 1, y2 + 1)),
                (max(0, x1 - 2), (y1 + y2) // 2), (min(w - 1, x2 + 1), (y1 + y2) // 2)]
        return [(int(x), int(y), 0) for x, y in (ring * count)[:count]]

    async def _prompt(self, backend, state: State) -> State:
        pts = [(p[0], p[1]) for p in state.points]
        res = await backend.prompt(self.model_input(state.slice), pts or None, [p[2] for p in state.points] or None,
                                   list(state.box) if state.box else None, key=self.model_input_key(state.slice))
        self.last_result = res
        return replace(state, masks={**state.masks, state.slice: res["mask"]},
                       scores={**state.scores, state.slice: res["score"]})

    async def apply(self, ops: list[dict], backend, known_structures=None) -> list[dict]:
        """Apply operations in order; returns one result dict per operation. A SessionError leaves the state as it
        was before the failing operation (the earlier ones stay applied, each undoable)."""
        results = []
        for op in ops:
            results.append(await self._apply_one(op, backend, known_structures))
        return results

    async def _apply_one(self, op: dict, backend, known) -> dict:
        kind, s = op.get("op"), self.state
        self.last_result = None
        if kind == "undo":
            return {"op": kind, "undone": self.undo(int(op.get("steps", 1)))}
        if kind == "redo":
            return {"op": kind, "redone": self.redo(int(op.get("steps", 1)))}
        if kind == "segment":
            target = str(op["target"]).strip().lower()
            if known is not None and target not in known:
                raise SessionError(f"unknown structure {target!r}; known: {', '.join(sorted(known))}")
            res = await backend.segment(self, target)
            self.last_result = res
            self._push(replace(s, masks={**s.masks, s.slice: res["mask"]}, scores={**s.scores, s.slice: res["score"]},
                               points=(), box=None, structure=target))
            # what /v1/segment says about a structure, so a client needs one call: reasoning, label, box, timings
            return {"op": kind, "structure": target, "score": res["score"], "reference": res.get("reference"),
                    **{k: res[k] for k in ("label", "box", "reasoning", "format_error", "timings_ms") if k in res}}
        if kind == "add_point":
            if op.get("x") is not None and op.get("y") is not None:
                self._check_xy(op["x"], op["y"])
                new = [(int(op["x"]), int(op["y"]), 1 if op.get("positive", True) else 0)]
            else:
                new = self._auto_points(int(op.get("count", 1)), bool(op.get("positive", True)))
            points = (s.points + tuple(new))[-MAX_POINTS:]
            self._push(await self._prompt(backend, replace(s, points=points)))
            return {"op": kind, "points": [list(p) for p in new], "score": self.state.scores.get(s.slice)}
        if kind == "add_box":
            box = op.get("box")
            if box is None:
                box = mask_box(self.mask())
                if box is None:
                    raise SessionError("which box? there is no mask to box; give corners, e.g. "
                                       "'add box 10 20 100 120'")
            x1, y1, x2, y2 = (int(v) for v in box)
            self._check_xy(x1, y1)
            self._check_xy(max(x1, x2 - 1), max(y1, y2 - 1))
            if x2 <= x1 or y2 <= y1:
                raise SessionError(f"box {box} is empty: x2 must exceed x1 and y2 exceed y1")
            self._push(await self._prompt(backend, replace(s, box=(x1, y1, x2, y2))))
            return {"op": kind, "box": [x1, y1, x2, y2], "score": self.state.scores.get(s.slice)}
        if kind == "clear":
            masks = {k: v for k, v in s.masks.items() if k != s.slice}
            scores = {k: v for k, v in s.scores.items() if k != s.slice}
            self._push(replace(s, masks=masks, scores=scores, points=(), box=None))
            return {"op": kind}
        if kind == "set_window":
            if op.get("preset"):
                level, width = get_window(op["preset"])
                window = (op["preset"], float(level), float(width))
            else:
                if op.get("level") is None or op.get("width") is None or float(op["width"]) <= 0:
                    raise SessionError("a window needs a level and a width > 0, e.g. 'window 40/400'")
                window = (None, float(op["level"]), float(op["width"]))
            self._push(replace(s, window=window))
            return {"op": kind, "window": {"preset": window[0], "level": window[1], "width": window[2]}}
        if kind == "goto_slice":
            n = self.volume.shape[0]
            index = op["index"] if op.get("index") is not None else s.slice + int(op.get("delta") or 0)
            if not 0 <= index < n:
                raise SessionError(f"slice {index} is outside the image: it has {n} slice(s), 0 to {n - 1}")
            self._push(replace(s, slice=int(index), points=(), box=None))
            return {"op": kind, "slice": int(index)}
        if kind == "propagate":
            return await self._propagate(op.get("direction", "both"), backend)
        if kind == "export":
            fmt = op.get("format", "png")
            if fmt == "dicom-seg" and not self.sources:
                raise SessionError(dicom_seg_refusal(self.kind))
            return {"op": kind, "format": fmt, "url": f"/v1/sessions/{self.id}/mask?format={fmt}"}
        if kind == "show_metrics":
            return {"op": kind, "metrics": self.metrics()}
        raise SessionError(f"unknown operation {kind!r}")

    async def _propagate(self, direction: str, backend) -> dict:
        """Carry the current slice's mask through the volume: each next slice is prompted with the box of the mask
        on the slice before it (SAM2 on that slice's cached embedding), until a mask comes back empty."""
        if not self.is_volume:
            raise SessionError("propagate needs a volume (a NIfTI or DICOM series); this session holds one image")
        s = self.state
        start = self.mask()
        if not start.any():
            raise SessionError("nothing to propagate: segment or prompt the current slice first")
        masks, scores = dict(s.masks), dict(s.scores)
        done = []
        steps = {"forward": [1], "backward": [-1], "both": [1, -1]}[direction]
        for step in steps:
            prev, i = start, s.slice + step
            while 0 <= i < self.volume.shape[0] and len(done) < MAX_PROPAGATE:
                box = mask_box(prev)
                res = await backend.prompt(self.model_input(i), None, None, box, key=self.model_input_key(i))
                if not res["mask"].any():
                    break
                masks[i], scores[i] = res["mask"], res["score"]
                done.append(i)
                prev, i = res["mask"], i + step
        self._push(replace(s, masks=masks, scores=scores))
        return {"op": "propagate", "direction": direction, "slices": sorted(done)}


class SessionStore:
    def __init__(self, ttl_s: float = 900.0, max_sessions: int = 64, clock=time.monotonic):
        if ttl_s <= 0 or max_sessions < 1:
            raise ValueError("ttl_s must be > 0 and max_sessions >= 1")
        self.ttl_s, self.max_sessions, self.clock = float(ttl_s), int(max_sessions), clock
        self._live: OrderedDict[str, Session] = OrderedDict()
        self._gone: OrderedDict[str, str] = OrderedDict()  # id -> why ("expired" | "deleted"), bounded

    def __len__(self) -> int:
        self.expire()
        return len(self._live)

    def _bury(self, sid: str, why: str) -> None:
        self._gone[sid] = why
        while len(self._gone) > 10_000:
            self._gone.popitem(last=False)

    def expire(self) -> int:
        now, dead = self.clock(), []
        for sid, s in self._live.items():
            if now - s.last_used > self.ttl_s and not s.lock.locked():
                dead.append(sid)
        for sid in dead:
            del self._live[sid]
            self._bury(sid, "expired")
        return len(dead)

    def create(self, image: np.ndarray, modality: str, spacing: tuple, sources: tuple = (),
               kind: str | None = None) -> Session:
        self.expire()
        if len(self._live) >= self.max_sessions:
            oldest = min(s.last_used for s in self._live.values())
            wait = max(1, int(self.ttl_s - (self.clock() - oldest)) + 1)
            raise SessionLimit(f"session limit reached ({self.max_sessions} live sessions); delete one "
                               f"(DELETE /v1/sessions/ID) or retry in {wait} s", wait)
        s = Session(image, modality, spacing, sources=sources, kind=kind)
        s.created = s.last_used = self.clock()
        self._live[s.id] = s
        return s

    def get(self, sid: str) -> Session:
        self.expire()
        s = self._live.get(sid)
        if s is None:
            if sid in self._gone:
                raise SessionGone(f"session {sid} has {self._gone[sid]}"
                                  + (f" (idle longer than {self.ttl_s:g} s)" if self._gone[sid] == "expired" else "")
                                  + "; create a new one with POST /v1/sessions")
            raise SessionNotFound(f"no session {sid!r}; create one with POST /v1/sessions")
        s.last_used = self.clock()
        return s

    def peek(self, sid: str) -> Session | None:
        """The live session with this id, or None; unlike ``get`` it does not count as use (no TTL refresh)."""
        self.expire()
        return self._live.get(sid)

    def delete(self, sid: str) -> None:
        self.get(sid)
        del self._live[sid]
        self._bury(sid, "been deleted")

    def touch(self, s: Session) -> None:
        s.last_used = self.clock()


# ----------------------------------------------------------------------------------- a whole volume, as a session
def key_slices(n: int, count: int = 5) -> list[int]:
    """Where a structure's volume segmentation may start: ``count`` slices evenly spaced inside the volume (not its
    end slices), nearest the middle first."""
    count = max(1, min(int(count), n))
    picks = {min(n - 1, (n * (i + 1)) // (count + 1)) for i in range(count)}
    return sorted(picks, key=lambda k: (abs(2 * k - (n - 1)), k))


@dataclass
class VolumeSegmentation:
    """One structure through a volume: ``masks`` bool (Z, H, W); ``key_slice`` where it was segmented (None: found
    on none of the slices tried, so absent and ``masks`` empty); ``result``: the segment operation's result there
    (score, label, reasoning, reference, timings); ``slices``: those with mask pixels; ``tried``: {slice: mask
    pixels} of the key slices tried."""

    masks: np.ndarray
    key_slice: int | None
    result: dict
    slices: list[int]
    tried: dict


async def segment_volume(volume: np.ndarray, modality: str, spacing: tuple, structure: str, backend,
                         known=None, *, start: list[int] | None = None, propagate: bool = True,
                         every_slice: bool = False) -> VolumeSegmentation:
    """A structure through a (Z, H, W) volume as a person does it in a session: find a slice that shows it well,
    "segment the liver" there (the full pipeline: reference, policy, segmenter), then "propagate" (SAM2 slice to
    slice from the box of the mask before, until a mask comes back empty). The key slice: of ``start`` (default
    ``key_slices``: five evenly spaced, each segmented in a session of its own, concurrently), the one whose mask
    is largest, as a person scrolls to where the organ is biggest; a backend that finds no reference showing the
    structure on a slice answers an empty mask there. ``every_slice``: "segment the liver" on every slice instead
    (the full pipeline each time, no propagation: n times the calls, but no drift from slice to slice).
    ``backend``: what a ``Session`` calls (the Serve pipeline, or ``rau_ray.serve.pacs.LocalBackend``
    in-process). A SessionError (an unknown structure) is raised as is."""
    n = volume.shape[0] if volume.ndim == 3 else 1
    if every_slice:
        candidates = list(range(n))
    else:
        candidates = [int(k) for k in (start if start is not None else key_slices(n))]

    async def at(k: int):
        session = Session(volume, modality, spacing)  # each its own state; the volume array is shared, not copied
        results = await session.apply([{"op": "goto_slice", "index": k}, {"op": "segment", "target": structure}],
                                      backend, known)
        return session, results[-1]

    tried = await asyncio.gather(*(at(k) for k in candidates))
    areas = {k: int(session.mask().sum()) for k, (session, _) in zip(candidates, tried)}
    best = max(candidates, key=lambda k: areas[k]) if candidates else None  # ties: the first (nearest the middle)
    if every_slice:
        masks = np.stack([session.mask() for session, _ in tried])  # each session is on its own slice
        found = best if best is not None and areas[best] else None
        return VolumeSegmentation(masks, found, tried[candidates.index(best)][1] if tried else {},
                                  [k for k in candidates if areas[k]], areas)
    if best is None or areas[best] == 0:
        return VolumeSegmentation(np.zeros((n, *volume.shape[-2:]), bool), None,
                                  tried[0][1] if tried else {}, [], areas)
    session, result = tried[candidates.index(best)]
    if propagate and session.is_volume:
        await session.apply([{"op": "propagate", "direction": "both"}], backend)
    masks = np.stack([session.mask(i) for i in range(n)])
    return VolumeSegmentation(masks, best, result, [int(i) for i in np.flatnonzero(masks.any(axis=(1, 2)))], areas)
