"""Reference retrieval: a DINOv2 embedder and a faiss ``ReferenceBank`` over a manifest.

A bank folder holds ``index.faiss``, ``metadata.jsonl`` (one manifest row per entry + its position in the index and
the absolute manifest path, so the reference image and mask can be loaded) and ``bank.json`` (the embedder's id and
dimension, the index type): a bank built with one embedder is never searched with another. Search filters by
modality, never returns the query's own subject, and answers "no suitable reference" below a similarity threshold
instead of returning a bad match. Exact (Flat) indexes move to the GPU when a GPU is present: a faiss GPU index
with faiss-gpu (the ``gpu`` extra), else ``TorchFlatIP`` (the same exact inner-product search as a torch matmul +
top-k on the GPU) with faiss-cpu; HNSW and IVF stay on the CPU. A build on Ray embeds on a Ray Data actor pool
(one embedder per actor, ``num_gpus=1`` each on CUDA). A bank logs its index type, whether it is on the GPU and which
faiss build is installed when it is built or loaded (logger ``rau_ray.retrieval``). A bank folder may also be an
``s3://`` / ``gs://`` URI: ``save`` uploads it (bank.json last), ``load`` downloads it once per node into the local
cache (``rau_ray.storage.local_copy``).
The tiny embedder (``embedder: tiny``): ``init: pretrained`` (the default) loads ``weights/tiny/dinov2``, the
self-supervised DINOv2-tiny made by ``rau pretrain dino`` and shipped with its model card, which must hold the
configured architecture (``rau_tiny_spec.json``); ``init: random`` builds a seeded random-initialised DINOv2 into
the cache.
Use: ``bank = ReferenceBank.build("data/ct/manifest.jsonl", TINY); bank.search(Embedder(TINY).embed([im], ["CT"])[0])``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import faiss
except ImportError as e:  # the core leaves the faiss build to the extras: one of the two, never both
    raise ImportError("faiss is not installed: install rau-ray with one of its faiss extras, '.[cpu]' (faiss-cpu) "
                      "or '.[gpu]' (faiss-gpu-cu12)") from e
import numpy as np
import ray.data
import torch
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import AutoImageProcessor, AutoModel, BitImageProcessor, Dinov2Config, Dinov2Model

from rau_ray import ray_session, storage
from rau_ray.atomic import atomic_write_text
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import ConfigError, DataError, RauError
from rau_ray.models import pretrained, prompts

INDEX_TYPES = ("auto", "flat", "hnsw", "ivf")
POOLINGS = ("cls", "mean", "cls+mean")
GPU_MAX_K = 2048  # faiss GPU k-selection limit; beyond it (rare) the exact fallback answers
FAISS_BUILDS = ("faiss-cpu", "faiss-gpu-cu12")  # the [cpu] and [gpu] extras: both install the module `faiss`
log = logging.getLogger("rau_ray.retrieval")


@dataclass(frozen=True)
class RetrievalConfig:
    embedder: str = "tiny"  # "tiny" (built offline), a Hugging Face id (facebook/dinov2-base) or a local folder
    image_size: int = 112  # tiny: 8x8 patches of 14 px; the paper profile's processor decides its own (224)
    # CLS carries global appearance, mean-pooled patches the layout; "cls+mean" concatenates both (each normalised),
    # as DINOv2's linear probe does; on phantoms it ranks poses at least as well as either alone
    pooling: str = "cls+mean"
    # auto: exact Flat inner product below `exact_below` entries (exact, no training, GPU-able); above it HNSW,
    # which stays fast at millions of entries, needs no training and grows incrementally (IVF must be trained)
    index: str = "auto"
    exact_below: int = 20_000  # brute force over 20k x 1536 floats: ~8 ms a query on one core (measured)
    min_similarity: float = 0.2  # cosine; below it search says "no suitable reference" instead of a bad match
    batch_size: int = 16  # images per forward pass; also the smallest chunk a Ray task gets
    device: str = "auto"  # "auto": cuda when torch sees a GPU, else cpu; or an explicit torch device
    # tiny architecture, used only when embedder == "tiny"
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    patch_size: int = 14  # DINOv2's patch size, so the tiny model has the real one's geometry
    # tiny only: "pretrained" loads the shipped self-supervised weights of weights/tiny/dinov2 (which must hold the
    # architecture above; rau_ray.train.pretrain_dino made them), "random" a fresh model initialised with `seed`
    init: str = "pretrained"
    seed: int = 0  # init: random: the same seed gives the same weights on every worker

    def validate(self) -> None:
        if self.index not in INDEX_TYPES:
            raise ConfigError(f"retrieval.index must be one of {INDEX_TYPES}, not {self.index!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"retrieval.pooling must be one of {POOLINGS}, not {self.pooling!r}")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"retrieval.min_similarity is a cosine in [-1, 1], not {self.min_similarity}")
        if self.batch_size < 1:
            raise ConfigError(f"retrieval.batch_size must be >= 1, not {self.batch_size}")
        pretrained.check_init(self.init, "retrieval")


# The shipped DINOv2-tiny puts a phantom's best other-subject match of its own modality at cosine >= 0.96 and an
# angiogram's best match among CT slices at 0.41-0.46 (6 subjects a modality of seed 7777): 0.6 refuses the latter.
TINY = RetrievalConfig(min_similarity=0.6)
PAPER = RetrievalConfig(embedder="facebook/dinov2-base", image_size=224, batch_size=64)


TINY_ARCH = ("image_size", "hidden_size", "num_layers", "num_heads", "patch_size")  # what defines the tiny model


def tiny_spec(cfg: RetrievalConfig) -> dict:
    """The tiny DINOv2's architecture: what shipped pretrained weights must match (``rau_tiny_spec.json``); with
    ``init: random`` also the seed (the cache key of a random-initialised model)."""
    spec = {k: getattr(cfg, k) for k in TINY_ARCH}
    return {**spec, "seed": cfg.seed} if cfg.init == "random" else spec


def embedder_id(cfg: RetrievalConfig, dim: int) -> str:
    """What a bank records about its embedder: weights, pooling, dimension; for the tiny one also its init (the
    seed of a random one), so a bank built with one tiny embedder is never searched with another."""
    tiny = ""
    if cfg.embedder == pretrained.TINY:
        tiny = f"|seed{cfg.seed}" if cfg.init == "random" else f"|pretrained-{_shipped_digest(cfg)}"
    return f"{cfg.embedder}|{cfg.pooling}|{dim}" + tiny


def _shipped_digest(cfg: RetrievalConfig) -> str:
    """First 12 hex digits of the shipped weights' sha256 (a re-pretrained model gets another id), "none" without."""
    path = pretrained.weights_root() / pretrained.SHIPPED["dinov2"] / "model.safetensors"
    try:
        stat = path.stat()
    except OSError:
        return "none"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return _DIGESTS[key]


