"""What every segmenter-training mode shares: the job config, the items, the sample cache and the trainer's loop.

``SegJobConfig`` (every mode's fields), ``seg_items`` / ``job_items`` (one plain-dict item per sample or pair and
structure: Ray Data rows), ``Samples`` (manifest rows read once per process, as SAM2 and the policy see them),
``SegTrainer`` (``train_step``, ``fixed_losses``, batching; a mode supplies ``losses``, ``evaluate``, ``weights``).
The modes: ``seg_rau`` (RAU's fusion segmenter, and SAM2-Memory-Ref-SFT), ``seg_cbam`` (SpinalSAM-R1's CBAM-LoRA
SAM2); the Ray Train job is ``seg``.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rau_ray.data.manifest import Manifests, read_manifest
from rau_ray.data.tasks import label_boxes, make_pairs
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.precision import sam2_autocast
from rau_ray.models.profiles import ModelConfig
from rau_ray.models.prompts import to_pil
from rau_ray.models.retrieval import reference_picker
from rau_ray.scoring.metrics import dice
from rau_ray.train.run import TrainJobConfig

MODES = ("rau", "cbam-lora", "memory-ref")
FIRST_PROMPTS = ("box", "point", "mixed")
ANSWERS = ("canonical", "generated")


@dataclass(frozen=True, kw_only=True)
class SegJobConfig(TrainJobConfig):
    manifest: str  # manifest.jsonl: `train_split` rows train, `val_split` rows give the validation Dice
    name: str = "seg"  # run name: the folder under scale.storage_path; the same name again resumes
    mode: str = "rau"  # "rau": <Seg> -> projector -> memory fusion -> SAM2 decoder; "cbam-lora": prompted SAM2;
    #                    "memory-ref": SAM2-Memory-Ref-SFT, the rau pairs through SAM2's memory alone (no policy)
    model: ModelConfig = field(default_factory=ModelConfig)  # YAML: a profile + overrides (models.profiles)
    train_split: str = "train"
    val_split: str = "val"  # other subjects than training: the Dice there is what generalises
    eval_items: int = 256  # validation items at most (a seeded sample, split over the ranks); one forward each
    batch_size: int = 4  # samples per worker and step (the global batch is num_workers times this)
    lr: float = 1e-3  # AdamW; right for a tiny random SAM2 and a few hundred steps, fine-tuning a real one wants 1e-4
    grad_clip: float = 1.0  # max gradient norm: a fresh projector can spike the loss in its first steps
    focal_weight: float = 1.0  # focal : Dice is 1 : 1 in SpinalSAM-R1; SAM itself uses 20 : 1
    dice_weight: float = 1.0
    first_prompt: str = "box"  # cbam-lora: the first round's prompt from the true mask: box | point | mixed
    #                            (either, 50/50 per sample, as SAM2 trains; validation then uses the box)
    interactive_rounds: int = 2  # cbam-lora: corrective rounds after the first prompt (0: the prompt alone)
    points_per_round: int = 1  # cbam-lora: corrective clicks added per round (SAM2 adds one)
    train_mask_decoder: bool = True  # cbam-lora: fine-tune SAM2's mask decoder with CBAM + LoRA, as SpinalSAM-R1
    #                                  does (a random tiny decoder must learn); false keeps the decoder exact
    train_policy_lora: bool = False  # rau: also train the policy's LoRA (+<Seg> rows) through the mask loss
    lm_weight: float = 1.0  # rau with train_policy_lora: weight of the answer LM loss that keeps the policy talking
    max_steps: int = 200  # optimizer steps in all (the shard is cycled through as often as needed)
    log_every: int = 10  # steps between metric reports (each is a sync of all workers)
    eval_every: int = 50  # steps between validations; 0: only at the start and the end
    checkpoint_every: int = 100  # steps between checkpoints (the last step always saves)
    seed: int = 0  # data order, click sampling and the init of new layers (the same on every worker)
    structures: tuple[str, ...] = ()  # train and validate on these structures only (SpinalSAM-R1: vertebrae); all
    policy_checkpoint: str | None = None  # rau: the sft / grpo checkpoint whose <Seg> states the segmenter learns
    #                                       (the policy it will serve with); None: the profile's base policy
    answers: str = "canonical"  # rau: which answer's <Seg> state: "canonical" (teacher-forced) or "generated" (the
    #                             policy's own greedy answer, as at inference; the canonical one where it is malformed)
    policy_sha256: str = ""  # set by run_seg: the digest of policy_checkpoint's weights (what eval and serve check)

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.first_prompt not in FIRST_PROMPTS:
            raise ConfigError(f"first_prompt must be one of {', '.join(FIRST_PROMPTS)}, got {self.first_prompt!r}")
        if min(self.batch_size, self.max_steps, self.points_per_round, self.eval_items) < 1:
            raise ConfigError("batch_size, max_steps, points_per_round and eval_items must be at least 1")
        if self.interactive_rounds < 0 or self.eval_every < 0:
            raise ConfigError("interactive_rounds and eval_every must be >= 0")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"lr and grad_clip must be > 0, got {self.lr} and {self.grad_clip}")
        if self.focal_weight < 0 or self.dice_weight < 0 or self.focal_weight + self.dice_weight == 0:
            raise ConfigError(f"focal_weight and dice_weight must be >= 0 and not both 0, got "
                              f"{self.focal_weight} and {self.dice_weight}")
        if self.train_policy_lora and self.mode != "rau":
            raise ConfigError(f"train_policy_lora applies to mode 'rau' only ({self.mode} has no policy)")
        if self.answers not in ANSWERS:
            raise ConfigError(f"answers must be one of {', '.join(ANSWERS)}, got {self.answers!r}")
        if self.mode != "rau" and (self.policy_checkpoint or self.answers != "canonical"):
            raise ConfigError(f"policy_checkpoint and answers apply to mode 'rau' only ({self.mode} has no policy)")
        if self.answers == "generated" and self.train_policy_lora:
            raise ConfigError("answers: generated needs a frozen policy (its answers are generated once and "
                              "cached); with train_policy_lora the canonical answer is trained")

    def model_config(self):
        """The ModelConfig this job trains (profile + the ``model`` overrides); cbam-lora's decoder as configured."""
        return replace(self.model, cbam_lora=replace(self.model.cbam_lora, train_mask_decoder=self.train_mask_decoder))


