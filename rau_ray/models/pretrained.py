"""Where model weights come from: a Hugging Face id, a local path, or ``tiny`` (built here, offline).

``resolve(name, kind, build_tiny, spec)`` returns a local folder (of an ``s3://`` / ``gs://`` URI: its local copy)
or the hub id to pass to ``from_pretrained`` / the SAM2 builder. For ``tiny`` it builds the component once from its
config with a fixed seed, saves it into ``$RAU_CACHE`` (default ``~/.cache/rau_ray``) under a hash of ``spec``, and
reuses it; the folder is written in a temp folder and renamed, so concurrent Ray workers never see a half-written
model.
The shipped pretrained tiny weights live in ``weights/tiny/<sam2|dinov2|qwen2_5_vl>`` (``init: pretrained``, each
with its architecture in ``rau_tiny_spec.json`` and a model card); ``init: random`` builds a fresh seeded model.
Use: ``path = resolve(cfg.model, "policy", build_tiny=_save_tiny_qwen, spec=tiny_spec(cfg), init=cfg.init)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import save_model

from rau_ray.errors import ConfigError
from rau_ray.storage import local_copy

TINY = "tiny"
INITS = ("pretrained", "random")  # a tiny component: the shipped pretrained weights, or a seeded random init
SPEC_FILE = "rau_tiny_spec.json"  # the architecture a tiny weights folder holds
SHIPPED = {"sam2": "sam2", "dinov2": "dinov2", "policy": "qwen2_5_vl"}  # kind -> folder under weights/tiny


def weights_root() -> Path:
    """Where the shipped tiny weights live: $RAU_WEIGHTS, else ``weights/tiny`` of this checkout."""
    return Path(os.environ.get("RAU_WEIGHTS", Path(__file__).resolve().parents[2] / "weights" / "tiny"))


def check_init(init: str, where: str) -> None:
    if init not in INITS:
        raise ConfigError(f"{where}.init must be one of {', '.join(INITS)}, not {init!r}")


def shipped(kind: str, spec: dict) -> str:
    """The shipped pretrained tiny ``kind`` (a folder the hub-weights loader opens), after checking that it holds the
    architecture ``spec`` asks for; a clear ConfigError naming the folder otherwise."""
    folder = weights_root() / SHIPPED[kind]
    spec_file = folder / SPEC_FILE
    if not spec_file.is_file():
        raise ConfigError(f"{folder}: no pretrained tiny {kind} weights here (no {SPEC_FILE}); make them with "
                          f"'rau pretrain', or set init: random for a random-initialised model")
    try:
        have = json.loads(spec_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{spec_file}: unreadable ({e})") from None
    want = json.loads(json.dumps(spec, sort_keys=True, default=str))
    if have != want:
        keys = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        raise ConfigError(f"{folder} holds a tiny {kind} of another architecture (differs in "
                          f"{', '.join(keys)}: shipped {[have.get(k) for k in keys]}, asked "
                          f"{[want.get(k) for k in keys]}); set init: random for this config, or pretrain it")
    return str(folder)


def save_tiny_weights(model, folder: Path) -> None:
    """``save_pretrained``'s files (config, generation config, model.safetensors) on any rank: inside an initialised
    process group transformers writes weights on global rank 0 only, and a tiny model is built wherever it is
    first needed — a Ray Train worker of any rank, on any node."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    save_model(model, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def cache_root() -> Path:
    return Path(os.environ.get("RAU_CACHE", Path.home() / ".cache" / "rau_ray"))


def resolve(name: str, kind: str, build_tiny: Callable[[Path], None], spec: dict, init: str = "random") -> str:
    """``name`` is "tiny", a local folder/file, an ``s3://`` / ``gs://`` URI (downloaded once per node into the local
    cache), or a hub id; returns what the loader should open. For "tiny", ``init`` picks the shipped pretrained
    weights (``spec``: the architecture they must have) or a random init built once into the cache."""
    if "://" in name:
        return str(local_copy(name, kind))
    if name != TINY:
        return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    if init == "pretrained":
        return shipped(kind, spec)
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    target = cache_root() / f"{kind}-tiny-{digest}"
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_tiny(tmp)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is identical (same spec, same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
