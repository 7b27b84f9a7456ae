"""DINOv2 embedder + faiss reference bank: offline build, Ray == local, persistence, filters, thresholds, recall."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.retrieval import TINY, Embedder, ReferenceBank, RetrievalConfig, recall_at_k


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """ct-abdomen (CT, 4 slices a subject) and xray-angio (XA) phantoms behind one manifest."""
    root = tmp_path_factory.mktemp("retrieval")
    lines = []
    for modality, n in (("ct-abdomen", 12), ("xray-angio", 8)):
        make_dataset(MakeConfig(modality, n=n, out=str(root / modality), size=96), backend="local", progress=False)
        for line in (root / modality / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            row["image"], row["label"] = f"{modality}/{row['image']}", f"{modality}/{row['label']}"
            lines.append(json.dumps(row))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def embedder():
    return Embedder(TINY)


@pytest.fixture(scope="module")
def bank(dataset):
    return ReferenceBank.build(dataset, TINY, split="train", backend="local", progress=False)


def test_embeddings_are_unit_norm_and_deterministic(embedder):
    images = [np.full((64, 64), v, np.uint8) for v in (0, 128)] + [np.zeros((80, 70), np.float32)]
    a = embedder.embed(images, ["XA", "XA", "CT"])
    assert a.shape == (3, embedder.dim) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, Embedder(TINY).embed(images, ["XA", "XA", "CT"]))


def test_ray_build_equals_local_build(dataset, bank, ray_cluster):
    on_ray = ReferenceBank.build(dataset, TINY, split="train", backend="ray", progress=False)
    assert [r["id"] for r in on_ray.rows] == [r["id"] for r in bank.rows]
    a, b = on_ray.index.reconstruct_n(0, len(bank)), bank.index.reconstruct_n(0, len(bank))
    assert np.allclose(a, b, atol=1e-5)


def test_save_load_round_trip_and_embedder_check(bank, embedder, tmp_path):
    bank.save(tmp_path / "bank")
    loaded = ReferenceBank.load(tmp_path / "bank", embedder)
    q = bank.index.reconstruct(3)
    assert [h.row["id"] for h in loaded.search(q, k=5).hits] == [h.row["id"] for h in bank.search(q, k=5).hits]
    other = Embedder(replace(TINY, pooling="mean"))
    with pytest.raises(ConfigError, match="bank built with embedder .* cannot be searched with"):
        ReferenceBank.load(tmp_path / "bank", other)
    (tmp_path / "bank" / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable reference bank"):
        ReferenceBank.load(tmp_path / "bank")
    with pytest.raises(DataError, match="bank.json is missing"):
        ReferenceBank.load(tmp_path)


def test_filters_threshold_and_exact_duplicate(bank):
    q = bank.index.reconstruct(0)
    first = bank.search(q, k=1).hits[0]
    assert first.row["embedding_id"] == 0 and first.similarity == pytest.approx(1.0, abs=1e-5)
    own = bank.rows[0]["subject"]
    assert all(h.row["subject"] != own for h in bank.search(q, k=10, exclude_subject=own).hits)
    assert {h.row["modality"] for h in bank.search(q, k=10, modality="XA").hits} == {"XA"}
    none = bank.search(q, k=3, modality="XA", min_similarity=1.01)
    assert none.hits == [] and "no suitable reference" in none.reason
    assert "no reference of modality 'US'" in bank.search(q, modality="US").reason


def test_incremental_add_finds_the_new_entry(bank):
    grown = ReferenceBank.empty(bank.info["embedder"], bank.info["dim"])
    grown.add(bank.rows[:5], bank.index.reconstruct_n(0, 5))
    new = np.random.default_rng(0).normal(size=bank.info["dim"]).astype(np.float32)
    new /= np.linalg.norm(new)
    grown.add([{"id": "new", "modality": "CT", "subject": "x"}], new[None])
    assert len(grown) == 6 and grown.search(new).hits[0].row["id"] == "new"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_every_index_type_finds_exact_duplicates(bank, kind):
    vectors = bank.index.reconstruct_n(0, len(bank))
    other = ReferenceBank.empty(bank.info["embedder"], bank.info["dim"], index=kind, expected=len(bank))
    other.add(bank.rows, vectors)
    assert other.info["index"] == kind
    if kind == "ivf":
        other.index.nprobe = other.index.nlist  # exhaustive probing: exact on a small bank
    for i in (0, len(bank) // 2, len(bank) - 1):
        assert other.search(vectors[i]).hits[0].row["embedding_id"] == i


def test_recall_on_phantoms(bank, embedder, dataset):
    r = recall_at_k(bank, embedder, dataset, split="test")
    print("retrieval recall (tiny, random weights):", r)
    assert r["queries"] >= 4
    assert r["modality@1"] == 1.0  # CT and angiograms never confused, even by a random network
    assert r["pose@5"] >= r["pose@1"] > 0


def test_bad_config():
    with pytest.raises(ConfigError, match="retrieval.index"):
        RetrievalConfig(index="lsh").validate()
