"""Pretraining the tiny Qwen2.5-VL base on Ray Train: full-parameter training on generic visual-language tasks.

Before any RAU fine-tuning (LoRA SFT/GRPO on anatomy) the tiny policy should already read images and boxes and write
fluent, true ``<think>`` text. This job trains *every* weight of the ``init: random`` tiny Qwen2.5-VL (vision tower,
merger, language model, embeddings, head) on four generic tasks made from procedural scenes (``rau_ray.data.scenes``:
shapes, textures, noise; no anatomy), answered in the project's ``<think>...</think><answer>{JSON}</answer>`` format
with boxes ``[x1, y1, x2, y2]`` in pixels of the image as the processor resizes it:

* ``ground``   one image, "Where is the bright circle?" -> where it lies in words, then ``{"label", "box"}``;
* ``describe`` one image, every shape left to right -> ``{"boxes": [{"label", "box"}, ...]}``;
* ``compare``  two images of the same shapes, the second moved (rotated, scaled, shifted): "In which image is the
  dark ring further left / right / higher up / lower / larger / smaller?" -> both measurements, then
  ``{"answer": "image 1|2"}``;
* ``transfer`` two images: "Where does the box [..] of image 1 fall in image 2?" -> the shape it holds, then its box
  in image 2.

Two things make a model this small read the images at all (without them the loss settled on the average box and
the answers ignored the image): a coordinate token's target is spread over its neighbouring values
(``CompletionLoss``; number rows start as smooth functions of their value, ``policy._number_rows``), and
training-only heads on the image tokens (``AuxHeads``: the shape under each token, its place in the image, its
shape's box; dropped at export) give the image path a dense signal from the first step. Half the scenes hold one
shape (``single_shape``), where a box is read before telling shapes apart.
Every statement in a ``<think>`` is computed from the scene (positions by thirds of the frame, centres, sizes), so
it is true by construction; ``quality`` measures how often the model's own are. Each worker renders its share of the
scene stream (``data.seed``) once, then draws batches with fresh dihedral augmentations, tasks and questions from a
generator seeded by (seed, rank, step): a resumed run continues the same stream. Gradients are averaged over the
workers (gloo all-reduce); checkpoints hold the weights and AdamW's moments, so a restarted run resumes exactly. At
the end the driver exports a ``save_pretrained`` folder (model, processor, tokenizer, ``rau_tiny_spec.json``) to
``out`` (default ``weights/tiny/qwen2_5_vl``), which ``PolicyConfig(init="pretrained")`` loads.
``quality(folder)`` scores a base on held-out scenes (seed 7777) with bootstrap intervals (benchmarks/backbones.py).
Use: ``rau pretrain policy --config jobs/configs/pretrain-policy-tiny.yaml``.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from rau_ray.config import from_dict
from rau_ray.data.scenes import KINDS, TONES, make_scene, random_affine, render, scene_rng
from rau_ray.errors import ConfigError
from rau_ray.models import pretrained, prompts
from rau_ray.models.checkpoint import read_history, read_weights_and_state
from rau_ray.models.policy import Policy, PolicyConfig, _load_base, number_tokens, tiny_spec
from rau_ray.models.profiles import ModelConfig
from rau_ray.models.prompts import _SHAPE, MAX_ANSWER_CHARS, resized_size, scale_box, to_pil
from rau_ray.train import run
from rau_ray.train.pretrain import BENCHMARK_SEED, PretrainData, export, job_facts
from rau_ray.train.run import TrainJobConfig

TASKS = ("ground", "describe", "compare", "transfer")
# comparison -> (measure, phrase, the image with the smaller measure wins?)
COMPARISONS = {"left": ("x", "further left", True), "right": ("x", "further right", False),
               "higher": ("y", "higher up", True), "lower": ("y", "lower", False),
               "larger": ("size", "larger", False), "smaller": ("size", "smaller", True)}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# a comparison is asked only when the two measurements differ by this much (fraction of the frame side / of the size)
POSITION_MARGIN, SIZE_MARGIN = 0.06, 0.12
# the moved partner image: larger moves than random_affine's default, so comparisons have clear answers
MOVE = {"shift": 0.2, "scale": (0.7, 1.35), "rotate": 0.5}
MAX_NEW_TOKENS = {"ground": 48, "describe": 160, "compare": 56, "transfer": 56}
JSON_SEPARATORS = (", ", ": ")  # prompts.build_answer's


@dataclass(frozen=True, kw_only=True)
class PolicyPretrainConfig(TrainJobConfig):
    name: str = "pretrain-policy"  # run name: the folder under scale.storage_path (the same name resumes)
    out: str = "weights/tiny/qwen2_5_vl"  # where the trained base is exported (init: pretrained loads it)
    model: ModelConfig = field(default_factory=ModelConfig)  # its policy section: the tiny architecture
    data: PretrainData = field(default_factory=lambda: PretrainData(scenes=6000, phantoms=(), phantom_subjects=0,
                                                                    size=112))
    # share of each task in a batch
    task_weights: dict = field(default_factory=lambda: {"ground": 0.35, "describe": 0.15, "compare": 0.3,
                                                        "transfer": 0.2})
    batch_size: int = 16  # per worker
    lr: float = 1e-3  # AdamW peak rate: linear warmup, cosine decay to min_lr_ratio * lr at max_steps
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    single_shape: float = 0.5  # share of training scenes with one shape: where a box is read before which one
    coord_sigma: float = 2.0  # px: a coordinate token's target spreads over its neighbours (CompletionLoss)
    # training-only heads on the image tokens (AuxHeads, dropped at export): what each token shows, where it lies,
    # and the box of the shape it belongs to. Without them the language model never found the images: the loss
    # settled on the answers' average box and stayed there (BENCHMARKS.md)
    aux_weight: float = 1.0
    max_steps: int = 3000
    log_every: int = 25
    eval_every: int = 250  # steps between held-out validations (greedy generation); 0: only at the end
    val_items: int = 16  # per task, split over the workers
    val_seed: int = 2002  # validation scenes: neither the training stream nor the benchmark's 7777
    checkpoint_every: int = 250
    quality_items: int = 0  # per task: quality() of the exported base on held-out seed-7777 scenes (0: skip)

    def validate(self) -> None:
        super().validate()
        self.data.validate()
        if self.data.phantoms or self.data.phantom_subjects:
            raise ConfigError("data.phantoms / data.phantom_subjects: the policy base is pretrained on generic scenes "
                              "only; set data.phantoms: [] and data.phantom_subjects: 0")
        if self.data.scenes < 2 * self.scale.num_workers:
            raise ConfigError(f"data.scenes ({self.data.scenes}) must give every worker at least 2 scenes")
        unknown = sorted(set(self.task_weights) - set(TASKS))
        if unknown or not self.task_weights:
            raise ConfigError(f"task_weights: unknown task(s) {', '.join(unknown) or '(none given)'}; "
                              f"choose from {', '.join(TASKS)}")
        if any(not isinstance(w, (int, float)) or w < 0 for w in self.task_weights.values()) \
                or sum(self.task_weights.values()) <= 0:
            raise ConfigError("task_weights must be numbers >= 0 with a positive sum")
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("batch_size and max_steps must be at least 1")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup_steps >= 0):
            raise ConfigError("lr must be > 0, min_lr_ratio within 0..1 and warmup_steps >= 0")
        if not 0 <= self.single_shape <= 1 or self.coord_sigma < 0 or self.aux_weight < 0:
            raise ConfigError("single_shape must be in [0, 1], coord_sigma and aux_weight >= 0")
        if self.eval_every < 0 or self.val_items < 1 or self.quality_items < 0:
            raise ConfigError("eval_every and quality_items must be >= 0, val_items >= 1")
        if self.val_seed in (self.data.seed, BENCHMARK_SEED):
            raise ConfigError(f"val_seed {self.val_seed} must differ from data.seed ({self.data.seed}) and from the "
                              f"benchmark's {BENCHMARK_SEED}")
        policy = self.policy()
        if policy.model != "tiny":
            raise ConfigError(f"model.policy.model must be tiny (this job pretrains the tiny base), "
                              f"not {policy.model!r}")

    def policy(self):
        """The tiny PolicyConfig whose random init this job trains (the model section, init: random)."""
        return replace(self.model.policy, init="random")


# --- the generic tasks -------------------------------------------------------------------------------------------

@dataclass
class View:
    """One image as the policy sees it: the painted pixels and its shapes in the processor's frame."""

    image: np.ndarray  # (S, S) uint8
    frame: tuple[int, int]  # (height, width) the processor resizes it to: boxes are pixels of that
    shapes: list[tuple[str, list[int], float]]  # (name, [x1, y1, x2, y2] (x2, y2 exclusive), visible area) in frame
    label: np.ndarray | None = None  # (S, S) label map as turned: i for names[i - 1], 0 background
    names: tuple[str, ...] = ()


