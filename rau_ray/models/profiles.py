"""Model profiles: one typed config for the whole RAU model, two named instances, ``tiny`` and ``paper``.

``tiny`` runs everything on 2 CPU cores from configs (random weights, built offline); ``paper`` names the real
checkpoints (Qwen2.5-VL-7B-Instruct, DINOv2-base, SAM2.1 hiera-large). Both go through the same loading code.
A YAML file may start from a profile and override fields: ``{profile: tiny, policy: {lora_rank: 4}}``.
Use: ``cfg = get_profile("tiny")`` or ``load_model_config("jobs/configs/model-tiny.yaml")``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rau_ray.config import from_dict
from rau_ray.errors import ConfigError
from rau_ray.models import cbam_lora, fusion, policy, retrieval, sam2_builder


@dataclass(frozen=True)
class ModelConfig:
    profile: str = "tiny"
    retrieval: retrieval.RetrievalConfig = field(default_factory=lambda: retrieval.TINY)
    policy: policy.PolicyConfig = field(default_factory=lambda: policy.TINY)
    sam2: sam2_builder.Sam2Config = field(default_factory=lambda: sam2_builder.TINY)
    fusion: fusion.FusionConfig = field(
        default_factory=lambda: fusion.FusionConfig(llm_hidden_size=policy.TINY.hidden_size))
    cbam_lora: cbam_lora.CBAMLoRAConfig = field(default_factory=cbam_lora.CBAMLoRAConfig)
    max_new_tokens: int = 96  # a think + answer completion; longer ones are runaway generation
    embedding_cache: int = 32  # SAM2 image embeddings kept per process (keyed by image hash)

    @classmethod
    def from_mapping(cls, data: dict | None, where: str = "model") -> ModelConfig:
        """A job config's ``model:`` section (``config.from_dict`` reads it so): ``model_config_from``."""
        return model_config_from(data, where)

    def validate(self) -> None:
        for part in (self.retrieval, self.policy, self.sam2, self.fusion):
            part.validate()
        if self.policy.model == "tiny" and self.fusion.llm_hidden_size != self.policy.hidden_size:
            raise ConfigError(f"fusion.llm_hidden_size ({self.fusion.llm_hidden_size}) must equal the policy's "
                              f"hidden size ({self.policy.hidden_size})")


PROFILES = {
    "tiny": ModelConfig(),
    "paper": ModelConfig(profile="paper", retrieval=retrieval.PAPER, policy=policy.PAPER, sam2=sam2_builder.PAPER,
                         fusion=fusion.FusionConfig(llm_hidden_size=3584, projector_dim=256, num_heads=8),
                         max_new_tokens=256, embedding_cache=256),
}


def get_profile(name: str) -> ModelConfig:
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def model_config_from(data: dict | None, where: str = "model") -> ModelConfig:
    """``profile`` picks the base, every other key overrides that base's fields (nested per component).

    Job configs carry this as their ``model:`` section: ``{profile: tiny, policy: {lora_rank: 32}}``."""
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    data = dict(data or {})
    base = asdict(get_profile(data.get("profile", "tiny")))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    cfg = from_dict(ModelConfig, base, where)
    cfg.validate()
    return cfg


def load_model_config(path) -> ModelConfig:
    """A YAML file holding a ``model_config_from`` mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return model_config_from(yaml.safe_load(path.read_text()), str(path))
