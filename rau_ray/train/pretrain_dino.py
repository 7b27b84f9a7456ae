"""Self-supervised pretraining of the tiny DINOv2 embedder on Ray Train, and its held-out retrieval quality.

The whole tiny ``Dinov2Model`` (``RetrievalConfig``'s architecture, from its random init) learns without labels:
two augmented views go through the model, each view's retrieval embedding (the CLS token and the mean patch token,
each L2-normalised and concatenated, exactly what ``Embedder`` returns) through a small projection head, and a
symmetric InfoNCE loss (SimCLR's NT-Xent) pulls each pair together (``OBJECTIVE``). A scene's pair is two
augmentations of it, every other image a negative. A CT slice's pair is a slice of the same volume at most
``neighbour`` slices away (the scan's own geometry, as time-contrastive learning pairs nearby video frames) or,
for a ``cross_volume`` share, a slice of another volume at the same scan position (+-``neighbour``): the same depth
of another subject is what retrieval must find. Its negatives are the farther slices of its own volume
(``group_slices`` a volume in a batch) and other volumes' slices at least ``far`` positions away. The augmentations
keep the layout of the anatomy: contrast / brightness / gamma jitter, blur, noise, small rotations, shifts,
per-axis zooms and a smooth elastic field (no flips, no small crops). Images: generic procedural scenes
(``rau_ray.data.scenes``) and every axial slice of the *train*-split subjects of the in-distribution phantoms made
with the pretraining data seed (``PretrainData``), rendered once per worker from its Ray Data shard. Ultrasound,
xray-msk, val/test subjects and the benchmark seed are never seen.
DDP over the workers (``ray.train.torch.prepare_model``); checkpoints (``rau_ray.train.run``) hold the model and the
head (``model.*``, ``head.*``), so the same name again resumes (AdamW's moments restart). Validation: pose recall@1/@5
of the embedding on phantom subjects of another seed (``val_seed``, not the benchmark's), half of them the bank,
half the queries, logged at step 0 and every ``eval_every`` steps. At the end the driver exports a
``save_pretrained`` folder (``config.json``, ``model.safetensors``, ``preprocessor_config.json`` as the tiny
profile builds them, ``rau_tiny_spec.json``, ``training.json``) into ``out`` (``weights/tiny/dinov2``), where
``RetrievalConfig(init="pretrained")`` loads it from.
``quality(...)`` measures pose recall@1/@5 with 95 % bootstrap intervals on held-out ct-abdomen subjects (seed 7777).
Status (2026-12-02, shipped as weights/tiny/dinov2, the tiny embedder's default): the config's 600 steps (12.5 min)
reach pose recall@1/@5 0.425 [0.31, 0.54] / 0.775 [0.69, 0.85] on ``quality()`` (40 subjects of seed 7777, 80
queries, a hit within 10 mm of anatomical depth), vs the random init's 0.16 / 0.68; targets 0.60 / 0.90 missed.
Within-volume negatives alone left subject identity in the embedding (validation recall did not rise over 600
steps); the cross-volume positives at the same scan position are what made it rise (0.29 -> 0.42 at k = 1).
Use: ``rau pretrain dino --config jobs/configs/pretrain-dino-tiny.yaml``; ``quality("weights/tiny/dinov2")``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from torch import nn

from rau_ray import storage
from rau_ray.config import from_dict
from rau_ray.data.phantoms import get_phantom
from rau_ray.data.phantoms.ct_abdomen import draw_subject, slice_depth
from rau_ray.data.scenes import make_scene
from rau_ray.errors import ConfigError, DataError
from rau_ray.models import pretrained, prompts
from rau_ray.models.checkpoint import read_weights_and_state
from rau_ray.models.retrieval import TINY, Embedder, RetrievalConfig, tiny_model, tiny_processor, tiny_spec
from rau_ray.scoring.metrics import grouped_bootstrap
from rau_ray.train import pretrain, run
from rau_ray.train.pretrain import BENCHMARK_SEED, PretrainData, phantom_train_subjects
from rau_ray.train.run import TrainJobConfig

OBJECTIVE = ("self-supervised InfoNCE (NT-Xent, temperature `temperature`) between two augmented views, of one image "
             "(scenes) or of two slices at most `neighbour` slices apart in one phantom volume (a depth-contrastive "
             "positive, as time-contrastive learning pairs nearby video frames) or, for a `cross_volume` share, a "
             "slice of another volume at the same scan position; a slice's negatives are the farther slices of its "
             "own volume and other volumes' slices at least `far` positions away; on the retrieval embedding "
             "(normalised CLS + mean patch token) through a 2-layer projection head; no labels")
ARCH_FIELDS = ("hidden_size", "num_layers", "num_heads", "pooling")  # RetrievalConfig fields `arch` may override
VAL_SEED = 4242  # validation subjects: neither the pretraining data's seed nor the benchmark's
# a retrieved slice shows the query's pose when its anatomical depth lies within this of the query's (2 slices of
# the 5-mm grid); SLICE_TOLERANCE: issue 4's older |slice index difference|, blind to the subjects' own z shifts
POSE_TOLERANCE_MM = 10.0
SLICE_TOLERANCE = 2


@dataclass(frozen=True)
class Augment:
    """Layout-preserving augmentations of one view (``augment:`` in the YAML); the identity keeps the Embedder's
    input (the whole image resized to ``image_size``)."""

    rotation_deg: float = 8.0  # uniform in +-
    shift: float = 0.06  # of the image side, uniform in +- on each axis
    zoom: float = 0.10  # scale uniform in [1 - zoom, 1 + zoom], each axis on its own
    elastic: float = 0.03  # smooth displacement field (4x4 control points), std in units of the half side
    contrast: float = 0.35  # multiplier uniform in [1 - c, 1 + c] around the image mean
    brightness: float = 0.12  # added, uniform in +- (grey range 0..1)
    gamma: float = 0.35  # exponent exp(uniform(+- gamma))
    blur_p: float = 0.3  # probability of a Gaussian blur (sigma 0.3..1.2 px)
    noise: float = 0.04  # Gaussian noise, std uniform in [0, noise]

    def validate(self) -> None:
        if not (0 <= self.rotation_deg <= 30 and 0 <= self.shift <= 0.2 and 0 <= self.zoom <= 0.3
                and 0 <= self.elastic <= 0.1):
            raise ConfigError("augment: rotation_deg <= 30, shift <= 0.2, zoom <= 0.3 and elastic <= 0.1 (larger "
                              "ones move the anatomy's layout, which retrieval must keep)")
        if min(self.contrast, self.brightness, self.gamma, self.blur_p, self.noise) < 0 or self.blur_p > 1:
            raise ConfigError("augment: contrast, brightness, gamma, noise must be >= 0 and blur_p in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class DinoPretrainConfig(TrainJobConfig):
    name: str = "pretrain-dino-tiny"  # run name: the folder under scale.storage_path; the same name again resumes
    out: str = "weights/tiny/dinov2"  # export folder; a relative path is relative to the checkout (repo root)
    data: PretrainData = field(default_factory=PretrainData)
    slices_per_subject: int = 55  # CT axial slices a phantom subject (stratified; 55 = every slice of the abdomen)
    phantom_fraction: float = 0.75  # share of phantom images in a batch (the rest: scenes); 0: as drawn
    group_slices: int = 8  # slices of one subject in a batch: the negatives of its depth-contrastive term
    neighbour: int = 2  # a CT slice's positive: a slice of the same volume at most this many slices away
    # share of CT anchors whose positive is instead another volume's slice at the same scan position (within
    # `neighbour` slice indices): scans of one protocol cover the same range, so the same index of two subjects is
    # roughly the same anatomy (+-15 mm here); this pulls subjects together where within-volume contrast alone
    # leaves each subject its own identity in the embedding. No labels: only each scan's own slice order.
    cross_volume: float = 0.5
    far: int = 8  # another volume's slice is a negative only this many slice indices away (never a near one)
    arch: dict = field(default_factory=dict)  # RetrievalConfig overrides: hidden_size, num_layers, num_heads, pooling
    augment: Augment = field(default_factory=Augment)
    batch_size: int = 64  # images per worker and step (two views each; the InfoNCE negatives are the worker's)
    temperature: float = 0.2  # InfoNCE softmax temperature
    proj_dim: int = 128  # projection head output (the head is dropped at export)
    lr: float = 2e-3  # AdamW peak, after `warmup_steps` linear warm-up, cosine decay to lr / 10
    weight_decay: float = 0.05
    warmup_steps: int = 50
    grad_clip: float = 1.0
    max_steps: int = 600
    log_every: int = 20
    eval_every: int = 100  # steps between validations; 0: only at the start and the end
    checkpoint_every: int = 200  # the last step always saves
    val_seed: int = VAL_SEED
    val_subjects: int = 16  # phantom subjects of val_seed: half the bank, half the queries
    seed: int = 0  # model init (RetrievalConfig.seed), head init, batches and augmentations

    def validate(self) -> None:
        super().validate()
        self.data.validate()
        self.augment.validate()
        bad = sorted(set(self.arch) - set(ARCH_FIELDS))
        if bad:
            raise ConfigError(f"arch: {', '.join(bad)} cannot be overridden; choose from {', '.join(ARCH_FIELDS)}")
        self.retrieval_config().validate()
        if min(self.batch_size, self.max_steps, self.proj_dim, self.slices_per_subject, self.group_slices) < 1 \
                or min(self.eval_every, self.warmup_steps, self.neighbour) < 0:
            raise ConfigError("batch_size, max_steps, proj_dim, slices_per_subject and group_slices must be >= 1; "
                              "eval_every, warmup_steps and neighbour >= 0")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2: InfoNCE needs other images as negatives")
        if self.lr <= 0 or self.temperature <= 0 or self.grad_clip <= 0 or self.weight_decay < 0:
            raise ConfigError("lr, temperature and grad_clip must be > 0, weight_decay >= 0")
        if not 0 <= self.cross_volume <= 1 or self.far <= self.neighbour:
            raise ConfigError(f"cross_volume must be in [0, 1] and far ({self.far}) above neighbour "
                              f"({self.neighbour})")
        if not 0 <= self.phantom_fraction <= 1:
            raise ConfigError(f"phantom_fraction must be in [0, 1], got {self.phantom_fraction}")
        if BENCHMARK_SEED in (self.val_seed, self.data.seed):
            raise ConfigError(f"seed {BENCHMARK_SEED} is the held-out benchmark's; validation and data use others")
        if self.val_seed == self.data.seed:
            raise ConfigError("val_seed must differ from data.seed: validation subjects are not training subjects")
        if self.val_subjects < 4:
            raise ConfigError("val_subjects must be >= 4 (half bank, half queries)")
        self.out_path()

    def retrieval_config(self):
        """The embedder this run trains (random init with ``seed``) and exports (as ``init: pretrained``)."""
        return replace(RetrievalConfig(init="random", seed=self.seed), **self.arch)

    def out_path(self) -> Path:
        """``out`` as a path: absolute as given, relative to the checkout (the folder holding ``rau_ray/``)."""
        if not self.out:
            raise ConfigError("out: the folder to export the weights to must be given")
        out = Path(self.out).expanduser()
        return out if out.is_absolute() else Path(__file__).resolve().parents[2] / out


# -- images ---------------------------------------------------------------------------------------------------------
def window(image: np.ndarray, modality: str) -> np.ndarray:
    """uint8 grey as the Embedder sees it (CT windowed to the abdomen window)."""
    return np.asarray(prompts.to_pil(image, modality).convert("L"))


def phantom_images(name: str, seed: int, subject: int, size: int, slices: int) -> list:
    """A phantom subject's 2D samples (several axial slices of a CT subject)."""
    phantom = get_phantom(name)
    if getattr(phantom, "SUPPORTS_3D", False):
        return phantom.generate_2d(seed, subject, size=size, slices=slices)
    return phantom.generate_2d(seed, subject, size=size)


