"""Build SAM2 with the sam2 package: one builder for the tiny and the paper profile.

``tiny`` shrinks SAM2.1 hiera-tiny through Hydra overrides (192 px images, 16-channel Hiera, 64-channel neck and
decoder, 32-channel memory, one memory-attention layer: ~1.3M parameters, SAM2's real code). ``init: pretrained``
(the default) loads the weights this project pretrained and ships (``weights/tiny/sam2/model.safetensors``, made by
``rau pretrain sam2``; a safetensors state dict loaded into ``build_sam2``'s model, as strictly as sam2 loads its
``.pt``); ``init: random`` random-initialises it once with a fixed seed, saves ``{"model": state_dict}`` into the
model cache and loads it back through ``sam2.build_sam.build_sam2`` — the path the paper profile takes with the
SAM2.1 hiera-large checkpoint (sam2 loads with ``weights_only=True``).
The image embedding is computed once per image (``embed_image``) and reused by every prompt (``SAM2ImagePredictor``).
Use: ``model = build_sam2_model(TINY)``; ``emb = embed_image(predictor_for(model), image)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from sam2.build_sam import build_sam2, build_sam2_video_predictor
from sam2.sam2_image_predictor import SAM2ImagePredictor

from rau_ray.errors import ConfigError, DataError
from rau_ray.models import pretrained


def _size_overrides(image_size: int) -> list[str]:
    """The input side and the memory attention's RoPE grid, which must be image_size / 16."""
    feat, ma = image_size // 16, "++model.memory_attention.layer"
    return [f"++model.image_size={image_size}", f"{ma}.self_attention.feat_sizes=[{feat},{feat}]",
            f"{ma}.cross_attention.feat_sizes=[{feat},{feat}]"]


def tiny_overrides(image_size: int, embed_dim: int, hidden: int, mem_dim: int) -> list[str]:
    """Hydra overrides that shrink sam2.1_hiera_t.yaml while keeping every module of SAM2."""
    m, ma, me = "++model", "++model.memory_attention", "++model.memory_encoder"
    return _size_overrides(image_size) + [
        f"{m}.image_encoder.trunk.embed_dim={embed_dim}", f"{m}.image_encoder.trunk.num_heads=1",
        f"{m}.image_encoder.trunk.stages=[1,1,2,1]", f"{m}.image_encoder.trunk.global_att_blocks=[3]",
        f"{m}.image_encoder.trunk.window_pos_embed_bkg_spatial_size=[4,4]",
        f"{m}.image_encoder.trunk.window_spec=[8,4,4,4]",
        f"{m}.image_encoder.neck.d_model={hidden}",
        f"{m}.image_encoder.neck.position_encoding.num_pos_feats={hidden}",
        f"{m}.image_encoder.neck.backbone_channel_list=[{embed_dim * 8},{embed_dim * 4},{embed_dim * 2},{embed_dim}]",
        f"{ma}.d_model={hidden}", f"{ma}.num_layers=1", f"{ma}.layer.d_model={hidden}",
        f"{ma}.layer.dim_feedforward={2 * hidden}",
        f"{ma}.layer.self_attention.embedding_dim={hidden}", f"{ma}.layer.cross_attention.embedding_dim={hidden}",
        f"{ma}.layer.cross_attention.kv_in_dim={mem_dim}",
        f"{me}.out_dim={mem_dim}", f"{me}.in_dim={hidden}", f"{me}.position_encoding.num_pos_feats={mem_dim}",
        f"{me}.mask_downsampler.embed_dim={hidden}", f"{me}.fuser.layer.dim={hidden}", f"{me}.fuser.num_layers=1",
        f"{m}.num_maskmem=3",
    ]


@dataclass(frozen=True)
class Sam2Config:
    config: str = "configs/sam2.1/sam2.1_hiera_t.yaml"  # a config of the sam2 package
    checkpoint: str = "tiny"  # "tiny" (built offline) or a SAM2.1 .pt file (a path, or an s3:// / gs:// URI)
    image_size: int = 192  # SAM2's input side; the paper's 1024, tiny 192 (feature map 12x12, mask logits 48x48)
    # tiny shrink, used only when checkpoint == "tiny"
    embed_dim: int = 16  # Hiera stage-1 channels (x2 per stage)
    hidden_dim: int = 64  # neck / prompt encoder / mask decoder / memory attention width
    mem_dim: int = 32  # memory encoder output: the width of reference memory slots
    overrides: tuple[str, ...] = ()  # extra Hydra overrides, applied last (experiments without code changes)
    device: str = "cpu"  # not part of the tiny cache key: one checkpoint serves CPU and GPU
    seed: int = 0  # the tiny random init; part of the cache key, so every process gets identical weights
    # tiny only: "pretrained" loads weights/tiny/sam2 (made by `rau pretrain sam2`), "random" a seeded fresh model
    init: str = "pretrained"

    def validate(self) -> None:
        if self.image_size % 16:
            raise ConfigError(f"sam2.image_size must be a multiple of 16, got {self.image_size}")
        pretrained.check_init(self.init, "sam2")

    def hydra_overrides(self) -> list[str]:
        base = (tiny_overrides(self.image_size, self.embed_dim, self.hidden_dim, self.mem_dim)
                if self.checkpoint == pretrained.TINY else _size_overrides(self.image_size))
        return base + list(self.overrides)