_DIGESTS: dict = {}


def tiny_model(cfg: RetrievalConfig):
    """A random-initialised tiny ``Dinov2Model`` (seeded with ``cfg.seed``): the init of ``init: random`` and of
    the self-supervised pretraining (``rau_ray.train.pretrain_dino``)."""
    torch.manual_seed(cfg.seed)
    return Dinov2Model(Dinov2Config(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                                    num_attention_heads=cfg.num_heads, intermediate_size=2 * cfg.hidden_size,
                                    image_size=cfg.image_size, patch_size=cfg.patch_size))


def tiny_processor(cfg: RetrievalConfig):
    """DINOv2's own normalisation; resize straight to the square input (phantoms are already square)."""
    return BitImageProcessor(size={"height": cfg.image_size, "width": cfg.image_size}, do_center_crop=False,
                             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


def _save_tiny(cfg: RetrievalConfig, folder: Path) -> None:
    pretrained.save_tiny_weights(tiny_model(cfg), folder)
    tiny_processor(cfg).save_pretrained(folder)


def _load_model(path: str):
    """``AutoModel.from_pretrained``; a damaged weights file is a DataError naming it (not a safetensors trace)."""
    try:
        return AutoModel.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        weights = Path(path) / "model.safetensors"
        if Path(path).is_dir():
            raise DataError(f"{weights if weights.exists() else path}: cannot load the DINOv2 weights "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e!r}); "
                            f"re-export them with 'rau pretrain dino' or use init: random") from None
        raise