def training_items(cfg: DinoPretrainConfig) -> list[dict]:
    """Plain-dict Ray Data rows: one per scene, one per phantom train subject (rendered by the worker)."""
    items = [{"kind": "scene", "index": i} for i in range(cfg.data.scenes)]
    for name, subjects in phantom_train_subjects(cfg.data).items():
        items += [{"kind": name, "index": s} for s in subjects]
    return items


def render_items(items: list[dict], cfg: DinoPretrainConfig) -> dict:
    """These rows as arrays: uint8 "images" (n, size, size); "group" (n,): -1 for a scene or a single 2D image, else
    the index of its phantom volume (slices of one subject share it); "slice" (n,): axial index, -1 without."""
    images, group, pose = [], [], []
    for n, it in enumerate(items):
        if it["kind"] == "scene":
            images.append(make_scene(cfg.data.seed, it["index"], cfg.data.size).image)
            group.append(-1)
            pose.append(-1)
            continue
        for s in phantom_images(it["kind"], cfg.data.seed, it["index"], cfg.data.size, cfg.slices_per_subject):
            images.append(window(s.image, s.modality))
            group.append(n if s.slice is not None else -1)
            pose.append(-1 if s.slice is None else s.slice)
    return {"images": np.stack(images), "group": np.asarray(group), "slice": np.asarray(pose)}