# -- data ------------------------------------------------------------------------------------------------------------
def seg_items(manifest, split: str, mode: str, seed: int = 0, reference_split: str = "train",
              retrieval=None) -> list[dict]:
    """Training/validation items as plain dicts (Ray Data rows), one per (sample, structure).

    ``rau``: ``make_pairs`` reference-target pairs (segment task), one item per structure annotated in both, with
    keys manifest, reference, target, structure (references retrieved by ``retrieval``'s embedder when given, as at
    inference). ``cbam-lora``: every row of ``split`` and each of its structures
    (reference None)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    m = read_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest
    path = str(m.path.resolve())
    rows = {r.id: r for r in m.rows}

    def present(row_id):
        return set(label_boxes(m.load(rows[row_id])[1], rows[row_id].label_names))

    items = []
    if mode in ("rau", "memory-ref"):
        seen = set()
        for pair in make_pairs(m, split=split, reference_split=reference_split, tasks=("segment",), seed=seed,
                               retrieve=reference_picker(retrieval) if retrieval is not None else None):
            if (pair["reference"], pair["target"]) in seen:
                continue
            seen.add((pair["reference"], pair["target"]))
            for s in sorted(present(pair["reference"]) & present(pair["target"])):
                items.append({"manifest": path, "reference": pair["reference"], "target": pair["target"],
                              "structure": s})
    else:
        for row in m.select(split=split):
            items += [{"manifest": path, "reference": None, "target": row.id, "structure": s}
                      for s in sorted(present(row.id))]
    return items


def job_items(cfg: SegJobConfig, manifest, split: str, seed: int) -> list[dict]:
    """``seg_items`` of the job's mode, kept to ``cfg.structures`` when it names any."""
    items = seg_items(manifest, split, cfg.mode, seed=seed, retrieval=cfg.model_config().retrieval)
    return [it for it in items if it["structure"] in cfg.structures] if cfg.structures else items