class Embedder:
    """DINOv2 image embeddings, L2-normalised float32 (N, dim); built once per process/worker/replica."""

    def __init__(self, cfg: RetrievalConfig = TINY, device: str | None = None):
        cfg.validate()
        path = pretrained.resolve(cfg.embedder, "dinov2", lambda folder: _save_tiny(cfg, folder), tiny_spec(cfg),
                                  init=cfg.init)
        device = device or cfg.device
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self._setup(cfg, _load_model(path).to(device), AutoImageProcessor.from_pretrained(path), device)

    @classmethod
    def from_model(cls, model, processor, cfg: RetrievalConfig, device: str = "cpu") -> Embedder:
        """An Embedder around a model in memory (a training run's, validating as retrieval will use it)."""
        self = cls.__new__(cls)
        self._setup(cfg, model, processor, device, freeze=False)
        return self

    def _setup(self, cfg, model, processor, device, freeze: bool = True) -> None:
        self.cfg, self.device, self.processor = cfg, device, processor
        self.model = model.eval().requires_grad_(False) if freeze else model  # frozen once loaded
        width = self.model.config.hidden_size
        self.dim = 2 * width if cfg.pooling == "cls+mean" else width
        self.id = embedder_id(cfg, self.dim)

    @torch.no_grad()
    def embed(self, images: list, modalities: list[str]) -> np.ndarray:
        """Images (HxW grey, HxWx3, CT in HU) -> (N, dim) unit vectors; CT is windowed (abdomen) to 8 bits."""
        if len(images) != len(modalities):
            raise ValueError(f"{len(images)} images but {len(modalities)} modalities")
        out = []
        for i in range(0, len(images), self.cfg.batch_size):
            pil = [prompts.to_pil(im, mod) for im, mod in zip(images[i:i + self.cfg.batch_size],
                                                             modalities[i:i + self.cfg.batch_size])]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
            hidden = self.model(pixel_values=pixels).last_hidden_state
            cls, mean = hidden[:, 0], hidden[:, 1:].mean(1)
            if self.cfg.pooling == "cls+mean":
                pooled = torch.cat([torch.nn.functional.normalize(cls, dim=1),
                                    torch.nn.functional.normalize(mean, dim=1)], 1)
            else:
                pooled = cls if self.cfg.pooling == "cls" else mean
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


def _embed_rows(cfg: RetrievalConfig, manifest_path: str, ids: list[str], progress=None) -> np.ndarray:
    """One chunk of a bank build (in-process or as a Ray task): one Embedder, images loaded a batch at a time."""
    manifest = read_manifest(manifest_path)
    by_id = {r.id: r for r in manifest.rows}
    embedder, out = Embedder(cfg), []
    for i in range(0, len(ids), cfg.batch_size):
        rows = [by_id[j] for j in ids[i:i + cfg.batch_size]]
        out.append(embedder.embed([manifest.load(r)[0] for r in rows], [r.modality for r in rows]))
        if progress is not None:
            progress(len(rows))
    return np.concatenate(out)


