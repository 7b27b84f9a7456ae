"""DINOv2 embedder + faiss reference bank: offline build, Ray == local, persistence, filters, thresholds, recall;
the torch Flat index (GPU search with faiss-cpu) and the index line a bank logs."""

import importlib.metadata
import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest

from rau_ray.data.formats import apply_window
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.retrieval import (
    TINY,
    Embedder,
    ReferenceBank,
    RetrievalConfig,
    TorchFlatIP,
    _search_params,
    recall_at_k,
)

CT_SUBJECTS, ANGIO_SUBJECTS = 20, 12  # 80 CT slices (4 a subject) + 12 angiograms


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """ct-abdomen (CT) and xray-angio (XA) phantoms, each with its own manifest, and one manifest over both."""
    root = tmp_path_factory.mktemp("retrieval")
    lines = []
    for modality, n in (("ct-abdomen", CT_SUBJECTS), ("xray-angio", ANGIO_SUBJECTS)):
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


def vectors(bank: ReferenceBank) -> np.ndarray:
    return bank.index.reconstruct_n(0, len(bank))


def test_embedder_loads_offline_and_gives_deterministic_unit_vectors(embedder, dataset):
    folder = Path(embedder.model.name_or_path)  # the cached tiny model, opened with from_pretrained
    assert (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file()
    assert type(embedder.model).__name__ == "Dinov2Model" and embedder.dim == 2 * TINY.hidden_size
    manifest = read_manifest(dataset)
    rows = [manifest.select(modality="CT")[0], manifest.select(modality="XA")[0]]
    images = [manifest.load(r)[0] for r in rows]
    assert images[0].dtype == np.float32 and images[1].dtype == np.uint8  # HU and 8-bit grey
    a = embedder.embed(images, [r.modality for r in rows])
    assert a.shape == (2, embedder.dim) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a, Embedder(TINY).embed(images, [r.modality for r in rows]))  # reloaded: same weights
    windowed = embedder.embed([apply_window(images[0], "abdomen")], ["CT"])  # HU is windowed to 8 bits first
    assert np.allclose(windowed[0], a[0], atol=1e-6)
    assert re.fullmatch(rf"tiny\|cls\+mean\|{embedder.dim}\|pretrained-[0-9a-f]{{12}}", embedder.id)  # the shipped


def test_bank_rows_carry_the_manifest_row_and_where_to_load_it(bank, dataset):
    manifest = read_manifest(dataset)
    train = manifest.select(split="train")
    assert len(bank) == len(train) == bank.info["count"]
    row = bank.rows[3]
    assert row["embedding_id"] == 3 and row["manifest"] == str(dataset.resolve())
    assert {k: row[k] for k in ("id", "modality", "subject", "slice")} == {
        "id": train[3].id, "modality": train[3].modality, "subject": train[3].subject, "slice": train[3].slice}
    assert bank.info == {"embedder": Embedder(TINY).id, "dim": 128, "index": "flat", "count": len(train),
                         "metric": "cosine"}


def assert_same_bank(loaded, bank):
    """The same rows and info, and the same hits for a few queries with and without filters."""
    assert loaded.rows == json.loads(json.dumps(bank.rows)) and loaded.info == bank.info
    queries = vectors(bank)[[0, 5, len(bank) - 1]]
    for kwargs in ({}, {"modality": "XA"}, {"exclude_subject": bank.rows[0]["subject"]}):
        a, b = bank.search(queries, k=5, **kwargs), loaded.search(queries, k=5, **kwargs)
        assert [[(h.row["id"], h.similarity) for h in r.hits] for r in a] == \
               [[(h.row["id"], h.similarity) for h in r.hits] for r in b]


def test_save_load_round_trip(bank, embedder, tmp_path):
    bank.save(tmp_path / "bank")
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["bank.json", "index.faiss", "metadata.jsonl"]
    loaded = ReferenceBank.load(tmp_path / "bank", embedder)
    assert_same_bank(loaded, bank)


def test_save_to_a_bucket_and_load_back(bank, embedder, s3_bucket):
    """s3:// (the session's moto server): uploaded with bank.json last, downloaded once into the local cache."""
    from rau_ray import storage

    uri = f"{s3_bucket}/banks/ct"
    assert bank.save(uri) == uri
    assert storage.list_dir(uri) == ["bank.json", "index.faiss", "metadata.jsonl"]
    loaded = ReferenceBank.load(uri, embedder)
    assert_same_bank(loaded, bank)
    with pytest.raises(DataError, match="banks/none/bank.json: missing; .* is not a reference bank"):
        ReferenceBank.load(f"{s3_bucket}/banks/none", embedder)


