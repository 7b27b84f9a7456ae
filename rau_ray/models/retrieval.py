"""Reference retrieval: a DINOv2 embedder and a faiss ``ReferenceBank`` over a manifest.

A bank folder holds ``index.faiss``, ``metadata.jsonl`` (one manifest row per entry + its embedding id and the
absolute manifest path, so the reference image and mask can be loaded) and ``bank.json`` (the embedder's id and
dimension, the index type): a bank built with one embedder is never searched with another. Search filters by
modality, never returns the query's own subject, and answers "no suitable reference" below a similarity threshold
instead of returning a bad match. Exact (Flat) indexes move to the GPU when faiss-gpu and a GPU are present.
Use: ``rau index build --manifest data/ct/manifest.jsonl --out banks/ct``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from rau_ray.atomic import atomic_write_text
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import ConfigError, DataError
from rau_ray.models import pretrained, prompts

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
POOLINGS = ("cls", "mean", "cls+mean")


@dataclass(frozen=True)
class RetrievalConfig:
    embedder: str = "tiny"  # "tiny" (built offline), a Hugging Face id (facebook/dinov2-base) or a local folder
    image_size: int = 112  # tiny: 8x8 patches of 14 px; the paper profile's processor decides its own (224)
    pooling: str = "cls+mean"  # CLS carries global appearance, mean-pooled patches the layout; DINOv2's probe uses both
    index: str = "auto"  # auto: exact Flat below `exact_below` entries, HNSW above (no training, incremental add)
    exact_below: int = 20_000  # a brute-force inner product over 20k x 768 floats is still < 10 ms
    min_similarity: float = 0.2  # cosine; below it search returns "no suitable reference"
    batch_size: int = 16
    # tiny architecture, used only when embedder == "tiny"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    seed: int = 0

    def validate(self) -> None:
        if self.index not in INDEX_TYPES:
            raise ConfigError(f"retrieval.index must be one of {INDEX_TYPES}, not {self.index!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"retrieval.pooling must be one of {POOLINGS}, not {self.pooling!r}")


TINY = RetrievalConfig()
PAPER = RetrievalConfig(embedder="facebook/dinov2-base", image_size=224, batch_size=64)


def embedder_id(cfg: RetrievalConfig, dim: int) -> str:
    """What a bank records about its embedder: weights, pooling, dimension (and the seed of a tiny one)."""
    return f"{cfg.embedder}|{cfg.pooling}|{dim}" + (f"|seed{cfg.seed}" if cfg.embedder == pretrained.TINY else "")


def _save_tiny(cfg: RetrievalConfig, folder: Path) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(cfg.seed)
    model = Dinov2Model(Dinov2Config(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                     num_attention_heads=cfg.num_heads, intermediate_size=2 * cfg.hidden_size,
                                     image_size=cfg.image_size, patch_size=14))
    model.save_pretrained(folder)
    BitImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}, do_center_crop=False,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)


class Embedder:
    """DINOv2 image embeddings, L2-normalised float32 (N, dim); built once per process/worker/replica."""

    def __init__(self, cfg: RetrievalConfig = TINY, device: str | None = None):
        from transformers import AutoImageProcessor, AutoModel

        cfg.validate()
        self.cfg = cfg
        spec = {k: v for k, v in asdict(cfg).items() if k in ("image_size", "hidden_size", "num_layers",
                                                                "num_heads", "seed")}
        path = pretrained.resolve(cfg.embedder, "dinov2", lambda folder: _save_tiny(cfg, folder), spec)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModel.from_pretrained(path).to(self.device).eval().requires_grad_(False)  # frozen
        self.processor = AutoImageProcessor.from_pretrained(path)
        width = self.model.config.hidden_size
        self.dim = 2 * width if cfg.pooling == "cls+mean" else width
        self.id = embedder_id(cfg, self.dim)

    @torch.no_grad()
    def embed(self, images: list, modalities: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.cfg.batch_size):
            pil = [prompts.to_pil(im, mod) for im, mod in zip(images[i:i + self.cfg.batch_size],
                                                             modalities[i:i + self.cfg.batch_size])]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            cls, mean = hidden[:, 0], hidden[:, 1:].mean(1)
            pooled = {"cls": cls, "mean": mean}.get(self.cfg.pooling)
            if pooled is None:
                pooled = torch.cat([torch.nn.functional.normalize(cls, dim=1),
                                    torch.nn.functional.normalize(mean, dim=1)], 1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


@dataclass
class Hit:
    row: dict  # the manifest row of the reference (+ "embedding_id", "manifest")
    similarity: float  # cosine similarity to the query


@dataclass
class SearchResult:
    hits: list[Hit] = field(default_factory=list)
    reason: str | None = None  # why there is no hit, e.g. "no suitable reference (best similarity 0.12 < 0.20)"


def _embed_rows(cfg: RetrievalConfig, manifest_path: str, ids: list[str]) -> np.ndarray:
    manifest = read_manifest(manifest_path)
    by_id = {r.id: r for r in manifest.rows}
    rows = [by_id[i] for i in ids]
    return Embedder(cfg).embed([manifest.load(r)[0] for r in rows], [r.modality for r in rows])


def _to_device(index):
    """A faiss GPU index when faiss was built with GPU support (the `gpu` extra) and a GPU is visible, else as is."""
    import faiss

    if hasattr(faiss, "StandardGpuResources") and torch.cuda.is_available() and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


def _to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__ \
        else index


def _new_index(kind: str, dim: int, expected: int, exact_below: int):
    import faiss

    if kind == "auto":
        kind = "flat" if expected < exact_below else "hnsw"
    if kind == "flat":
        return _to_device(faiss.IndexFlatIP(dim)), kind
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
        return index, kind
    nlist = max(1, int(4 * math.sqrt(max(expected, 1))))
    return faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT), kind


class ReferenceBank:
    def __init__(self, index, rows: list[dict], info: dict):
        self.index, self.rows, self.info = index, rows, info

    def __len__(self) -> int:
        return len(self.rows)

    @classmethod
    def empty(cls, embedder_id: str, dim: int, index: str = "flat", expected: int = 0,
              exact_below: int = TINY.exact_below) -> "ReferenceBank":
        idx, kind = _new_index(index, dim, expected, exact_below)
        return cls(idx, [], {"embedder": embedder_id, "dim": dim, "index": kind, "count": 0, "metric": "cosine"})

    @classmethod
    def build(cls, manifest_path: str | Path, cfg: RetrievalConfig = TINY, split: str | None = "train",
              backend: str = "ray", progress: bool = True) -> "ReferenceBank":
        """Embed the manifest's rows of ``split`` (all rows if None), on Ray tasks or in-process."""
        from tqdm import tqdm

        manifest = read_manifest(manifest_path)
        rows = [r for r in manifest.rows if split is None or r.split == split]
        if not rows:
            raise DataError(f"{manifest.path}: no rows with split {split!r} to build a reference bank from")
        ids = [r.id for r in rows]
        path = str(manifest.path.resolve())
        if backend == "local":
            embeddings = _embed_rows(cfg, path, ids)
        else:
            from rau_ray import ray_session

            ray = ray_session.connect()
            chunk = max(cfg.batch_size, math.ceil(len(ids) / (2 * ray_session.cluster_cpus())))
            task = ray.remote(num_cpus=1)(_embed_rows)
            refs = [task.remote(cfg, path, ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
            with tqdm(total=len(ids), unit="image", desc="embedding", disable=not progress) as bar:
                for ref in refs:  # in submission order: row i keeps embedding i
                    bar.update(len(ray.get(ref)))
            embeddings = np.concatenate(ray.get(refs))
        width = embeddings.shape[1]
        bank = cls.empty(embedder_id(cfg, width), width, cfg.index, expected=len(rows), exact_below=cfg.exact_below)
        bank.add([{**asdict(r), "manifest": path} for r in rows], embeddings)
        return bank

    def add(self, rows: list[dict], embeddings: np.ndarray) -> None:
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(rows), self.info["dim"]):
            raise ValueError(f"expected embeddings of shape ({len(rows)}, {self.info['dim']}), got {embeddings.shape}")
        if not self.index.is_trained:  # IVF learns its coarse centroids from the first batch
            self.index.train(embeddings)
        start = len(self.rows)
        self.index.add(embeddings)
        self.rows += [{**r, "embedding_id": start + i} for i, r in enumerate(rows)]
        self.info["count"] = len(self.rows)

    def search(self, query: np.ndarray, k: int = 1, modality: str | None = None,
               exclude_subject: str | None = None, min_similarity: float | None = None) -> SearchResult:
        """Top-k references for one query embedding (dim,), filtered; over-fetches until k pass the filters."""
        q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
        if q.shape[1] != self.info["dim"]:
            raise ValueError(f"query has dimension {q.shape[1]}, the bank {self.info['dim']}")
        if not self.rows:
            return SearchResult(reason="the reference bank is empty")
        threshold = -1.0 if min_similarity is None else min_similarity
        fetch = min(len(self.rows), max(4 * k, 16))
        while True:
            sims, ids = self.index.search(q, fetch)
            hits = [Hit(self.rows[i], float(s)) for s, i in zip(sims[0], ids[0]) if i >= 0
                    and (modality is None or self.rows[i]["modality"] == modality)
                    and (exclude_subject is None or self.rows[i].get("subject") != exclude_subject)]
            if len(hits) >= k or fetch >= len(self.rows):
                break
            fetch = min(len(self.rows), fetch * 4)
        if not hits:
            return SearchResult(reason=f"no reference of modality {modality!r}" if modality else "no reference")
        if hits[0].similarity < threshold:
            return SearchResult(reason=f"no suitable reference (best similarity {hits[0].similarity:.2f} < "
                                       f"{threshold:.2f})")
        return SearchResult(hits=[h for h in hits[:k] if h.similarity >= threshold])

    def save(self, folder: str | Path) -> Path:
        import faiss

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".index.faiss.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(_to_cpu(self.index), tmp)
            os.replace(tmp, folder / "index.faiss")
        finally:
            Path(tmp).unlink(missing_ok=True)
        atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        atomic_write_text(folder / "bank.json", json.dumps(self.info, indent=1) + "\n")  # last: marks it complete
        return folder

    @classmethod
    def load(cls, folder: str | Path, embedder: Embedder | None = None) -> "ReferenceBank":
        import faiss

        folder = Path(folder)
        for name in ("bank.json", "metadata.jsonl", "index.faiss"):
            if not (folder / name).is_file():
                raise DataError(f"{folder}: not a reference bank ({name} is missing)")
        try:
            info = json.loads((folder / "bank.json").read_text())
            rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line]
            index = faiss.read_index(str(folder / "index.faiss"))
            if isinstance(index, faiss.IndexFlat):
                index = _to_device(index)
        except Exception as e:  # noqa: BLE001 - json / faiss raise many types on corrupt files
            raise DataError(f"{folder}: unreadable reference bank ({type(e).__name__}: {e})") from None
        if index.ntotal != len(rows) or info.get("count") != len(rows) or index.d != info.get("dim"):
            raise DataError(f"{folder}: index ({index.ntotal} x {index.d}), metadata ({len(rows)} rows) and "
                            f"bank.json disagree")
        if embedder is not None and (embedder.id != info["embedder"] or embedder.dim != info["dim"]):
            raise ConfigError(f"{folder}: bank built with embedder {info['embedder']!r} (dim {info['dim']}), "
                              f"cannot be searched with {embedder.id!r} (dim {embedder.dim})")
        return cls(index, rows, info)