class TorchFlatIP:
    """Exact inner-product search on a torch device: what ``faiss.IndexFlatIP`` answers (``search`` -> (scores,
    ids), -1 past the entries; ``add``, ``reconstruct_batch``), as one matmul + top-k. A Flat bank lives in one on
    a GPU whose faiss has no GPU support (faiss-cpu); ``faiss_index()`` is the faiss index it is saved as."""

    is_trained = True

    def __init__(self, dim: int, device: str | torch.device = "cuda", vectors: np.ndarray | None = None):
        self.d, self.device = dim, torch.device(device)
        self.vectors = torch.zeros((0, dim), dtype=torch.float32, device=self.device)
        if vectors is not None:
            self.add(vectors)

    @property
    def ntotal(self) -> int:
        return len(self.vectors)

    def add(self, x: np.ndarray) -> None:
        self.vectors = torch.cat([self.vectors, torch.as_tensor(np.asarray(x, np.float32), device=self.device)])

    def search(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        if params is not None:
            raise ValueError("TorchFlatIP filters no ids: over-fetch and filter the results")
        scores = torch.as_tensor(np.asarray(q, np.float32), device=self.device) @ self.vectors.T
        top = torch.topk(scores, min(k, self.ntotal), dim=1)  # sorted, best first
        sims = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        sims[:, :top.values.shape[1]] = top.values.cpu().numpy()
        ids[:, :top.indices.shape[1]] = top.indices.cpu().numpy()
        return sims, ids

    def reconstruct_batch(self, ids: np.ndarray) -> np.ndarray:
        return self.vectors[torch.as_tensor(np.asarray(ids, np.int64), device=self.device)].cpu().numpy()

    def reconstruct_n(self, start: int, n: int) -> np.ndarray:
        return self.vectors[start:start + n].cpu().numpy()

    def faiss_index(self):
        index = faiss.IndexFlatIP(self.d)
        index.add(self.vectors.cpu().numpy())
        return index


def _is_gpu(index) -> bool:
    return type(index).__name__.startswith("Gpu") or (isinstance(index, TorchFlatIP) and index.device.type == "cuda")


def _faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_device(index):
    """A Flat index on the GPU when one is visible: faiss' GPU index where faiss was built with GPU support (the
    ``gpu`` extra), else ``TorchFlatIP`` (faiss-cpu); as is without a GPU."""
    if not torch.cuda.is_available():
        return index
    if _faiss_has_gpu():
        return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return TorchFlatIP(index.d, "cuda", index.reconstruct_n(0, index.ntotal) if index.ntotal else None)


def _to_cpu(index):
    if isinstance(index, TorchFlatIP):
        return index.faiss_index()
    return faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index


def faiss_build() -> str:
    """Which faiss distribution provides the module (``faiss-cpu`` / ``faiss-gpu-cu12``; both is a broken install:
    the module is whichever was installed last), with faiss' version and whether it has GPU support."""
    installed = []
    for name in FAISS_BUILDS:
        try:
            installed.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    what = " + ".join(installed) or "faiss (no known distribution)"
    if len(installed) > 1:
        log.warning("both faiss builds are installed (%s): they install the same module, so which one runs is the "
                    "last installed; install only one of rau-ray's [cpu] / [gpu] extras", what)
    gpu = "GPU support" if hasattr(faiss, "StandardGpuResources") else "no GPU support"
    return f"{what} (module {faiss.__version__}, {gpu})"


def _new_index(kind: str, dim: int, expected: int, exact_below: int):
    """(faiss index, kind). Only Flat goes to the GPU: faiss has no GPU HNSW, and IVF is trained on first add."""
    if kind == "auto":
        kind = "flat" if expected < exact_below else "hnsw"
    if kind == "flat":
        return _to_device(faiss.IndexFlatIP(dim)), kind
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)  # 32 links a node: faiss' usual default
        index.hnsw.efSearch = 128  # wider beam than faiss' 16: better recall, fewer short filtered searches
        return index, kind
    return _new_ivf(dim, max(1, int(4 * math.sqrt(max(expected, 1))))), kind  # faiss' rule: 4..16 sqrt(N) lists


def _new_ivf(dim: int, nlist: int):
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(nlist, 16)  # lists scanned a query: recall vs speed
    return index


def _search_params(index, sel):
    """faiss search parameters carrying an IDSelector for this index type, or None where it is not honoured.

    The parameter object must match the index (IVF rejects the base class) and its own defaults win over the
    index's settings (SearchParametersIVF.nprobe = 1, SearchParametersHNSW.efSearch = 16), so they are copied.
    GPU indexes accept the argument but (faiss 1.x GpuIndexFlat) ignore the selector, and TorchFlatIP takes none:
    over-fetch there instead.
    """
    if _is_gpu(index) or isinstance(index, TorchFlatIP):
        return None
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(sel=sel, nprobe=index.nprobe)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=sel, efSearch=index.hnsw.efSearch)
    return faiss.SearchParameters(sel=sel)