def test_load_with_another_embedder_is_refused(bank, tmp_path):
    bank.save(tmp_path / "bank")
    # other dimension; same dimension, other weights
    for other in (replace(TINY, pooling="cls"), replace(TINY, init="random")):
        with pytest.raises(ConfigError, match=r"bank built with 'tiny\|cls\+mean\|128\|pretrained-[0-9a-f]+' .* cannot "
                                              r"be searched with 'tiny\|cls"):
            ReferenceBank.load(tmp_path / "bank", Embedder(other))


@pytest.mark.parametrize("name, damage, message", [
    ("index.faiss", b"garbage", "unreadable faiss index"),
    ("metadata.jsonl", b'{"id": "a"}\n{"id": ', "corrupt metadata row"),
    ("bank.json", b"[1, 2]", "corrupt bank description"),
    ("bank.json", None, "missing"),
])
def test_corrupt_or_missing_files_name_the_file(bank, tmp_path, name, damage, message):
    bank.save(tmp_path)
    if damage is None:
        (tmp_path / name).unlink()
    else:
        (tmp_path / name).write_bytes(damage)
    with pytest.raises(DataError, match=f"{name}.*{message}"):
        ReferenceBank.load(tmp_path)


def test_modality_filter_and_subject_exclusion(bank):
    ct = next(i for i, r in enumerate(bank.rows) if r["modality"] == "CT")
    q = vectors(bank)[ct]
    n_xa = sum(r["modality"] == "XA" for r in bank.rows)
    xa = bank.search(q, k=50, modality="XA", min_similarity=-1).hits  # a CT query, angiograms only
    assert len(xa) == n_xa and {h.row["modality"] for h in xa} == {"XA"}
    own = bank.rows[ct]["subject"]
    assert bank.search(q, k=1).hits[0].row["embedding_id"] == ct  # the query itself ...
    hits = bank.search(q, k=10, exclude_subject=own).hits  # ... and its sibling slices are never returned
    assert len(hits) == 10 and all(h.row["subject"] != own for h in hits)
    assert "no reference" in bank.search(q, modality="US").reason


def test_threshold_gives_no_hit_with_a_reason(bank):
    q = vectors(bank)[0]
    none = bank.search(q, k=3, exclude_subject=bank.rows[0]["subject"], min_similarity=1.01)
    assert none.hits == [] and none.reason.startswith("no suitable reference (best similarity ")
    assert none.reason.endswith(" < 1.010)")
    # the tiny profile's threshold (0.6) refuses a cross-modality match: a CT query when only angiograms are allowed
    cross = bank.search(q, modality="XA")
    assert cross.hits == [] and "no suitable reference" in cross.reason


def test_add_grows_the_bank_and_finds_the_new_entry(dataset, embedder):
    ct = ReferenceBank.build(dataset.parent / "ct-abdomen" / "manifest.jsonl", TINY, backend="local", progress=False)
    angio = ReferenceBank.build(dataset.parent / "xray-angio" / "manifest.jsonl", TINY, backend="local",
                                progress=False)
    n = len(ct)
    ct.add(angio.rows, vectors(angio))
    assert len(ct) == ct.info["count"] == n + len(angio) and ct.index.ntotal == len(ct)
    for i in range(len(angio)):
        top = ct.search(vectors(angio)[i]).hits[0]
        assert top.row["id"] == angio.rows[i]["id"] and top.row["embedding_id"] == n + i
        assert top.similarity == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_every_index_type_finds_exact_duplicates_and_filters(bank, kind):
    v = vectors(bank)
    other = ReferenceBank.empty(bank.info["embedder"], bank.info["dim"], index=kind, expected=len(bank))
    other.add(bank.rows, v)
    assert other.info["index"] == kind
    results = other.search(v, k=1)  # a batch of queries: one result each
    assert [r.hits[0].row["embedding_id"] for r in results] == list(range(len(bank)))
    exact = bank.search(v[0], k=5, modality="XA", exclude_subject="s0001", min_similarity=-1)
    filtered = other.search(v[0], k=5, modality="XA", exclude_subject="s0001", min_similarity=-1)
    assert [h.row["id"] for h in filtered.hits] == [h.row["id"] for h in exact.hits]