def val_set(seed: int, subjects: int, size: int, slices: int = 4, phantom: str = "ct-abdomen") -> dict:
    """Held-out phantom subjects as a recall set: images (as generated), modality, subject and slice per image, and
    for ct-abdomen the anatomical depth of each slice (mm below the subject's own diaphragm: the slice's depth with
    the subject's z shift and scale undone), which only ``pose_ceiling`` uses."""
    images, subj, pose, anatomy = [], [], [], []
    for s in range(subjects):
        params = _ct_params(phantom, seed, s)
        for sample in phantom_images(phantom, seed, s, size, slices):
            images.append(sample.image)
            subj.append(s)
            pose.append(sample.slice)
            if params is not None:
                anatomy.append((slice_depth(sample.slice) - params["shift_d"]) / params["scale_d"])
    return {"images": images, "modality": sample.modality, "subject": np.asarray(subj), "slice": np.asarray(pose),
            "anatomy": np.asarray(anatomy) if anatomy else None, "seed": seed, "size": size}


def _ct_params(phantom: str, seed: int, subject: int) -> dict | None:
    if phantom != "ct-abdomen":
        return None

    return draw_subject(seed, subject)


def pose_ceiling(data: dict, ks=(1, 5), tolerance: float = SLICE_TOLERANCE, by: str = "slice") -> dict | None:
    """Recall@k of an oracle that ranks the bank by true anatomical depth (``val_set``'s "anatomy"): what any image
    embedding can reach at best, with hits counted by ``by`` ("slice": |slice index difference| <= tolerance, or
    "anatomy": depth within tolerance mm). By slice it is low: subjects differ by a z shift (+-15 mm) and scale
    (+-8 %) the image cannot show, so the same anatomy sits ~3 slices apart between two subjects; by anatomy it is
    ~1 once the bank is dense enough (a bank of 12 subjects x 4 slices: 1.0 here). None without anatomy."""
    if data.get("anatomy") is None:
        return None
    hits, _ = pose_hits(data["anatomy"][:, None], data["subject"], data[by], ks, tolerance,
                        similarity=lambda q, b: -np.abs(q - b.T))
    return {f"recall@{k}": round(float(h.mean()), 4) for k, h in hits.items()}