class ReferenceBank:
    """faiss inner-product index over unit embeddings (= cosine) + one metadata row per entry, in index order."""

    def __init__(self, index, rows: list[dict], info: dict, min_similarity: float = TINY.min_similarity):
        self.index, self.rows, self.info = index, rows, info
        self.min_similarity = min_similarity  # search's default threshold (the embedder config's)

    def __len__(self) -> int:
        return len(self.rows)

    def index_description(self) -> str:
        """What searches this bank: the index kind and class, CPU or GPU, the entries and the faiss build."""
        where = "GPU" if _is_gpu(self.index) else "CPU"
        return (f"{self.info.get('index', '?')} index ({type(self.index).__name__}) on the {where}, {len(self)} "
                f"entries x {self.info['dim']}-d; {faiss_build()}")

    def log_index(self, how: str) -> None:
        log.info("reference bank %s: %s", how, self.index_description())

    @classmethod
    def empty(cls, embedder_id: str, dim: int, index: str = "flat", expected: int = 0,
              exact_below: int = TINY.exact_below, min_similarity: float = TINY.min_similarity) -> ReferenceBank:
        idx, kind = _new_index(index, dim, expected, exact_below)
        return cls(idx, [], {"embedder": embedder_id, "dim": dim, "index": kind, "count": 0, "metric": "cosine"},
                   min_similarity)

    @classmethod
    def build(cls, manifest_path: str | Path, cfg: RetrievalConfig = TINY, split: str | None = "train",
              backend: str = "ray", progress: bool = True) -> ReferenceBank:
        """Embed the manifest's rows of ``split`` (all rows if None), on a Ray Data actor pool (an embedder loaded
        once per actor; ``num_gpus`` on CUDA) or in-process."""
        cfg.validate()
        if backend not in ("ray", "local"):
            raise ValueError(f"backend must be 'ray' or 'local', not {backend!r}")
        manifest = read_manifest(manifest_path)
        rows = [r for r in manifest.rows if split is None or r.split == split]
        if not rows:
            raise DataError(f"{manifest.path}: no rows with split {split!r} to build a reference bank from")
        ids = [r.id for r in rows]
        path = str(manifest.path.resolve())
        with tqdm(total=len(ids), unit="image", desc=f"embedding ({backend})", disable=not progress) as bar:
            if backend == "local":
                embeddings = _embed_rows(cfg, path, ids, bar.update)
            else:
                embeddings = _embed_on_ray(cfg, path, ids, bar)
        width = embeddings.shape[1]
        bank = cls.empty(embedder_id(cfg, width), width, cfg.index, expected=len(rows), exact_below=cfg.exact_below,
                         min_similarity=cfg.min_similarity)
        bank.add([{**asdict(r), "manifest": path} for r in rows], embeddings)
        bank.log_index("built")
        return bank

    def add(self, rows: list[dict], embeddings: np.ndarray) -> None:
        """Append entries (rows as dicts, unit embeddings (n, dim)); ``embedding_id`` is their index position."""
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(rows), self.info["dim"]):
            raise ValueError(f"expected embeddings of shape ({len(rows)}, {self.info['dim']}), got {embeddings.shape}")
        if not rows:
            return
        if not self.index.is_trained:  # IVF learns its coarse centroids from the first batch
            if self.index.nlist > len(rows):  # k-means needs at least one point a list
                self.index = _new_ivf(self.info["dim"], len(rows))
            self.index.train(embeddings)
        start = len(self.rows)
        self.index.add(embeddings)
        self.rows += [{**r, "embedding_id": start + i} for i, r in enumerate(rows)]
        self.info["count"] = len(self.rows)

    def search(self, query: np.ndarray, k: int = 1, modality: str | None = None, exclude_subject: str | None = None,
               min_similarity: float | None = None) -> SearchResult | list[SearchResult]:
        """Top-k references, best first, for one embedding (dim,) -> SearchResult or a batch (n, dim) -> a list.

        ``modality`` keeps only that modality; ``exclude_subject`` drops the query's own subject (a query must not
        retrieve itself). ``min_similarity`` (default: the bank's) below which there is no suitable reference;
        pass -1 to disable. Filters run inside faiss (IDSelectorBatch) where the index honours them, else on an
        over-fetched top list; results are always re-checked, and a query left with fewer than k is answered exactly.
        """
        q = np.ascontiguousarray(np.asarray(query, np.float32))
        single = q.ndim == 1
        q = q.reshape(1, -1) if single else q
        if q.ndim != 2 or q.shape[1] != self.info["dim"]:
            raise ValueError(f"query has shape {np.asarray(query).shape}; the bank holds {self.info['dim']}-d vectors")
        if k < 1:
            raise ValueError(f"k must be >= 1, not {k}")
        threshold = self.min_similarity if min_similarity is None else min_similarity
        allowed = np.array([(modality is None or r["modality"] == modality)
                            and (exclude_subject is None or r.get("subject") != exclude_subject) for r in self.rows],
                           dtype=bool)
        n_allowed = int(allowed.sum())
        if n_allowed == 0:
            what = (f"modality {modality!r}" if modality else "entries") + (
                f" outside subject {exclude_subject!r}" if exclude_subject is not None else "")
            empty = SearchResult(reason=f"no reference: the bank has no {what}" if self.rows
                                 else "no reference: the bank is empty")
            return empty if single else [SearchResult(reason=empty.reason) for _ in q]
        want = min(k, n_allowed)
        params = fetch = None
        if n_allowed < len(self.rows):
            sel = faiss.IDSelectorBatch(np.flatnonzero(allowed).astype(np.int64))
            params = _search_params(self.index, sel)
            if params is None:  # the selector would be ignored: over-fetch, filter here
                fetch = min(len(self.rows), max(4 * k, 16))
        sims, ids = self.index.search(q, min(fetch or want, GPU_MAX_K), params=params)
        found = [[(int(i), float(s)) for s, i in zip(s_row, i_row) if i >= 0 and allowed[i]][:k]
                 for s_row, i_row in zip(sims, ids)]
        # an approximate index can come short under a selective filter (the HNSW graph or the probed IVF lists never
        # reach the allowed entries; no k fixes that): brute force over the allowed entries for those queries
        short = [n for n, f in enumerate(found) if len(f) < want]
        if short:
            for n, f in zip(short, self._exact(q[short], np.flatnonzero(allowed), k)):
                found[n] = f
        results = [self._result(f, threshold) for f in found]
        return results[0] if single else results

    def _exact(self, q: np.ndarray, ids: np.ndarray, k: int, chunk: int = 65_536) -> list[list[tuple[int, float]]]:
        """Exact top-k of ``q`` among ``ids``, vectors read back from the index a chunk at a time."""
        if isinstance(self.index, faiss.IndexIVF) and self.index.direct_map.no():
            self.index.make_direct_map()  # IVF reconstructs by id only through a direct map
        top_s, top_i = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            s = np.concatenate([top_s, q @ self.index.reconstruct_batch(part).T], 1)
            i = np.concatenate([top_i, np.broadcast_to(part, (len(q), len(part)))], 1)
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            top_s, top_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
        return [[(int(i), float(s)) for i, s in zip(ri, rs)] for ri, rs in zip(top_i, top_s)]

    def _result(self, found: list[tuple[int, float]], threshold: float) -> SearchResult:
        if found[0][1] < threshold:
            return SearchResult(reason=f"no suitable reference (best similarity {found[0][1]:.3f} < {threshold:.3f})")
        return SearchResult(hits=[Hit(self.rows[i], s) for i, s in found if s >= threshold])

    def save(self, folder: str | Path) -> Path | str:
        """Write the three files, each atomically; bank.json last, so a complete bank.json means a complete bank.
        A remote URI (``s3://``, ``gs://``): written to a temp folder, then uploaded, bank.json last."""
        if storage.is_remote(folder):
            with tempfile.TemporaryDirectory(prefix="rau-bank-") as tmp:
                self.save(tmp)
                storage.remove(storage.join(folder, "bank.json"), "bank")  # an older bank there is incomplete now
                return storage.upload_dir(tmp, folder, last=("bank.json",))
        folder = storage.local_copy(folder)  # a folder or a file:// URI
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".index.faiss.", suffix=".tmp")
        os.close(fd)
        try:
            faiss.write_index(_to_cpu(self.index), tmp)  # faiss writes by path: temp file + rename by hand
            os.replace(tmp, folder / "index.faiss")
        finally:
            Path(tmp).unlink(missing_ok=True)
        atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(r) + "\n" for r in self.rows))
        atomic_write_text(folder / "bank.json", json.dumps(self.info, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, embedder: Embedder | None = None) -> ReferenceBank:
        """Open a saved bank (a folder, or a URI downloaded once into the local cache: ``storage.local_copy``); with
        ``embedder``, refuse a bank built by a different one (ConfigError)."""
        if storage.is_remote(folder) and not storage.is_file(storage.join(folder, "bank.json"), "bank_dir"):
            raise DataError(f"{storage.join(folder, 'bank.json')}: missing; {folder} is not a reference bank "
                            f"(`rau index build --out {folder}`), or its upload has not finished")
        folder = storage.local_copy(folder, "bank_dir")
        for name in ("bank.json", "metadata.jsonl", "index.faiss"):
            if not (folder / name).is_file():
                raise DataError(f"{folder / name}: missing; {folder} is not a reference bank (`rau index build`)")
        path = folder / "bank.json"
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(info, dict) or not isinstance(info.get("dim"), int) or "embedder" not in info:
                raise ValueError("expected an object with 'embedder' and 'dim'")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: corrupt bank description ({e})") from None
        path = folder / "metadata.jsonl"
        rows, lineno = [], 0
        try:
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):  # noqa: B007
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{path}:{lineno}: corrupt metadata row ({e})") from None
        path = folder / "index.faiss"
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise DataError(f"{path}: unreadable faiss index ({str(e).strip().splitlines()[-1]})") from None
        if index.ntotal != len(rows) or info.get("count") != len(rows) or index.d != info["dim"]:
            raise DataError(f"{folder}: index.faiss ({index.ntotal} x {index.d}), metadata.jsonl ({len(rows)} rows) "
                            f"and bank.json (count {info.get('count')}, dim {info['dim']}) disagree")
        if embedder is not None and (embedder.id != info["embedder"] or embedder.dim != info["dim"]):
            raise ConfigError(f"{folder}: bank built with {info['embedder']!r} (dim {info['dim']}), cannot be searched "
                              f"with {embedder.id!r} (dim {embedder.dim}); rebuild it with `rau index build`")
        if isinstance(index, faiss.IndexFlat):
            index = _to_device(index)
        bank = cls(index, rows, info, embedder.cfg.min_similarity if embedder else TINY.min_similarity)
        bank.log_index(f"loaded from {folder}")
        return bank


