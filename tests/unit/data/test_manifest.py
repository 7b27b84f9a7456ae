"""Manifest schema, validation with clear errors, path safety, splits."""

import json
import os

import numpy as np
import pytest

from rau_ray.data import formats
from rau_ray.data.manifest import ManifestRow, Manifests, assign_splits, read_manifest, write_manifest
from rau_ray.errors import DataError

ROW = {"id": "a", "image": "images/a.png", "label": "labels/a.png", "labels": {"1": "liver", "2": "spleen"},
       "modality": "DX", "split": "train", "spacing": [0.5, 0.5], "source": "test", "subject": "s0", "slice": None}


def write_rows(tmp_path, *rows, raw_lines=()):
    p = tmp_path / "manifest.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "".join(line + "\n" for line in raw_lines))
    return p


def make_sample(tmp_path, label_values=(0, 1, 2), name="a"):
    (tmp_path / "images").mkdir(exist_ok=True)
    (tmp_path / "labels").mkdir(exist_ok=True)
    formats.write_png(tmp_path / "images" / f"{name}.png", np.full((8, 8), 100, np.uint8))
    lab = np.zeros((8, 8), np.uint8)
    lab.flat[: len(label_values)] = label_values
    formats.write_png(tmp_path / "labels" / f"{name}.png", lab)


def test_round_trip_and_load(tmp_path):
    make_sample(tmp_path)
    rows = [ManifestRow(**{**ROW, "spacing": (0.5, 0.5)})]
    write_manifest(tmp_path / "manifest.jsonl", rows)
    m = read_manifest(tmp_path)
    assert m.rows == rows
    image, label = m.load(m.rows[0])
    assert image.shape == label.shape == (8, 8) and set(np.unique(label)) == {0, 1, 2}
    assert m.rows[0].label_names == {1: "liver", 2: "spleen"}


@pytest.mark.parametrize("change, message", [
    ({"split": "training"}, "field 'split' is 'training'"),
    ({"spacing": [0.5]}, "field 'spacing' must be"),
    ({"spacing": [0.5, -1]}, "field 'spacing' must be"),
    ({"labels": {"one": "liver"}}, "label key 'one'"),
    ({"labels": {}}, "field 'labels' must be a non-empty"),
    ({"image": "/etc/passwd"}, "is absolute"),
    ({"label": "../../secret.png"}, "escapes the dataset root"),
    ({"colour": "red"}, "unknown field"),
    ({"slice": -3}, "field 'slice'"),
])
def test_bad_rows_name_the_line_and_problem(tmp_path, change, message):
    p = write_rows(tmp_path, ROW, {**ROW, "id": "b", **change})
    with pytest.raises(DataError, match=message) as e:
        read_manifest(p)
    assert f"{p}:2" in str(e.value)


def test_missing_field_bad_json_duplicate_and_empty(tmp_path):
    row = dict(ROW)
    del row["modality"]
    with pytest.raises(DataError, match=r":1: missing field\(s\) modality"):
        read_manifest(write_rows(tmp_path, row))
    with pytest.raises(DataError, match=r":2: not valid JSON"):
        read_manifest(write_rows(tmp_path, ROW, raw_lines=['{"id": ']))
    with pytest.raises(DataError, match="duplicate id 'a'"):
        read_manifest(write_rows(tmp_path, ROW, ROW))
    (tmp_path / "manifest.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no samples"):
        read_manifest(tmp_path / "manifest.jsonl")
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")


def test_symlink_escaping_root_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "ds"
    root.mkdir()
    make_sample(root)
    os.symlink(outside, root / "link")
    m = read_manifest(write_rows(root, {**ROW, "image": "link/a.png"}))
    with pytest.raises(DataError, match="resolves outside the dataset root"):
        m.load(m.rows[0])


def test_label_values_missing_from_names(tmp_path):
    make_sample(tmp_path, label_values=(0, 1, 2, 7))
    m = read_manifest(write_rows(tmp_path, ROW))
    with pytest.raises(DataError, match=r"labels/a.png: label map has value\(s\) \[7\]"):
        m.load(m.rows[0])


def test_missing_image_file_is_named(tmp_path):
    make_sample(tmp_path)
    m = read_manifest(write_rows(tmp_path, {**ROW, "image": "images/missing.png"}))
    with pytest.raises(DataError, match="missing.png"):
        m.load(m.rows[0])


def test_assign_splits_per_subject():
    subjects = [f"s{i:04d}" for i in range(50)]
    splits = assign_splits(subjects, seed=0)
    counts = {s: list(splits.values()).count(s) for s in ("train", "val", "test")}
    assert counts == {"train": 40, "val": 5, "test": 5}
    assert splits == assign_splits(list(reversed(subjects)), seed=0)  # order-independent
    assert splits != assign_splits(subjects, seed=1)
    small = assign_splits(["a", "b", "c"])
    assert sorted(small.values()) == ["test", "train", "val"]


def test_unsupported_image_format_is_named(tmp_path):
    make_sample(tmp_path)
    (tmp_path / "images" / "a.jpg").write_bytes((tmp_path / "images" / "a.png").read_bytes())
    m = read_manifest(write_rows(tmp_path, {**ROW, "image": "images/a.jpg"}))
    with pytest.raises(DataError, match=r"a.jpg: unsupported image format '.jpg'"):
        m.load(m.rows[0])


def test_manifests_reads_each_manifest_once_and_names_a_missing_row(tmp_path):
    make_sample(tmp_path)
    write_manifest(tmp_path / "manifest.jsonl", [ManifestRow(**{**ROW, "spacing": (0.5, 0.5)})])
    manifests = Manifests()
    row, image, label = manifests.sample(tmp_path / "manifest.jsonl", "a")
    assert row.id == "a" and image.shape == label.shape == (8, 8)
    (tmp_path / "manifest.jsonl").unlink()  # read once: later rows come from memory
    assert manifests.row(tmp_path / "manifest.jsonl", "a") is row
    with pytest.raises(DataError, match="no row 'b'"):
        manifests.row(tmp_path / "manifest.jsonl", "b")