def make_view(image: np.ndarray, label: np.ndarray, names: list[str], frame: tuple[int, int],
              dihedral: int = 0) -> View:
    """A scene image (+ label map: i for names[i - 1]) turned by one of the 8 dihedral maps, boxes from its pixels."""
    if dihedral >= 4:
        image, label = image[:, ::-1], label[:, ::-1]
    image, label = np.rot90(image, dihedral % 4), np.rot90(label, dihedral % 4)
    h, w = label.shape
    shapes = []
    for i, name in enumerate(names, start=1):
        rows, cols = np.nonzero(label == i)
        if len(rows) == 0:
            continue
        box = scale_box([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], (h, w), frame)
        shapes.append((name, box, len(rows) * frame[0] * frame[1] / (h * w)))
    return View(np.ascontiguousarray(image), frame, shapes, np.ascontiguousarray(label), tuple(names))


def centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def position(box, frame: tuple[int, int]) -> str:
    """Where a box lies, by thirds of the frame: "at the top left", "on the right", "in the centre"..."""
    (cx, cy), (h, w) = centre(box), frame
    horizontal = "left" if cx < w / 3 else "right" if cx > 2 * w / 3 else "centre"
    vertical = "top" if cy < h / 3 else "bottom" if cy > 2 * h / 3 else "middle"
    if vertical == "middle":
        return "in the centre" if horizontal == "centre" else f"on the {horizontal}"
    return f"at the {vertical}" if horizontal == "centre" else f"at the {vertical} {horizontal}"