class _EmbedActor:
    """One actor of a bank build's Ray Data pool: its Embedder loaded once, then batches of manifest rows ({"n",
    "id"}) in, their unit embeddings out (with "n", the rows' places in the build, and "error": a bad image's
    DataError text, returned as a value: Ray Data hands the driver no exception object of the actor's)."""

    def __init__(self, cfg: RetrievalConfig, manifest_path: str):
        self.manifest = read_manifest(manifest_path)
        self.by_id = {r.id: r for r in self.manifest.rows}
        self.embedder = Embedder(cfg)

    def __call__(self, batch: dict) -> dict:
        rows = [self.by_id[str(i)] for i in batch["id"]]
        try:
            embedded, error = self.embedder.embed([self.manifest.load(r)[0] for r in rows],
                                                  [r.modality for r in rows]), ""
        except RauError as e:  # a bad image: the user's problem
            embedded, error = np.zeros((len(rows), self.embedder.dim), np.float32), str(e)
        return {"n": np.asarray(batch["n"]), "embedding": embedded, "error": np.array([error] * len(rows))}


def _embed_on_ray(cfg: RetrievalConfig, manifest_path: str, ids: list[str], bar) -> np.ndarray:
    """The rows through a Ray Data actor pool (``map_batches``): an actor per CPU (per GPU when the embedder runs on
    CUDA, ``num_gpus=1`` each), each loading the embedder once; results put back in manifest order."""
    ray_session.connect()
    gpus = ray.cluster_resources().get("GPU", 0)
    on_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and gpus > 0)
    batches = math.ceil(len(ids) / cfg.batch_size)
    actors = max(1, min(int(gpus) if on_gpu else ray_session.cluster_cpus(), batches))
    ray.data.DataContext.get_current().enable_progress_bars = False  # the caller's bar counts images
    env = {"env_vars": {"RAU_CACHE": os.environ["RAU_CACHE"]}} if "RAU_CACHE" in os.environ else None  # the cache
    ds = ray.data.from_items([{"n": n, "id": i} for n, i in enumerate(ids)], override_num_blocks=batches)
    ds = ds.map_batches(_EmbedActor, fn_constructor_kwargs={"cfg": cfg, "manifest_path": manifest_path},
                        batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                        num_gpus=1 if on_gpu else None, runtime_env=env)
    out: np.ndarray | None = None
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        errors = [str(e) for e in batch["error"] if e]
        if errors:
            raise DataError(errors[0])
        if out is None:
            out = np.zeros((len(ids), batch["embedding"].shape[1]), np.float32)
        out[batch["n"]] = batch["embedding"]
        bar.update(len(batch["n"]))
    return out


