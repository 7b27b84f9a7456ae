"""The reference bank built on a Ray Data actor pool: the same bank as the in-process build, and a bad image on an
actor is a DataError naming the file (tests/unit/models/test_retrieval.py covers the bank itself, without Ray)."""

import shutil
from dataclasses import replace

import numpy as np
import pytest

from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import DataError
from rau_ray.models.retrieval import TINY, ReferenceBank


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval_on_ray")
    make_dataset(MakeConfig("ct-abdomen", n=6, out=str(root / "ct"), size=96), backend="local", progress=False)
    return root / "ct" / "manifest.jsonl"


def vectors(bank: ReferenceBank) -> np.ndarray:
    return bank.index.reconstruct_n(0, len(bank))


def test_ray_build_equals_local_build(manifest, ray_cluster):
    local = ReferenceBank.build(manifest, TINY, split="train", backend="local", progress=False)
    on_ray = ReferenceBank.build(manifest, replace(TINY, batch_size=8), split="train", backend="ray", progress=False)
    assert len(on_ray) == len(local) > 8  # more than one batch
    assert [r["id"] for r in on_ray.rows] == [r["id"] for r in local.rows]  # manifest order
    assert on_ray.info == local.info
    assert np.allclose(vectors(on_ray), vectors(local), atol=1e-5)


def test_a_bad_image_on_a_ray_worker_is_a_data_error(manifest, tmp_path, ray_cluster):
    shutil.copytree(manifest.parent, tmp_path / "ct")
    bad = read_manifest(tmp_path / "ct" / "manifest.jsonl").select(split="train")[2]
    (tmp_path / "ct" / bad.image).write_bytes(b"not a png")
    with pytest.raises(DataError, match=bad.image.split("/")[-1]):
        ReferenceBank.build(tmp_path / "ct" / "manifest.jsonl", TINY, backend="ray", progress=False)