def _measure(shape, kind: str) -> float:
    cx, cy = centre(shape[1])
    return {"x": cx, "y": cy, "size": math.sqrt(shape[2])}[kind]


def _unique(view: View) -> dict[str, tuple]:
    counts: dict[str, int] = {}
    for s in view.shapes:
        counts[s[0]] = counts.get(s[0], 0) + 1
    return {s[0]: s for s in view.shapes if counts[s[0]] == 1}


def _answer(think: str, body: dict) -> str:
    return f"<think>{think}</think><answer>{json.dumps(body, separators=JSON_SEPARATORS)}</answer>"


def _box_text(box) -> str:
    return json.dumps([int(v) for v in box], separators=JSON_SEPARATORS)


def ground_item(view: View, rng: np.random.Generator) -> dict | None:
    unique = _unique(view)
    if not unique:
        return None
    name, box, _ = unique[sorted(unique)[int(rng.integers(len(unique)))]]
    return {"task": "ground", "views": [view], "question": f"Where is the {name}?",
            "completion": _answer(f"The {name} is {position(box, view.frame)}.", {"label": name, "box": box}),
            "truth": {"label": name, "box": box}}


def describe_item(view: View, rng: np.random.Generator | None = None) -> dict | None:
    shapes = sorted(view.shapes, key=lambda s: (centre(s[1])[0], centre(s[1])[1]))
    if not 1 <= len(shapes) < len(NUMBER_WORDS):
        return None
    names = [f"a {s[0]}" for s in shapes]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"
    plural = "shape" if len(shapes) == 1 else "shapes"
    order = "" if len(shapes) == 1 else ", from left to right"
    think = f"I see {NUMBER_WORDS[len(shapes)]} {plural}: {listed}{order}."
    body = {"boxes": [{"label": s[0], "box": s[1]} for s in shapes]}
    return {"task": "describe", "views": [view], "question": "Describe the shapes in the image.",
            "completion": _answer(think, body), "truth": {"boxes": body["boxes"]}}


def _pairs(v1: View, v2: View) -> list[str]:
    u1, u2 = _unique(v1), _unique(v2)
    return sorted(set(u1) & set(u2))


def compare_item(v1: View, v2: View, rng: np.random.Generator) -> dict | None:
    """Which of two images shows a shape further left / right, higher / lower, larger / smaller."""
    u1, u2 = _unique(v1), _unique(v2)
    options = []
    for name in _pairs(v1, v2):
        for key, (kind, _, _) in COMPARISONS.items():
            a, b = _measure(u1[name], kind), _measure(u2[name], kind)
            side = min(v1.frame) if kind != "size" else max(a, b)
            margin = POSITION_MARGIN if kind != "size" else SIZE_MARGIN
            if abs(a - b) >= margin * side:
                options.append((name, key, a, b))
    if not options:
        return None
    name, key, a, b = options[int(rng.integers(len(options)))]
    kind, phrase, smaller_wins = COMPARISONS[key]
    winner = 1 if (a < b) == smaller_wins else 2
    question = f"In which image is the {name} {phrase}?"
    if kind == "size":
        think = (f"The {name} is {round(a)} px across in image 1 and {round(b)} px across in image 2, "
                 f"so it is {phrase} in image {winner}.")
    else:
        think = (f"The {name} is centred at {kind} {round(a)} in image 1 and at {kind} {round(b)} in image 2, "
                 f"so it is {phrase} in image {winner}.")
    return {"task": "compare", "views": [v1, v2], "question": question,
            "completion": _answer(think, {"answer": f"image {winner}"}),
            "truth": {"answer": f"image {winner}", "label": name, "kind": kind, "values": [a, b]}}


def transfer_item(v1: View, v2: View, rng: np.random.Generator) -> dict | None:
    """Where a box of image 1 (a shape's) falls in image 2: the shape's box there."""
    names = _pairs(v1, v2)
    if not names:
        return None
    name = names[int(rng.integers(len(names)))]
    box1, box2 = _unique(v1)[name][1], _unique(v2)[name][1]
    think = f"The box holds the {name}; in image 2 it is {position(box2, v2.frame)}."
    return {"task": "transfer", "views": [v1, v2],
            "question": f"Where does the box {_box_text(box1)} of image 1 fall in image 2?",
            "completion": _answer(think, {"label": name, "box": box2}), "truth": {"label": name, "box": box2}}


BUILDERS = {"ground": lambda v1, v2, rng: ground_item(v1, rng), "describe": lambda v1, v2, rng: describe_item(v1),
            "compare": compare_item, "transfer": transfer_item}


def make_item(task: str, v1: View, v2: View, rng: np.random.Generator) -> dict | None:
    """An item of ``task`` from a scene's two views (None when the scene cannot pose it); two-image tasks show the
    views in a random order."""
    if task in ("compare", "transfer") and rng.random() < 0.5:
        v1, v2 = v2, v1
    return BUILDERS[task](v1, v2, rng)


