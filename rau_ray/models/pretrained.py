"""Where model weights come from: a Hugging Face id, a local path, or ``tiny`` (built here, offline).

``resolve(name, kind, build_tiny, spec)`` returns a local folder (of an ``s3://`` / ``gs://`` URI: its local copy)
or the hub id to pass to ``from_pretrained`` / the SAM2 builder. For ``tiny`` it builds the component once from its
config with a fixed seed, saves it into ``$RAU_CACHE`` (default ``~/.cache/rau_ray``) under a hash of ``spec``, and
reuses it; the folder is written in a temp folder and renamed, so concurrent Ray workers never see a half-written
model.
Use: ``path = resolve(cfg.model, "policy", build_tiny=_save_tiny_qwen, spec=asdict(cfg))``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

TINY = "tiny"


def save_tiny_weights(model, folder: Path) -> None:
    """``save_pretrained``'s files (config, generation config, model.safetensors) on any rank: inside an initialised
    process group transformers writes weights on global rank 0 only, and a tiny model is built wherever it is
    first needed — a Ray Train worker of any rank, on any node."""
    from safetensors.torch import save_model

    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    save_model(model, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})


def cache_root() -> Path:
    return Path(os.environ.get("RAU_CACHE", Path.home() / ".cache" / "rau_ray"))


def resolve(name: str, kind: str, build_tiny: Callable[[Path], None], spec: dict) -> str:
    """``name`` is "tiny", a local folder/file, an ``s3://`` / ``gs://`` URI (downloaded once per node into the local
    cache), or a hub id; returns what the loader should open."""
    if "://" in name:
        from rau_ray.storage import local_copy

        return str(local_copy(name, kind))
    if name != TINY:
        return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]
    target = cache_root() / f"{kind}-tiny-{digest}"
    if (target / ".complete").exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_tiny(tmp)
        (tmp / "rau_tiny_spec.json").write_text(json.dumps(spec, sort_keys=True, indent=1, default=str))
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is identical (same spec, same seed)
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)