def pose_hits(emb: np.ndarray, subject: np.ndarray, pose: np.ndarray, ks=(1, 5), tolerance: float = SLICE_TOLERANCE,
              similarity=None) -> tuple[dict, np.ndarray]:
    """Bank = the first half of the subjects, queries = the others: per query and k, is a bank image of the query's
    pose (|pose - query pose| <= tolerance; pose: slice index or anatomical depth) among its top k (cosine)?
    -> {k: bool array}, query subjects."""
    subjects = np.unique(subject)
    in_bank = np.isin(subject, subjects[:len(subjects) // 2])
    bank, query = np.flatnonzero(in_bank), np.flatnonzero(~in_bank)
    sims = (similarity or (lambda q, b: q @ b.T))(emb[query], emb[bank])
    order = np.argsort(-sims, axis=1, kind="stable")
    near = np.abs(pose[query][:, None] - pose[bank][order]) <= tolerance
    return {k: near[:, :k].any(1) for k in ks}, subject[query]


def bootstrap(hits: np.ndarray, groups: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile interval of the mean of ``hits``, resampling whole groups (query subjects)."""
    return grouped_bootstrap(hits, groups, n, seed)


def recall(embedder, data: dict, ks=(1, 5), tolerance_mm: float = POSE_TOLERANCE_MM, intervals: bool = False) -> dict:
    """Pose recall@k of ``embedder`` on a ``val_set``: by anatomical depth (within ``tolerance_mm``) where the
    phantom has one (ct-abdomen), and by slice index (``slice_recall@k``, within ``SLICE_TOLERANCE`` slices)."""
    emb = embedder.embed(data["images"], [data["modality"]] * len(data["images"]))
    out = {}
    if data.get("anatomy") is not None:
        hits, groups = pose_hits(emb, data["subject"], data["anatomy"], ks, tolerance_mm)
        out.update({f"recall@{k}": round(float(h.mean()), 4) for k, h in hits.items()})
        if intervals:
            out.update({f"recall@{k}_ci95": bootstrap(h, groups) for k, h in hits.items()})
    slice_hits, groups = pose_hits(emb, data["subject"], data["slice"], ks, SLICE_TOLERANCE)
    out.update({f"slice_recall@{k}": round(float(h.mean()), 4) for k, h in slice_hits.items()})
    return {**out, "queries": int(len(groups)), "query_subjects": int(len(np.unique(groups))),
            "bank": int(len(data["images"]) - len(groups))}


def quality(weights=None, seed: int = BENCHMARK_SEED, subjects: int = 40, size: int = 256, slices: int = 4,
            ks: tuple[int, ...] = (1, 5), tolerance_mm: float = POSE_TOLERANCE_MM, phantom: str = "ct-abdomen") -> dict:
    """Pose recall@k of an embedder on held-out phantom subjects: ``subjects`` made with ``seed`` (``slices`` axial
    slices each, as ``rau data make`` makes them), the first half of the subjects is the bank, the other half the
    queries (so the query's own subject is never in the bank). A hit: a bank image whose anatomical depth (the
    slice's depth with the subject's own z shift and scale undone) lies within ``tolerance_mm`` of the query's,
    among the top k by cosine. 95 % intervals: bootstrap over query subjects. Also the older slice-index figure
    (``slice_recall@k``: |slice - query slice| <= 2, issue 4's definition) and its oracle ceiling, which is low
    because the same anatomy sits ~3 slices apart between subjects (``pose_ceiling``).
    ``weights``: None (the shipped pretrained tiny), a weights folder, a RetrievalConfig, an Embedder or a
    DinoPretrainConfig (its export folder)."""
    if isinstance(weights, Embedder):
        embedder = weights
    elif isinstance(weights, RetrievalConfig):
        embedder = Embedder(weights)
    elif isinstance(weights, DinoPretrainConfig):
        embedder = Embedder(replace(TINY, embedder=str(weights.out_path()), **weights.arch))
    elif weights is None:
        embedder = Embedder(replace(TINY, init="pretrained"))
    else:
        embedder = Embedder(replace(TINY, embedder=str(weights)))
    if subjects < 4:
        raise ConfigError("quality needs at least 4 subjects (half bank, half queries)")
    data = val_set(seed, subjects, size, slices, phantom)
    return {**recall(embedder, data, ks, tolerance_mm, intervals=True),
            "ceiling": pose_ceiling(data, ks, tolerance_mm, by="anatomy"),
            "slice_ceiling": pose_ceiling(data, ks, SLICE_TOLERANCE), "subjects": subjects, "seed": seed,
            "size": size, "slices": slices, "tolerance_mm": tolerance_mm, "phantom": phantom, "embedder": embedder.id}


# -- the model pieces, in-process or inside a Ray Train worker --------------------------------------------------------
class DinoNet(nn.Module):
    """Tiny Dinov2Model + projection head; ``forward`` -> (retrieval embedding, projection)."""

    def __init__(self, model, pooling: str, proj_dim: int):
        super().__init__()
        self.model = model
        self.pooling = pooling
        model.embeddings.mask_token.requires_grad_(False)  # only used with masked inputs: DDP would wait for it
        width = model.config.hidden_size * (2 if pooling == "cls+mean" else 1)
        self.head = nn.Sequential(nn.Linear(width, 4 * model.config.hidden_size), nn.GELU(),
                                  nn.Linear(4 * model.config.hidden_size, proj_dim))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixels).last_hidden_state
        cls, mean = hidden[:, 0], hidden[:, 1:].mean(1)
        if self.pooling == "cls+mean":
            return torch.cat([F.normalize(cls, dim=1), F.normalize(mean, dim=1)], 1)
        return cls if self.pooling == "cls" else mean

    def forward(self, pixels: torch.Tensor):
        emb = self.embed(pixels)
        return emb, self.head(emb)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float,
             negatives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric NT-Xent over 2B views (view i of z1 and view i of z2 are a positive pair). ``negatives`` (B, B)
    bool: which other images count as negatives of each (default: all). Also the share of views whose most similar
    candidate is their pair."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    logits = z @ z.T / temperature
    allowed = torch.ones(n, n, dtype=torch.bool, device=z.device) if negatives is None else negatives.to(z.device)
    allowed = allowed.repeat(2, 2)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    rows = torch.arange(2 * n, device=z.device)
    allowed[rows, target] = True  # the pair itself
    allowed[rows, rows] = False
    logits = logits.masked_fill(~allowed, float("-inf"))
    return F.cross_entropy(logits, target), (logits.argmax(1) == target).float().mean()


def negatives_mask(group: np.ndarray, pose: np.ndarray, neighbour: int, far: int | None = None) -> torch.Tensor:
    """(B, B) bool: j is a negative of i unless both are slices of volumes and either of one volume within
    ``neighbour`` slices, or of different volumes within ``far`` slice indices (None: never a negative: the same
    depth of another subject is what retrieval must find)."""
    g, k = torch.as_tensor(group), torch.as_tensor(pose)
    volume = (g >= 0)[:, None] & (g >= 0)[None, :]
    same = g[:, None] == g[None, :]
    gap = (k[:, None] - k[None, :]).abs()
    other_near = ~same if far is None else ~same & (gap < far)
    return ~(volume & ((same & (gap <= neighbour)) | other_near))


MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def augment(images: np.ndarray, aug: Augment, out_size: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, H, W) -> one augmented view, normalised as BitImageProcessor does, (B, 3, out_size, out_size)."""
    x = torch.from_numpy(images).float().div(255.0)[:, None]
    b = len(x)

    def u(lo, hi, *shape):
        return torch.rand(b, *shape, generator=gen) * (hi - lo) + lo

    angle = torch.deg2rad(u(-aug.rotation_deg, aug.rotation_deg))
    sx, sy = u(1 - aug.zoom, 1 + aug.zoom), u(1 - aug.zoom, 1 + aug.zoom)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos / sx, -sin / sy, u(-aug.shift, aug.shift) * 2], 1),
                         torch.stack([sin / sx, cos / sy, u(-aug.shift, aug.shift) * 2], 1)], 1)
    grid = F.affine_grid(theta, (b, 1, out_size, out_size), align_corners=False)
    if aug.elastic > 0:  # smooth field from 4x4 control points, as subjects differ by a smooth deformation
        field_ = torch.randn(b, 2, 4, 4, generator=gen) * aug.elastic
        grid = grid + F.interpolate(field_, size=(out_size, out_size), mode="bicubic",
                                    align_corners=True).permute(0, 2, 3, 1)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # intensity: gamma, contrast around the mean, brightness
    x = x.clamp(0, 1) ** torch.exp(u(-aug.gamma, aug.gamma)).view(b, 1, 1, 1)
    mean = x.mean((2, 3), keepdim=True)
    x = (x - mean) * u(1 - aug.contrast, 1 + aug.contrast).view(b, 1, 1, 1) + mean
    x = x + u(-aug.brightness, aug.brightness).view(b, 1, 1, 1)
    if aug.blur_p > 0:
        blur = torch.rand(b, generator=gen) < aug.blur_p
        if blur.any():
            x[blur] = _blur(x[blur], u(0.3, 1.2)[blur])
    if aug.noise > 0:
        x = x + torch.randn(x.shape, generator=gen) * u(0, aug.noise).view(b, 1, 1, 1)
    x = x.clamp(0, 1).expand(-1, 3, -1, -1)
    return (x - MEAN) / STD


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    r = 3
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (n, 7)
    n = len(x)
    y = F.conv2d(F.pad(x.transpose(0, 1), (r, r, 0, 0), mode="replicate"), k.view(n, 1, 1, -1), groups=n)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(n, 1, -1, 1), groups=n)
    return y.transpose(0, 1)