def recall_at_k(bank: ReferenceBank, embedder: Embedder, manifest_path: str | Path, split: str = "test",
                ks: tuple[int, ...] = (1, 5), pose_tolerance: int = 2) -> dict:
    """Retrieval quality: for each query (its own subject excluded, no modality filter, no threshold), is a
    same-modality / nearest-pose reference among the top k? Pose: same modality and |slice - query slice| <=
    tolerance (rows without a slice, native 2D: same modality). Also the share of queries whose best match falls
    below the bank's threshold (search would answer "no suitable reference")."""
    manifest = read_manifest(manifest_path)
    queries = [r for r in manifest.rows if r.split == split]
    if not queries:
        raise DataError(f"{manifest.path}: no {split!r} rows to evaluate retrieval on")
    hits = {f"{what}@{k}": 0 for what in ("modality", "pose") for k in ks}
    below = 0
    for start in range(0, len(queries), embedder.cfg.batch_size):
        batch = queries[start:start + embedder.cfg.batch_size]
        emb = embedder.embed([manifest.load(r)[0] for r in batch], [r.modality for r in batch])
        for q, e in zip(batch, emb):
            found = bank.search(e, k=max(ks), exclude_subject=q.subject or None, min_similarity=-1.0).hits
            below += bool(found) and found[0].similarity < bank.min_similarity
            for k in ks:
                same = [h.row for h in found[:k] if h.row["modality"] == q.modality]
                hits[f"modality@{k}"] += bool(same)
                hits[f"pose@{k}"] += any(q.slice is None or (r.get("slice") is not None
                                                              and abs(r["slice"] - q.slice) <= pose_tolerance)
                                         for r in same)
    n = len(queries)
    return {"queries": n, **{key: round(v / n, 4) for key, v in hits.items()}, "below_threshold": round(below / n, 4)}


