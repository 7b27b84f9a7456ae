"""Atomic writes: the target is either the old file or the whole new one, never half-written."""

import pytest

from rau_ray.atomic import atomic_dir, atomic_open, atomic_write_text, remove_stale_temps


def test_failure_keeps_old_content_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_remove_stale_temps(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".a.png.x1.tmp").write_bytes(b"partial")
    (tmp_path / "keep.png").write_bytes(b"whole")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["keep.png"]


def test_a_folder_is_replaced_whole_or_left_as_it_was(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in target.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp folder left
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and not (tmp / "old.txt").exists()
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