def messages(item: dict) -> list[dict]:
    """The chat turn of an item (Qwen's default system turn): one image, or "Image 1:" / "Image 2:" pairs."""
    images = [{"type": "image", "image": to_pil(v.image)} for v in item["views"]]
    if len(images) == 1:
        content = [images[0], {"type": "text", "text": item["question"]}]
    else:
        content = [{"type": "text", "text": "Image 1:"}, images[0], {"type": "text", "text": "Image 2:"}, images[1],
                   {"type": "text", "text": item["question"]}]
    return [{"role": "user", "content": content}]


def scene_views(seed: int, index: int, size: int, frame: tuple[int, int], single: bool = False):
    """Scene ``index`` of stream ``seed`` (with one shape if ``single``) and its moved partner as (image, label,
    names) pairs."""
    scene = make_scene(seed, index, size, n_shapes=(1, 1) if single else (1, 5))
    moved = render(scene.spec, size, random_affine(scene_rng(seed, index, 99), **MOVE))
    return [(s.image, s.label, [sh.name for sh in s.shapes]) for s in (scene, moved)]


class ScenePool:
    """This worker's share of the training scenes, rendered once; ``batch`` draws fresh items from it."""

    def __init__(self, data: PretrainData, rank: int, world: int, frame: tuple[int, int], weights: dict,
                 single_shape: float = 0.0):
        self.frame = frame
        single = np.random.default_rng([data.seed, 17]).random(data.scenes) < single_shape
        self.scenes = [scene_views(data.seed, i, data.size, frame, bool(single[i]))
                       for i in range(rank, data.scenes, world)]
        self.tasks = [t for t in TASKS if weights.get(t, 0) > 0]
        p = np.array([float(weights[t]) for t in self.tasks])
        self.p = p / p.sum()

    def item(self, rng: np.random.Generator) -> dict:
        while True:
            pair = self.scenes[int(rng.integers(len(self.scenes)))]
            k = int(rng.integers(8))
            v1, v2 = (make_view(img, lab, names, self.frame, k) for img, lab, names in pair)
            item = make_item(self.tasks[int(rng.choice(len(self.tasks), p=self.p))], v1, v2, rng)
            if item is not None:
                return item

    def batch(self, rng: np.random.Generator, n: int) -> list[dict]:
        return [self.item(rng) for _ in range(n)]


def heldout_items(seed: int, n: int, size: int, frame: tuple[int, int], tasks=TASKS) -> list[dict]:
    """``n`` items per task from scenes of stream ``seed`` (no augmentation): validation and benchmark sets."""
    out = []
    for t, task in enumerate(tasks):
        got, index = 0, 0
        while got < n:
            (i1, l1, n1), (i2, l2, n2) = scene_views(seed, index, size, frame)
            item = make_item(task, make_view(i1, l1, n1, frame), make_view(i2, l2, n2, frame),
                             np.random.default_rng([seed, index, t]))
            index += 1
            if item is not None:
                out.append(item)
                got += 1
    return out


# --- scoring -----------------------------------------------------------------------------------------------------

def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


_WHERE = r"(in the centre|on the \w+|at the \w+(?: \w+)?)"  # position()'s phrases
_GROUND_THINK = re.compile(rf"The (.+?) is {_WHERE}\.")
_TRANSFER_THINK = re.compile(rf"The box holds the (.+?); in image 2 it is {_WHERE}\.")
_COMPARE_THINK = re.compile(r"The (.+?) is (?:centred at [xy] )?(\d+)(?: px across)? in image 1 and (?:at [xy] )?"
                            r"(\d+)(?: px across)? in image 2, so it is (.+?) in image ([12])\.")