TINY = Sam2Config()
PAPER = Sam2Config(config="configs/sam2.1/sam2.1_hiera_l.yaml", checkpoint="checkpoints/sam2.1_hiera_large.pt",
                   image_size=1024, device="cuda")


def tiny_spec(cfg: Sam2Config) -> dict:
    """The architecture of a tiny SAM2: what shipped weights must match (the random init adds its seed)."""
    return {"config": cfg.config, "image_size": cfg.image_size, "embed_dim": cfg.embed_dim,
            "hidden_dim": cfg.hidden_dim, "mem_dim": cfg.mem_dim, "overrides": list(cfg.overrides)}


def checkpoint_path(cfg: Sam2Config) -> str:
    """The weights file to load: the shipped tiny ``model.safetensors``, the cached random tiny checkpoint (built on
    first use), or the configured file (a release ``.pt`` or a ``.safetensors`` state dict)."""

    def save_tiny(folder):
        with torch.random.fork_rng():  # a fixed seed without touching the caller's random stream
            torch.manual_seed(cfg.seed)
            model = build_sam2(cfg.config, None, device="cpu", hydra_overrides_extra=cfg.hydra_overrides())
        torch.save({"model": model.state_dict()}, folder / "sam2_tiny.pt")  # the layout of SAM2's release .pt

    if cfg.checkpoint == pretrained.TINY and cfg.init == "pretrained":
        return f"{pretrained.resolve(cfg.checkpoint, 'sam2', save_tiny, tiny_spec(cfg), cfg.init)}/model.safetensors"
    spec = {k: v for k, v in asdict(cfg).items() if k not in ("device", "init")}
    path = pretrained.resolve(cfg.checkpoint, "sam2", save_tiny, spec)
    if cfg.checkpoint == pretrained.TINY:
        return f"{path}/sam2_tiny.pt"
    if not Path(path).is_file():
        raise ConfigError(f"sam2.checkpoint {cfg.checkpoint!r} is not a file; download a SAM2.1 release .pt "
                          "(e.g. sam2.1_hiera_large.pt) and point sam2.checkpoint at it")
    return path


def load_safetensors_weights(model, path: str) -> None:
    """Load a safetensors state dict into a built SAM2 as strictly as sam2's own ``_load_checkpoint`` loads a
    ``.pt``; a missing, truncated or mismatched file is a DataError naming it."""
    if not Path(path).is_file():
        raise DataError(f"{path}: SAM2 weights file not found")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise DataError(f"{path}: does not fit this SAM2 config (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                        f"wrong shapes {sorted(wrong)[:3]})")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def _build(builder, cfg: Sam2Config):
    cfg.validate()
    path = checkpoint_path(cfg)
    if path.endswith(".safetensors"):  # built empty, then loaded: sam2's builder only reads pickled .pt files
        model = builder(cfg.config, None, device="cpu", hydra_overrides_extra=cfg.hydra_overrides())
        load_safetensors_weights(model, path)
        return model.to(cfg.device)
    return builder(cfg.config, path, device=cfg.device, hydra_overrides_extra=cfg.hydra_overrides())


def build_sam2_model(cfg: Sam2Config = TINY):
    """A SAM2Base (image + memory model) through sam2's own builder."""
    return _build(build_sam2, cfg)


def build_video_predictor(cfg: Sam2Config = TINY):
    """A SAM2VideoPredictor: SAM2's memory across frames (the SAM2-Memory-Ref baseline, 3D propagation)."""
    return _build(build_sam2_video_predictor, cfg)


@dataclass
class ImageEmbedding:
    """What SAM2ImagePredictor.set_image computes once per image: features for every later prompt."""

    features: dict  # SAM2ImagePredictor._features: {"image_embed": (1,C,S/16,S/16), "high_res_feats": [S/4, S/8]}
    orig_hw: tuple[int, int]  # the image's (H, W): masks are upsampled back to it


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H,W) or (H,W,3) uint8 -> (H,W,3) uint8, the input SAM2's transforms expect."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ValueError(f"SAM2 takes uint8 images (window CT first), got {arr.dtype}")
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"SAM2 takes (H, W) or (H, W, 3) images, got shape {arr.shape}")
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def predictor_for(model):
    """SAM2ImagePredictor for any image size (the predictor keeps the set_image / predict split)."""
    predictor = SAM2ImagePredictor(model)
    size = model.image_size  # sam2 1.1.0 hard-codes the 1024-px feature sizes; derive them from the model
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return predictor


def embed_image(model_or_predictor, image: np.ndarray) -> ImageEmbedding:
    """Run the image encoder once (SAM2ImagePredictor.set_image) on an (H,W) or (H,W,3) uint8 image."""
    predictor = (model_or_predictor if isinstance(model_or_predictor, SAM2ImagePredictor)
                 else predictor_for(model_or_predictor))
    predictor.set_image(as_rgb_uint8(image))
    return ImageEmbedding(features=predictor._features, orig_hw=predictor._orig_hw[0])


def predict_with_prompts(predictor, embedding: ImageEmbedding, points=None, labels=None, box=None,
                         multimask: bool = False):
    """A point/box prompt on a cached embedding: no image-encoder call. Returns (masks, scores, low-res logits)."""
    predictor._features, predictor._orig_hw, predictor._is_image_set = embedding.features, [embedding.orig_hw], True
    return predictor.predict(point_coords=points, point_labels=labels, box=box, multimask_output=multimask)