def recall_at_k(bank: ReferenceBank, embedder: Embedder, manifest_path: str | Path, split: str = "test",
                ks: tuple[int, ...] = (1, 5), pose_tolerance: int = 2) -> dict:
    """Retrieval quality: for each query (its own subject excluded), is a same-modality / nearest-pose reference
    among the top k? Pose: same modality and |slice - query slice| <= tolerance (native 2D: same modality)."""
    manifest = read_manifest(manifest_path)
    queries = [r for r in manifest.rows if r.split == split]
    if not queries:
        raise DataError(f"{manifest.path}: no {split!r} rows to evaluate retrieval on")
    emb = embedder.embed([manifest.load(r)[0] for r in queries], [r.modality for r in queries])
    hits = {f"{what}@{k}": 0 for what in ("modality", "pose") for k in ks}
    for q, e in zip(queries, emb):
        found = bank.search(e, k=max(ks), exclude_subject=q.subject).hits
        for k in ks:
            top = [h.row for h in found[:k]]
            same = [r for r in top if r["modality"] == q.modality]
            hits[f"modality@{k}"] += bool(same)
            hits[f"pose@{k}"] += any(q.slice is None or (r.get("slice") is not None
                                                          and abs(r["slice"] - q.slice) <= pose_tolerance)
                                     for r in same)
    return {"queries": len(queries), **{key: round(v / len(queries), 4) for key, v in hits.items()}}