def parse_choice(text: str) -> tuple[str, str] | None:
    """(think, "image 1"|"image 2") of a comparison answer, None when it is not one (never raises)."""
    if not isinstance(text, str) or len(text) > MAX_ANSWER_CHARS:
        return None
    m = _SHAPE.fullmatch(text)
    if not m or any(text.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return None
    try:
        body = json.loads(m.group(2))
    except (ValueError, RecursionError):
        return None
    if not isinstance(body, dict) or body.get("answer") not in ("image 1", "image 2"):
        return None
    return m.group(1).strip(), body["answer"]


def score(item: dict, text: str) -> dict[str, float]:
    """What a completion gets right: ``parsed`` (format), the task's metric (``iou`` or ``correct``) and
    ``think_true`` (the reasoning's statements hold for this scene). Unparseable answers score 0."""
    task, truth, frame = item["task"], item["truth"], item["views"][-1].frame
    size = (frame[1], frame[0])  # parse_answer wants (width, height)
    if task == "compare":
        parsed = parse_choice(text)
        if parsed is None:
            return {"parsed": 0.0, "correct": 0.0, "think_true": 0.0}
        think, answer = parsed
        m = _COMPARE_THINK.fullmatch(think)
        a, b = truth["values"]
        tolerance = (lambda v, t: abs(v - t) <= 0.08 * min(frame)) if truth["kind"] != "size" else \
            (lambda v, t: abs(v - t) <= 0.2 * t)
        true = bool(m) and m.group(1) == truth["label"] and tolerance(int(m.group(2)), a) \
            and tolerance(int(m.group(3)), b) and f"image {m.group(5)}" == truth["answer"] == answer
        return {"parsed": 1.0, "correct": float(answer == truth["answer"]), "think_true": float(true)}
    if task == "describe":
        parsed = prompts.parse_answer(text, "all_boxes", image_size=size)
        if not parsed:
            return {"parsed": 0.0, "iou": 0.0, "think_true": 0.0}
        best = []
        for t in truth["boxes"]:
            best.append(max([iou(b, t["box"]) for label, b in parsed.boxes if label == t["label"]], default=0.0))
        extra = max(0, len(parsed.boxes) - len(truth["boxes"]))
        names = sorted(t["label"] for t in truth["boxes"])
        true = sorted(label for label, _ in parsed.boxes) == names and \
            parsed.think.startswith(f"I see {NUMBER_WORDS[len(names)]} ")
        return {"parsed": 1.0, "iou": float(sum(best) / (len(best) + extra)), "think_true": float(true)}
    parsed = prompts.parse_answer(text, "ground", image_size=size)
    if not parsed:
        return {"parsed": 0.0, "iou": 0.0, "think_true": 0.0}
    box_iou = iou(parsed.box, truth["box"]) if parsed.box is not None and parsed.label == truth["label"] else 0.0
    m = (_GROUND_THINK if task == "ground" else _TRANSFER_THINK).fullmatch(parsed.think)
    true = bool(m) and m.group(1) == truth["label"] and m.group(2) == position(truth["box"], frame)
    return {"parsed": 1.0, "iou": box_iou, "think_true": float(true)}


def answer_items(policy, items: list[dict], batch: int = 16) -> list[str]:
    """Greedy completions for items, batched per task (each with its own token budget)."""
    out: list[str | None] = [None] * len(items)
    for task in TASKS:
        idx = [i for i, it in enumerate(items) if it["task"] == task]
        for s in range(0, len(idx), batch):
            chunk = idx[s:s + batch]
            texts = policy.generate([messages(items[i]) for i in chunk], max_new_tokens=MAX_NEW_TOKENS[task])
            for i, text in zip(chunk, texts):
                out[i] = text
    return out


def evaluate(policy, items: list[dict]) -> dict[str, list[dict]]:
    """Per-task score rows of the policy's greedy answers."""
    rows: dict[str, list[dict]] = {t: [] for t in TASKS}
    for item, text in zip(items, answer_items(policy, items)):
        rows[item["task"]].append(score(item, text))
    return rows


def bootstrap(values, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of the mean."""
    x = np.asarray(values, float)
    if len(x) == 0:
        return [float("nan"), float("nan")]
    means = x[np.random.default_rng(seed).integers(len(x), size=(n, len(x)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summarize(rows: dict[str, list[dict]]) -> dict:
    """Headline figures (mean and 95 % interval): grounding IoU, comparison accuracy, parseable share (all tasks),
    box-transfer IoU, describe IoU, and the share of true ``<think>`` statements."""
    def stat(values):
        return {"mean": float(np.mean(values)) if values else float("nan"), "ci95": bootstrap(values),
                "n": len(values)}

    every = [r for task in rows.values() for r in task]
    return {"grounding_iou": stat([r["iou"] for r in rows.get("ground", [])]),
            "comparison_accuracy": stat([r["correct"] for r in rows.get("compare", [])]),
            "parseable": stat([r["parsed"] for r in every]),
            "transfer_iou": stat([r["iou"] for r in rows.get("transfer", [])]),
            "describe_iou": stat([r["iou"] for r in rows.get("describe", [])]),
            "think_true": stat([r["think_true"] for r in every])}


def _policy_from(model, processor):
    processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last prompt token
    return Policy(model, processor, PolicyConfig())


def quality(folder, seed: int = BENCHMARK_SEED, n: int = 50, size: int = 112, tasks=TASKS) -> dict:
    """Held-out quality of a base folder (``save_pretrained`` layout, e.g. weights/tiny/qwen2_5_vl): ``n`` items per
    task from scenes of stream ``seed`` (7777: never trained on), greedy answers; see ``summarize``."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    items = heldout_items(seed, n, size, resized_size(size, size, processor), tasks)
    t = time.perf_counter()
    out = summarize(evaluate(_policy_from(model, processor), items))
    return {"folder": str(folder), "seed": seed, "items_per_task": n, "image_size": size,
            "seconds": round(time.perf_counter() - t, 1), **out}


# --- training ----------------------------------------------------------------------------------------------------

def lr_at(cfg: PolicyPretrainConfig, step: int) -> float:
    """Linear warmup to ``lr``, then cosine to ``min_lr_ratio * lr`` at ``max_steps`` (a function of the step)."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(1, cfg.warmup_steps)
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def is_vision(name: str) -> bool:
    return ".visual." in f".{name}"


def make_optimizer(cfg: PolicyPretrainConfig, model, aux=None):
    """AdamW over every weight (and the aux heads'): decay on matrices, none on norms and biases."""
    groups = []
    named_all = list(model.named_parameters()) + (list(aux.named_parameters()) if aux is not None else [])
    for part in ("language", "vision"):
        named = [(n, p) for n, p in named_all if p.requires_grad and is_vision(n) == (part == "vision")]
        groups.append({"name": part, "params": [p for _, p in named if p.ndim >= 2], "weight_decay": cfg.weight_decay})
        groups.append({"name": part, "params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95))


def _modules(model, aux) -> dict:
    return {"model": model} | ({"aux": aux} if aux is not None else {})


def train_state(model, optimizer, aux=None) -> dict[str, torch.Tensor]:
    """Weights (``model.*``, the training-only heads ``aux.*``) and AdamW moments as one flat tensor dict (a
    checkpoint's ``weights.safetensors``)."""
    modules = _modules(model, aux)
    out = {f"{prefix}.{k}": v.detach().clone() for prefix, m in modules.items() for k, v in m.state_dict().items()}
    names = {id(p): f"{prefix}.{n}" for prefix, m in modules.items() for n, p in m.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    out[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(state[key]).detach().clone().reshape(
                        state[key].shape if torch.is_tensor(state[key]) else ())
    return out


def load_train_state(model, optimizer, weights: dict[str, torch.Tensor], aux=None) -> None:
    for prefix, m in _modules(model, aux).items():
        m.load_state_dict({k[len(prefix) + 1:]: v for k, v in weights.items() if k.startswith(prefix + ".")},
                          strict=True)
        if optimizer is None:
            continue
        for name, p in m.named_parameters():
            keys = {key: weights.get(f"optim.{prefix}.{name}.{key}") for key in ("exp_avg", "exp_avg_sq", "step")}
            if all(v is not None for v in keys.values()):
                optimizer.state[p] = {k: v.clone().to(p.dtype if k != "step" else torch.float32)
                                      for k, v in keys.items()}


def _all_reduce_mean(tensors: list[torch.Tensor], world: int) -> None:
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def validate_model(policy, items: list[dict]) -> dict[str, float]:
    """Held-out scores summed over the workers (each answers its slice): val_* metrics of the curves."""
    rows = evaluate(policy, items)
    keys, values = [], []
    for task in TASKS:
        metric = "correct" if task == "compare" else "iou"
        for k in ("n", metric, "parsed", "think_true"):
            keys.append(f"{task}_{k}")
            values.append(float(len(rows[task])) if k == "n" else float(sum(r[k] for r in rows[task])))
    totals = run.all_sum(dict(zip(keys, values)))
    out = {}
    for task in TASKS:
        n = totals[f"{task}_n"]
        if n:
            metric = "correct" if task == "compare" else "iou"
            out[f"val_{task}_{'accuracy' if metric == 'correct' else 'iou'}"] = totals[f"{task}_{metric}"] / n
    n_all = sum(totals[f"{t}_n"] for t in TASKS)
    if n_all:
        out["val_parseable"] = sum(totals[f"{t}_parsed"] for t in TASKS) / n_all
        out["val_think_true"] = sum(totals[f"{t}_think_true"] for t in TASKS) / n_all
    return out


class CompletionLoss:
    """Next-token cross-entropy on the completion, with a coordinate token's one-hot target spread over its
    neighbouring values (a Gaussian of ``sigma`` px over the tokens of the same spelling): being 1 px off costs
    little, so the gradient says which way the box should move instead of only "not this number"."""

    def __init__(self, tokenizer, vocab_size: int, sigma: float):
        numbers = number_tokens(tokenizer)
        self.sigma = sigma
        self.value = torch.full((vocab_size,), -1.0)
        self.family = torch.full((vocab_size,), -1, dtype=torch.long)
        for i, v in numbers.items():
            self.value[i] = float(v)
            self.family[i] = int(tokenizer.convert_ids_to_tokens(i).startswith("\u0120"))

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        logits, labels = logits[:, :-1].float(), labels[:, 1:]
        keep = labels != -100
        logp = torch.log_softmax(logits[keep], -1)
        target = labels[keep]
        loss = -logp.gather(1, target[:, None])[:, 0]
        coord = self.value[target] >= 0
        if self.sigma > 0 and coord.any():
            v = self.value[target[coord]][:, None]
            same = (self.family[None, :] == self.family[target[coord]][:, None]) & (self.value[None, :] >= 0)
            w = torch.exp(-0.5 * ((self.value[None, :] - v) / self.sigma) ** 2) * same
            w = w / w.sum(1, keepdim=True)
            loss = loss.clone()
            loss[coord] = -(w * logp[coord]).sum(1)
        return loss.sum(), int(keep.sum())


def shape_names() -> list[str]:
    return [f"{tone} {kind}" for tone in TONES for kind in KINDS]


def token_targets(view: View, grid: tuple[int, int], names: list[str]) -> tuple[np.ndarray, ...]:
    """What the image tokens of ``view`` (a ``grid`` of merged patches) show, as the aux heads learn it: the shape
    covering most of each token (0: background, else 1 + its index in ``names``), the token's centre (row, col) as
    a fraction of the image, and the box (x1, y1, x2, y2, fractions) of that shape (NaN on background)."""
    gh, gw = grid
    lab = view.label
    rows, cols = lab.shape[0] // gh, lab.shape[1] // gw
    blocks = lab[:gh * rows, :gw * cols].reshape(gh, rows, gw, cols).transpose(0, 2, 1, 3).reshape(gh * gw, -1)
    counts = np.stack([np.bincount(b, minlength=len(view.names) + 1) for b in blocks])
    top = counts.argmax(1)
    ids = np.array([0] + [1 + names.index(n) for n in view.names])
    boxes = np.full((len(view.names) + 1, 4), np.nan, np.float32)
    for i in range(1, len(view.names) + 1):
        r, c = np.nonzero(lab == i)
        if len(r):
            boxes[i] = [c.min() / lab.shape[1], r.min() / lab.shape[0], (c.max() + 1) / lab.shape[1],
                        (r.max() + 1) / lab.shape[0]]
    rr, cc = np.meshgrid((np.arange(gh) + 0.5) / gh, (np.arange(gw) + 0.5) / gw, indexing="ij")
    return ids[top], np.stack([rr.ravel(), cc.ravel()], 1).astype(np.float32), boxes[top]


class AuxHeads(torch.nn.Module):
    """Training-only linear heads on the image tokens, dropped at export (as DINO's projection head is): the shape
    under each token from the vision tower's output (the language model's input), the token's place in the image
    after the first decoder layer (multimodal RoPE is relative: absolute position has to be worked out against the
    text before the image), and the box of its shape after the second. They give the image path a dense signal from
    the first step, where the answer's few coordinate tokens gave almost none."""

    def __init__(self, hidden: int, names: list[str]):
        super().__init__()
        self.names = names
        self.content = torch.nn.Linear(hidden, len(names) + 1)
        self.position = torch.nn.Linear(hidden, 2)
        self.box = torch.nn.Linear(hidden, 4)

    def forward(self, hidden_states, inputs, views: list[View], image_token_id: int) -> dict[str, torch.Tensor]:
        grids = [(int(h) // 2, int(w) // 2) for _, h, w in inputs["image_grid_thw"].tolist()]
        cls, pos, box = (torch.as_tensor(np.concatenate(x)) for x in
                         zip(*(token_targets(v, g, self.names) for v, g in zip(views, grids))))
        mask = inputs["input_ids"] == image_token_id
        known = ~torch.isnan(box[:, 0])
        out = {"content": F.cross_entropy(self.content(hidden_states[0][mask]), cls),
               "position": 10 * F.mse_loss(torch.sigmoid(self.position(hidden_states[1][mask])), pos)}
        layer = min(2, len(hidden_states) - 1)
        out["box"] = 10 * F.mse_loss(torch.sigmoid(self.box(hidden_states[layer][mask][known])), box[known]) \
            if known.any() else hidden_states[0].sum() * 0
        return out


def train_step(policy, items: list[dict], loss_fn: CompletionLoss, aux: AuxHeads | None = None,
               aux_weight: float = 1.0) -> tuple[float, int, dict[str, float]]:
    """Forward + backward of a batch, one pass per task (similar lengths: little padding); the gradient is that of
    the mean completion loss over all the batch's completion tokens (+ ``aux_weight`` x the aux heads' losses).
    Returns (that mean completion loss, the token count, the aux losses)."""
    groups = [[it for it in items if it["task"] == task] for task in TASKS]
    groups = [g for g in groups if g]
    inputs = [policy.inputs_for([messages(it) for it in g], [it["completion"] for it in g]) for g in groups]
    total = sum(int((x["labels"][:, 1:] != -100).sum()) for x in inputs)
    loss, aux_sums = 0.0, {}
    for g, x in zip(groups, inputs):
        labels = x.pop("labels")
        out = policy.model(**x, output_hidden_states=aux is not None)
        part, _ = loss_fn(out.logits, labels)
        part = part / total
        loss += float(part.detach())
        if aux is not None:
            share = len(g) / len(items)
            terms = aux(out.hidden_states, x, [v for it in g for v in it["views"]], policy.model.config.image_token_id)
            part = part + aux_weight * share * sum(terms.values())
            for k, v in terms.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + share * float(v.detach())
        part.backward()
    return loss, total, aux_sums


def build_base(cfg: PolicyPretrainConfig):
    """The random-initialised tiny base (model, processor) this job starts from, built once into the cache."""
    return _load_base(cfg.policy())


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker; ``config``: "cfg" (PolicyPretrainConfig as a dict)."""
    cfg = from_dict(PolicyPretrainConfig, config["cfg"], "pretrain-policy config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run.prepare_worker(cfg.scale)
    resumed = run.resume()
    if cfg.max_steps - resumed.step <= 0:
        return  # a finished run restarted: nothing left to do
    model, processor = run.local_rank_zero_first(lambda: build_base(cfg))
    model.train()
    policy = _policy_from(model, processor)
    torch.manual_seed(cfg.seed)  # the aux heads: the same on every worker
    aux = AuxHeads(model.config.text_config.hidden_size, shape_names()) if cfg.aux_weight > 0 else None
    optimizer = make_optimizer(cfg, model, aux)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if resumed.weights is not None:
        load_train_state(model, optimizer, resumed.weights, aux)
    loss_fn = CompletionLoss(processor.tokenizer, model.get_output_embeddings().weight.shape[0], cfg.coord_sigma)
    frame = resized_size(cfg.data.size, cfg.data.size, processor)
    t0 = time.perf_counter()
    pool = ScenePool(cfg.data, rank, world, frame, cfg.task_weights, cfg.single_shape)
    val = heldout_items(cfg.val_seed, cfg.val_items, cfg.data.size, frame)[rank::world]
    history, config_dict = resumed.history, asdict(cfg)
    if resumed.step == 0:
        row = {"step": 0, "resumed_from": 0, "pool_s": time.perf_counter() - t0, **validate_model(policy, val)}
        history.append(row)
        run.report(row)
    losses, aux_losses, tokens, t_window = [], [], 0, time.perf_counter()
    for step in range(resumed.step + 1, cfg.max_steps + 1):
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=False)
        loss, n_tokens, aux_loss = train_step(policy, pool.batch(np.random.default_rng([cfg.seed, rank, step]),
                                                                 cfg.batch_size), loss_fn, aux, cfg.aux_weight)
        aux_losses.append(aux_loss)
        _all_reduce_mean([p.grad for p in params], world)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        optimizer.step()
        losses.append(loss)
        tokens += n_tokens
        last = step == cfg.max_steps
        evaluate_now = (cfg.eval_every and step % cfg.eval_every == 0) or last
        save = step % cfg.checkpoint_every == 0 or last
        if step % cfg.log_every and not (evaluate_now or save):
            continue
        elapsed = time.perf_counter() - t_window
        keys = sorted(aux_losses[-1])
        sums = run.all_sum({"loss": sum(losses) / len(losses), "tokens": float(tokens),
                            **{f"aux_{k}": sum(a[k] for a in aux_losses) / len(aux_losses) for k in keys}})
        row = {"step": step, "resumed_from": resumed.step, "epoch": step * cfg.batch_size * world // cfg.data.scenes,
               "loss": sums["loss"] / world, "lr": lr, "grad_norm": grad_norm,
               **{f"aux_{k}": sums[f"aux_{k}"] / world for k in keys},
               "samples_per_s": len(losses) * cfg.batch_size * world / elapsed,
               "tokens_per_s": sums["tokens"] / elapsed,
               "rss_mb": run.rss_mb()}
        if evaluate_now:
            model.eval()
            row.update(validate_model(policy, val))
            model.train()
        history.append(row)
        run.report(row, weights=train_state(model, optimizer, aux) if save else None, step=step, history=history,
                   config=config_dict)
        losses, aux_losses, tokens, t_window = [], [], 0, time.perf_counter()


OBJECTIVE = ("full-parameter next-token cross-entropy on the completion (<think> + JSON answer) of four generic "
             "visual-language tasks on procedural scenes (ground, describe, compare two images, box transfer), a "
             "coordinate token's target spread over its neighbours (Gaussian, coord_sigma px), plus training-only "
             "heads on the image tokens (the shape under each token, its place in the image, its shape's box)")


def export_base(cfg: PolicyPretrainConfig, weights: dict[str, torch.Tensor], facts: dict):
    """The trained weights as a ``save_pretrained`` folder at ``cfg.out`` (with its ``rau_tiny_spec.json``)."""
    model, processor = build_base(cfg)
    load_train_state(model, None, {k: v for k, v in weights.items() if not k.startswith("aux.")})
    spec = tiny_spec(replace(cfg.policy(), init="pretrained"))

    def write(folder):
        pretrained.save_tiny_weights(model, folder)
        processor.save_pretrained(folder)
        (folder / pretrained.SPEC_FILE).write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))

    return export(cfg.out, write, facts)


def run_pretrain_policy(cfg: PolicyPretrainConfig):
    """Train on Ray Train, export the last weights to ``cfg.out``; returns Ray Train's Result."""
    cfg.validate()
    started = time.time()
    build_base(cfg)  # once, on the driver: the workers find it in the cache
    result = run.fit(train_loop_per_worker, {"cfg": asdict(cfg)}, cfg.scale, cfg.name, job=cfg)
    if result.error is not None or not result.checkpoint:
        return result  # jobs.summarise reports the failure
    weights, _ = read_weights_and_state(result.checkpoint.path)
    facts = job_facts(cfg, result, OBJECTIVE, started)
    facts.update(seed=cfg.seed, data_seed=cfg.data.seed, steps=cfg.max_steps,
                 history=read_history(result.checkpoint.path))
    folder = export_base(cfg, weights, facts)
    if cfg.quality_items:
        q = quality(folder, n=cfg.quality_items, size=cfg.data.size)
        facts["quality"] = q
        (folder / "training.json").write_text(json.dumps({**json.loads((folder / "training.json").read_text()),
                                                          "quality": q}, indent=1, default=str))
    return result