def test_auto_index_is_exact_for_small_banks_and_hnsw_above(dataset):
    assert ReferenceBank.build(dataset, TINY, backend="local", progress=False).info["index"] == "flat"
    big = ReferenceBank.build(dataset, replace(TINY, exact_below=10), backend="local", progress=False)
    assert big.info["index"] == "hnsw"


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_very_selective_filter_still_finds_its_entry(kind):
    """Inside faiss, HNSW/IVF with a selector that allows 1 of 3000 entries can return nothing (the graph or the
    probed lists never reach it); search then over-fetches without the selector."""
    rng = np.random.default_rng(0)
    v = rng.normal(size=(3000, 16)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    bank = ReferenceBank.empty("synthetic", 16, index=kind, expected=len(v))
    bank.add([{"id": f"e{i}", "modality": "XA" if i == 1234 else "CT", "subject": f"s{i}"} for i in range(len(v))], v)
    params = _search_params(bank.index, faiss.IDSelectorBatch(np.array([1234], np.int64)))
    assert (bank.index.search(v[:20], 1, params=params)[1] == -1).any()  # faiss alone comes short for some
    for q in v[:20]:
        hits = bank.search(q, k=3, modality="XA", min_similarity=-1).hits
        assert [h.row["id"] for h in hits] == ["e1234"]
        assert hits[0].similarity == pytest.approx(float(q @ v[1234]), abs=1e-5)


def test_recall_on_ct_and_angio_phantoms(bank, embedder, dataset):
    r = recall_at_k(bank, embedder, dataset, split="test")
    print(f"\nrecall (tiny random DINOv2, bank {len(bank)} = train of {CT_SUBJECTS} CT subjects x 4 slices + "
          f"{ANGIO_SUBJECTS} angio; test queries): {r}")
    assert r["queries"] >= 8 and set(r) == {"queries", "modality@1", "modality@5", "pose@1", "pose@5",
                                           "below_threshold"}
    # even random weights separate CT from angiograms (same-modality cosine > 0.9, cross-modality < 0)
    assert r["modality@1"] == r["modality@5"] == 1.0
    assert r["below_threshold"] == 0.0
    assert 0 < r["pose@1"] <= r["pose@5"]  # pose: above zero, not more (random weights, a handful of queries)


def test_bad_config_and_queries(bank):
    with pytest.raises(ConfigError, match="retrieval.index"):
        RetrievalConfig(index="lsh").validate()
    with pytest.raises(ConfigError, match="retrieval.pooling"):
        RetrievalConfig(pooling="max").validate()
    with pytest.raises(ValueError, match="128-d"):
        bank.search(np.zeros(64, np.float32))
    with pytest.raises(ValueError, match="shape"):
        bank.add([{"id": "x"}], np.zeros((1, 64), np.float32))


def test_torch_flat_index_answers_as_faiss_flat(bank, tmp_path):
    """TorchFlatIP (a Flat bank on a GPU whose faiss is faiss-cpu) searches as IndexFlatIP does, filters included
    (it takes no selector: the bank over-fetches), and is saved as a faiss Flat index. Here on the CPU device."""
    v = vectors(bank)
    torch_index = TorchFlatIP(v.shape[1], "cpu", v[:10])
    torch_index.add(v[10:])
    flat = faiss.IndexFlatIP(v.shape[1])
    flat.add(v)
    q = v[:7] + np.random.default_rng(0).normal(scale=0.05, size=v[:7].shape).astype(np.float32)
    for k in (1, 5, len(v) + 3):  # past the entries: -1 ids, as faiss pads
        (s1, i1), (s2, i2) = torch_index.search(q, k), flat.search(q, k)
        assert np.array_equal(i1, i2) and np.allclose(s1[i1 >= 0], s2[i2 >= 0], atol=1e-5)
    assert (i1[:, len(v):] == -1).all()
    on_torch = ReferenceBank(torch_index, bank.rows, dict(bank.info))
    assert _search_params(torch_index, faiss.IDSelectorBatch(np.arange(3, dtype=np.int64))) is None
    for kwargs in ({"k": 5}, {"k": 5, "modality": "XA", "exclude_subject": "s0001"}, {"k": 50, "modality": "CT"}):
        exact, mine = bank.search(v[0], min_similarity=-1, **kwargs), on_torch.search(v[0], min_similarity=-1, **kwargs)
        assert [h.row["id"] for h in mine.hits] == [h.row["id"] for h in exact.hits], kwargs
    loaded = ReferenceBank.load(on_torch.save(tmp_path / "bank"))
    assert isinstance(loaded.index, faiss.IndexFlatIP) and np.array_equal(vectors(loaded), v)


def test_a_bank_logs_its_index_and_faiss_build(bank, tmp_path, caplog):
    bank.save(tmp_path / "bank")
    with caplog.at_level(logging.INFO, logger="rau_ray.retrieval"):
        loaded = ReferenceBank.load(tmp_path / "bank")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "rau_ray.retrieval"]
    assert line.startswith(f"reference bank loaded from {tmp_path / 'bank'}: flat index (IndexFlatIP) on the CPU, "
                           f"{len(bank)} entries")
    assert f"faiss-cpu {importlib.metadata.version('faiss-cpu')}" in line and "no GPU support" in line
    assert loaded.index_description() in line