class Samples:
    """Reads manifest rows once per process: (row, (H, W, 3) uint8 image as SAM2 and the policy see it, label)."""

    def __init__(self, capacity: int = 512):
        self._manifests = Manifests()
        self._cache: OrderedDict = OrderedDict()
        self.capacity = capacity

    def get(self, manifest_path: str, row_id: str):
        key = (manifest_path, row_id)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        row, image, label = self._manifests.sample(manifest_path, row_id)
        value = np.asarray(to_pil(image, row.modality))
        self._cache[key] = (row, value, label)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return self._cache[key]

    def mask(self, manifest_path: str, row_id: str, structure: str) -> np.ndarray:
        row, _, label = self.get(manifest_path, row_id)
        by_name = {v: k for k, v in row.label_names.items()}
        if structure not in by_name:
            raise DataError(f"{manifest_path} [{row_id}]: no structure {structure!r}")
        return label == by_name[structure]


def resize_masks(masks: list[np.ndarray], size: int, device) -> torch.Tensor:
    """Boolean (H, W) masks of any sizes -> (B, size, size) float 0/1 (nearest, as labels must be)."""
    return torch.cat([F.interpolate(torch.as_tensor(m, dtype=torch.float32, device=device)[None, None],
                                    size=(size, size), mode="nearest")[0] for m in masks])


def dice_at(logits: torch.Tensor, mask: np.ndarray) -> float:
    """Dice of ``logits`` (h, w) brought to the true mask's size (bilinear, as SAM2 postprocesses) against it."""
    up = F.interpolate(logits[None, None].float(), size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    return dice((up > 0).cpu().numpy(), mask)


@contextmanager
def single_mask_output(sam):
    """SAM2's mask decoder without its eval-mode fallback: with ``multimask_output=False`` an evaluating SAM2.1 swaps
    in the best of its three multimask outputs whenever the single mask is unstable (logits near 0). The loss
    trains the single mask only, so early in training the swap picks untrained outputs; this measures the trained
    one."""
    decoder = sam.sam_mask_decoder
    saved = decoder.dynamic_multimask_via_stability
    decoder.dynamic_multimask_via_stability = False
    try:
        yield
    finally:
        decoder.dynamic_multimask_via_stability = saved


# -- trainers: the model pieces of one mode, usable in-process or inside a Ray Train worker -------------------------
class SegTrainer:
    """Common loop pieces: ``train_step(items, rng)``, ``evaluate(items)``, ``weights()`` / ``load_weights``,
    ``distribute(prepare_model)`` for DDP. A mode implements ``losses`` and ``_evaluate``; both run under
    ``sam2_autocast`` (bf16 on CUDA, fp32 on CPU: as the Serve Segmenter runs SAM2)."""

    def __init__(self, cfg: SegJobConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.samples = Samples()
        self.optimizer: torch.optim.Optimizer | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def _make_optimizer(self) -> None:
        params = self.parameters()
        if not params:
            raise ConfigError(f"mode {self.cfg.mode}: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)

    def train_step(self, items: list[dict], rng: np.random.Generator | None = None) -> dict[str, float]:
        self.set_train(True)
        with sam2_autocast(self.device):  # the forward and the losses; backward and the step outside it
            out = self.losses(items, rng)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in out.items()}

    @torch.no_grad()
    def fixed_losses(self, items: list[dict]) -> dict[str, float]:
        """The training losses on ``items`` without a step, with the clicks fixed (the error regions' centres):
        the same number before and after training tells whether the optimizer lowers the loss."""
        self.set_train(True)  # as the optimizer sees it (SAM2's eval mode may swap in a multimask output)
        with sam2_autocast(self.device):
            return {k: float(v) for k, v in self.losses(items, None).items()}

    @torch.no_grad()
    def evaluate(self, items: list[dict]) -> dict[str, float]:
        """Sums of the validation Dice over ``items`` and their count "n" (the mode's ``_evaluate``)."""
        with sam2_autocast(self.device):
            return self._evaluate(items)

    def _evaluate(self, items: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    def _batches(self, items):
        for i in range(0, len(items), self.cfg.batch_size):
            yield items[i:i + self.cfg.batch_size]


def check_keys(weights: dict, expected: dict) -> None:
    if set(weights) != set(expected):
        differ = sorted(set(weights) ^ set(expected))
        raise DataError(f"checkpoint weights do not match this model ({len(differ)} names differ, e.g. "
                        f"{differ[0]!r}); was it saved with another mode or model config?")