def phantom_bank(out: str | Path, subjects: int = 6, size: int = 128, seed: int = 0) -> str:
    """A small CT phantom dataset (``out/ct``) and the tiny reference bank over all of it (``out/bank``), built
    in-process (no Ray); returns the bank folder. What the serving app's Retriever builds at start-up for
    ``bank_dir: null`` (serve_configs/local.yaml), and what a demo or test needing a bank without a pipeline uses."""
    data = os.path.join(out, "ct")
    make_dataset(MakeConfig("ct-abdomen", n=subjects, out=data, size=size, seed=seed, slices_per_subject=4),
                 backend="local", progress=False)
    bank = ReferenceBank.build(os.path.join(data, "manifest.jsonl"), TINY, split=None, backend="local", progress=False)
    bank.save(os.path.join(out, "bank"))
    return os.path.join(out, "bank")


@functools.lru_cache(maxsize=8)
def _embedded(retrieval, manifest_path: str, ids: tuple[str, ...]) -> np.ndarray:
    """The rows' embeddings, once per process: a job's training and validation pairs share their references."""
    return _embed_rows(retrieval, manifest_path, list(ids))


def retrieved_references(manifest, targets: list, candidates: list, retrieval) -> dict:
    """Target row id -> the candidate row the embedder's bank retrieves for it (inference's pick: best cosine of the
    same modality, its own subject excluded; no similarity threshold, a training pair always gets its best match)."""
    if not targets or not candidates:
        return {}
    path = str(manifest.path.resolve())
    ref_vectors = _embedded(retrieval, path, tuple(c.id for c in candidates))
    vectors = {c.id: v for c, v in zip(candidates, ref_vectors)}
    missing = tuple(t.id for t in targets if t.id not in vectors)
    if missing:
        vectors.update(zip(missing, _embedded(retrieval, path, missing)))
    dim = ref_vectors.shape[1]
    bank = ReferenceBank.empty(embedder_id(retrieval, dim), dim, "flat", expected=len(candidates))
    bank.add([{"id": c.id, "modality": c.modality, "subject": c.subject} for c in candidates], ref_vectors)
    by_id = {c.id: c for c in candidates}
    picks = {}
    for target in targets:
        result = bank.search(vectors[target.id], k=1, modality=target.modality, exclude_subject=target.subject,
                             min_similarity=-1.0)
        if result.hits:
            picks[target.id] = by_id[result.hits[0].row["id"]]
    return picks


def reference_picker(retrieval: RetrievalConfig):
    """``make_pairs``'s ``retrieve``: training pairs get the reference the bank of ``retrieval``'s embedder retrieves
    at inference (``retrieved_references``)."""
    return functools.partial(retrieved_references, retrieval=retrieval)