class DinoTrainer:
    """The tiny DINOv2 + head, AdamW and the InfoNCE step: ``train_step(images, gen)``, ``fixed_loss(images)``,
    ``embedder()`` (the model as retrieval uses it), ``weights()`` / ``load_weights``."""

    def __init__(self, cfg: DinoPretrainConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.rcfg = cfg.retrieval_config()
        self.net = DinoNet(tiny_model(self.rcfg), self.rcfg.pooling, cfg.proj_dim).to(self.device)
        torch.manual_seed(cfg.seed + 1)  # the head: the same on every worker
        self.net.head.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
        self.processor = tiny_processor(self.rcfg)
        self.call = self.net  # replaced by its DDP wrapper
        params = [p for p in self.net.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        rest = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

    def loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch``: "anchor" and "positive" uint8 images (B, H, W), "group" and "slice" (B,) of the anchors."""
        size = self.rcfg.image_size
        v1 = augment(batch["anchor"], self.cfg.augment, size, gen).to(self.device)
        v2 = augment(batch["positive"], self.cfg.augment, size, gen).to(self.device)
        _, z = self.call(torch.cat([v1, v2]))
        mask = negatives_mask(batch["group"], batch["slice"], self.cfg.neighbour,
                              self.cfg.far if self.cfg.cross_volume > 0 else None)
        return info_nce(z[:len(v1)], z[len(v1):], self.cfg.temperature, mask)

    def train_step(self, batch: dict, gen: torch.Generator, step: int = 0) -> dict[str, float]:
        self.net.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        loss, acc = self.loss(batch, gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return {"loss": float(loss.detach()), "pair_accuracy": float(acc), "lr": self.lr_at(step)}

    @torch.no_grad()
    def fixed_loss(self, batch: dict, seed: int = 0) -> float:
        """The InfoNCE loss on ``batch`` with fixed augmentations and no step (before/after comparisons)."""
        self.net.eval()
        return float(self.loss(batch, torch.Generator().manual_seed(seed))[0])

    def embedder(self):
        self.net.eval()
        return Embedder.from_model(self.net.model, self.processor, self.rcfg, str(self.device))

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.net.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise DataError(f"checkpoint does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def sample_batch(data: dict, cfg: DinoPretrainConfig, rng: np.random.Generator) -> dict:
    """One batch of anchors and positives from rendered ``data`` (``render_items``): ``phantom_fraction`` of it
    slices of volumes, ``group_slices`` distinct slices a volume, each paired with a slice of the same volume at
    most ``neighbour`` slices away; the rest scenes / 2D images, each paired with itself (two augmentations)."""
    group, pose = data["group"], data["slice"]
    vol, flat = np.flatnonzero(group >= 0), np.flatnonzero(group < 0)
    n_vol = len(vol) and (cfg.batch_size if not len(flat) else int(round(cfg.batch_size * cfg.phantom_fraction)))
    anchors, positives = [], []
    if n_vol:
        volumes = np.unique(group[vol])
        picked = rng.permutation(volumes)[:max(1, math.ceil(n_vol / cfg.group_slices))]
        for v in picked:
            members = vol[group[vol] == v]
            a = rng.choice(members, size=min(len(members), cfg.group_slices, n_vol - len(anchors)), replace=False)
            for i in a:
                near = members[np.abs(pose[members] - pose[i]) <= cfg.neighbour]
                if len(volumes) > 1 and rng.random() < cfg.cross_volume:  # the same scan position, another volume
                    other = vol[group[vol] == rng.choice(volumes[volumes != v])]
                    across = other[np.abs(pose[other] - pose[i]) <= cfg.neighbour]
                    near = across if len(across) else near
                anchors.append(i)
                positives.append(rng.choice(near))
    n_flat = min(len(flat), cfg.batch_size - len(anchors))
    if n_flat > 0:
        f = rng.choice(flat, size=n_flat, replace=False)
        anchors += list(f)
        positives += list(f)
    a, p = np.asarray(anchors), np.asarray(positives)
    return {"anchor": data["images"][a], "positive": data["images"][p], "group": group[a], "slice": pose[a]}


# -- Ray Train --------------------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker; ``config``: "cfg" (DinoPretrainConfig as a dict)."""
    cfg = from_dict(DinoPretrainConfig, config["cfg"], "pretrain-dino config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scale.use_gpu else torch.device("cpu")
    run.prepare_worker(cfg.scale)
    trainer = DinoTrainer(cfg, device)
    resumed = run.resume()
    if resumed.weights is not None:
        trainer.load_weights(resumed.weights)
    step, history = resumed.step, resumed.history
    trainer.call = ray.train.torch.prepare_model(trainer.net, move_to_device=False)
    items = [dict(row) for row in ray.train.get_dataset_shard("train").iter_rows()]
    if not items:
        raise DataError("this worker's data shard is empty: fewer training items than workers")
    t0 = time.perf_counter()
    data = render_items(items, cfg)
    render_s = time.perf_counter() - t0
    val = val_set(cfg.val_seed, cfg.val_subjects, cfg.data.size)

    def validate() -> dict:
        r = recall(trainer.embedder(), val)
        return {f"val_{k}": v for k, v in r.items() if "recall@" in k}

    def log(metrics: dict, save: bool) -> None:
        row = {"step": step, "resumed_from": resumed.step, **metrics}
        history.append(row)
        run.report(row, weights=trainer.weights() if save else None, step=step, history=history,
                   config=asdict(cfg))

    if step == 0:  # the untrained start, and how many images the workers rendered
        counts = run.all_sum({"images": len(data["images"]), "phantom_images": int((data["group"] >= 0).sum())}, device)
        log({**validate(), **{k: int(v) for k, v in counts.items()}, "render_s": round(render_s, 1)}, save=False)
    sums: dict[str, float] = {}
    count, t0 = 0, time.perf_counter()
    while step < cfg.max_steps:
        rng = np.random.default_rng([cfg.seed, rank, step])  # a resumed run draws what it would have drawn
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        batch = sample_batch(data, cfg, rng)
        metrics = trainer.train_step(batch, gen, step)
        step += 1
        count += 1
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        last = step >= cfg.max_steps
        evaluate = (cfg.eval_every and step % cfg.eval_every == 0) or last
        save = step % cfg.checkpoint_every == 0 or last
        if step % cfg.log_every == 0 or evaluate or save:
            row = {k: v / count for k, v in sums.items()}
            row["images_per_s"] = count * len(batch["anchor"]) * world / (time.perf_counter() - t0)
            if evaluate:
                row.update(validate())
            log(row, save=save)
            sums, count, t0 = {}, 0, time.perf_counter()


def export_weights(weights: dict[str, torch.Tensor], cfg: DinoPretrainConfig, folder: Path) -> None:
    """The checkpoint's model weights as the tiny profile loads them: a save_pretrained Dinov2Model, its processor
    and ``rau_tiny_spec.json`` (the architecture)."""
    rcfg = cfg.retrieval_config()
    model = tiny_model(rcfg)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    pretrained.save_tiny_weights(model, folder)
    tiny_processor(rcfg).save_pretrained(folder)
    spec = tiny_spec(replace(rcfg, init="pretrained"))  # the architecture, no seed
    (folder / pretrained.SPEC_FILE).write_text(json.dumps(spec, sort_keys=True, indent=1))


def run_pretrain_dino(cfg: DinoPretrainConfig):
    """Render nothing on the driver (items are scene / subject ids), train on Ray Train, export ``cfg.out``;
    returns Ray Train's Result (last metrics with the validation recall, checkpoint)."""
    cfg.validate()
    started = time.time()
    items = training_items(cfg)
    if len(items) < cfg.scale.num_workers:
        raise ConfigError(f"{len(items)} training items (scenes + phantom subjects) cannot feed "
                          f"{cfg.scale.num_workers} workers")
    result = run.fit(train_loop_per_worker, {"cfg": asdict(cfg)}, cfg.scale, cfg.name,
                     datasets={"train": run.materialized(items, cfg.seed)}, job=cfg)
    if result.error is None and result.checkpoint:
        weights, state = read_weights_and_state(storage.uri_of(result.checkpoint.filesystem, result.checkpoint.path,
                                                            cfg.scale.storage_path))
        facts = pretrain.job_facts(cfg, result, OBJECTIVE, started)
        facts.update({"steps": state["step"], "seed": cfg.seed, "data_seed": cfg.data.seed,
                      "training_images": {"scenes": cfg.data.scenes,
                                          "phantom_subjects": {k: len(v) for k, v in
                                                               pretrain.phantom_train_subjects(cfg.data).items()},
                                          "slices_per_subject": cfg.slices_per_subject}})
        pretrain.export(cfg.out_path(), lambda tmp: export_weights(weights, cfg, tmp), facts)
    return result
