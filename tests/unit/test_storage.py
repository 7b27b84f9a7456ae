"""Storage paths: local folders, pyarrow URIs (file://, and s3:// against a real S3-protocol server: moto's, started
by tests/conftest.py), clear errors otherwise; checkpoints, best exports and run summaries in a bucket.
Run: ``.venv/bin/pytest tests/unit/test_storage.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rau_ray import storage
from rau_ray.config import from_dict
from rau_ray.errors import ConfigError, DataError
from rau_ray.storage import download_dir, filesystem, resolve_storage, upload_dir
from rau_ray.train.run import ScaleConfig, build_trainer


def test_local_folder_and_file_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("runs/train") == str(tmp_path / "runs" / "train")  # absolute, as every node needs
    uri = f"file://{tmp_path}/runs"
    assert resolve_storage(uri) == uri
    fs, path = filesystem(uri)
    assert type(fs).__name__ == "LocalFileSystem" and path == f"{tmp_path}/runs"


def test_unknown_scheme_is_refused_at_config_load():
    with pytest.raises(ConfigError, match="scale.storage_path: unknown storage scheme 'sftp'"):
        from_dict(ScaleConfig, {"storage_path": "sftp://host/runs"}, "scale")
    with pytest.raises(ConfigError, match="unknown storage scheme 'foo'"):
        resolve_storage("foo://bucket/x")
    with pytest.raises(ConfigError, match="scale.placement_strategy must be one of PACK, SPREAD"):
        from_dict(ScaleConfig, {"placement_strategy": "EVERYWHERE"}, "scale")
    # a scheme pyarrow knows but cannot open here: the message says why, in one line
    with pytest.raises(ConfigError, match=r"storage_path: cannot open 'hdfs://namenode/runs': .*libjvm") as e:
        resolve_storage("hdfs://namenode/runs")
    assert "\n" not in str(e.value)


def test_s3_without_credentials_or_network_names_them(monkeypatch):
    import pyarrow.fs

    class Unreachable:
        def get_file_info(self, path):
            raise OSError("When getting information for key 'runs' in bucket 'b': AWS Error ACCESS_DENIED\nmore")

    class FakeFileSystem:
        @staticmethod
        def from_uri(uri):
            if "region" not in uri:
                raise OSError("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION\ndetails")
            return Unreachable(), "b/runs"

    monkeypatch.setattr(pyarrow.fs, "FileSystem", FakeFileSystem)
    with pytest.raises(ConfigError, match=r"cannot open 's3://b/runs': When resolving region.*AWS_ACCESS_KEY_ID"):
        resolve_storage("s3://b/runs")
    with pytest.raises(ConfigError, match=r"ACCESS_DENIED; credentials: AWS_ACCESS_KEY_ID") as e:
        resolve_storage("s3://b/runs?region=us-east-1")  # opened, but the bucket cannot be read
    assert "\n" not in str(e.value)


def test_trainer_gets_the_uri_and_the_placement_strategy(tmp_path):
    scale = from_dict(ScaleConfig, {"storage_path": f"file://{tmp_path}/runs", "placement_strategy": "SPREAD"},
                      "scale")
    trainer = build_trainer(lambda config: None, {}, scale, "run")
    assert trainer.run_config.storage_path == f"file://{tmp_path}/runs"
    assert trainer.scaling_config.placement_strategy == "SPREAD"


def test_folders_go_to_and_come_from_a_uri(tmp_path):
    bank = tmp_path / "bank"
    (bank / "sub").mkdir(parents=True)
    (bank / "bank.json").write_text("{}")
    (bank / "sub" / "x.bin").write_bytes(b"\x00\x01")
    dest = f"file://{tmp_path}/store/banks/ct"
    upload_dir(bank, dest)
    assert (tmp_path / "store/banks/ct/sub/x.bin").read_bytes() == b"\x00\x01"
    back = download_dir(dest, tmp_path / "back")
    assert (back / "bank.json").read_text() == "{}" and (back / "sub" / "x.bin").is_file()
    with pytest.raises(DataError, match="no such folder"):
        download_dir(f"file://{tmp_path}/nothing", tmp_path / "x")


# -- s3:// against a real S3-protocol server (moto, tests/conftest.py: s3_endpoint / s3_bucket) -----------------------
def test_files_and_folders_in_a_bucket(s3_bucket):
    root = f"{s3_bucket}/x"
    assert resolve_storage(root) == root  # opened: endpoint and credentials from the environment
    assert not storage.exists(root) and storage.list_dir(root) == []
    assert storage.join(root, "a", "b.txt") == f"{root}/a/b.txt"
    assert storage.join("s3://b/p/?region=eu-west-1", "c") == "s3://b/p/c?region=eu-west-1"
    storage.write_text(storage.join(root, "a", "b.txt"), "hello")
    assert storage.read_text(f"{root}/a/b.txt") == "hello"
    assert storage.is_file(f"{root}/a/b.txt") and storage.is_dir(f"{root}/a") and storage.list_dir(root) == ["a"]
    with pytest.raises(DataError, match="nope.txt: no such file"):
        storage.read_text(f"{root}/nope.txt")
    storage.remove(f"{root}/a")
    assert not storage.exists(f"{root}/a")
    storage.remove(f"{root}/a")  # nothing there: nothing to do


def test_upload_download_and_one_local_copy_per_version(s3_bucket, tmp_path, monkeypatch):
    import pyarrow.fs

    bank = tmp_path / "bank"
    (bank / "sub").mkdir(parents=True)
    for name in ("index.faiss", "metadata.jsonl", "bank.json"):
        (bank / name).write_text(name)
    (bank / "sub" / "x.bin").write_bytes(b"\x00\x01")
    copied, real_copy = [], pyarrow.fs.copy_files
    monkeypatch.setattr(pyarrow.fs, "copy_files",
                        lambda src, dst, **kw: (copied.append(dst), real_copy(src, dst, **kw)))
    dest = f"{s3_bucket}/banks/ct"
    assert upload_dir(bank, dest, last=("bank.json",)) == dest
    assert copied[-1].endswith("banks/ct/bank.json") and len(copied) == 4  # the completeness marker last
    back = download_dir(dest, tmp_path / "back")
    assert (back / "bank.json").read_text() == "bank.json" and (back / "sub" / "x.bin").read_bytes() == b"\x00\x01"

    copied.clear()
    first = storage.local_copy(dest, "bank_dir")
    assert first.is_relative_to(storage.cache_root()) and first.name == "ct" and len(copied) == 1
    assert (first / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert storage.local_copy(dest, "bank_dir") == first and len(copied) == 1  # once: no second download
    storage.write_bytes(f"{dest}/sub/x.bin", b"changed")  # the folder changed: a new copy, the old one untouched
    second = storage.local_copy(dest, "bank_dir")
    assert second != first and (second / "sub" / "x.bin").read_bytes() == b"changed" and len(copied) == 2
    assert (first / "sub" / "x.bin").read_bytes() == b"\x00\x01"
    assert storage.local_copy(f"{dest}/bank.json").read_text() == "bank.json"  # a single file too
    assert storage.local_copy(str(bank)) == bank and storage.local_copy(bank.as_uri()) == bank  # local: no copy
    with pytest.raises(DataError, match=r"bank_dir: s3://.*/banks/nothing: nothing there"):
        storage.local_copy(f"{s3_bucket}/banks/nothing", "bank_dir")
    from rau_ray.models import pretrained

    assert Path(pretrained.resolve(f"{dest}/sub/x.bin", "sam2", None, {})).read_bytes() == b"changed"


def fake_run(folder: Path, steps: list[int]) -> Path:
    """A seg run folder as Ray Train leaves it: checkpoint_* with weights, train_state.json and the history."""
    import torch
    from safetensors.torch import save_file

    for i, step in enumerate(steps):
        ck = folder / f"checkpoint_{i:06d}"
        ck.mkdir(parents=True)
        save_file({"projector.0.weight": torch.full((4, 4), float(step))}, str(ck / "weights.safetensors"))
        (ck / "train_state.json").write_text(json.dumps({"step": step, "config": {
            "mode": "rau", "name": "seg", "model": {"profile": "tiny", "policy": {"lora_rank": 4}}}}))
        (ck / "history.jsonl").write_text("".join(json.dumps({"step": s, "val_dice": s / 10}) + "\n"
                                                  for s in range(step + 1)))
    return folder


def test_checkpoints_exports_and_run_summaries_in_a_bucket(s3_bucket, tmp_path):
    import ray.train

    from rau_ray.models.checkpoint import locate_checkpoint, read_checkpoint, read_history
    from rau_ray.train import grpo
    from rau_ray.train.jobs import summarise
    from rau_ray.tune.results import export_best

    run = f"{s3_bucket}/train/seg"
    upload_dir(fake_run(tmp_path / "seg", [2, 4]), run)
    latest = f"{run}/checkpoint_000001"
    assert locate_checkpoint(run) == latest and read_history(latest)[-1] == {"step": 4, "val_dice": 0.4}
    ck = read_checkpoint(run)  # the loader: only the latest checkpoint is downloaded, into the local cache
    assert ck.kind == "seg" and ck.step == 4 and ck.source == run and ck.path.is_relative_to(storage.cache_root())
    assert sorted(p.name for p in ck.path.parent.iterdir()) == ["checkpoint_000001", "source.txt"]
    assert grpo._sft_checkpoint(run) == latest and grpo._read_state(run)["step"] == 4  # GRPO's sft_checkpoint
    with pytest.raises(DataError, match="sft_checkpoint: .*no such checkpoint folder"):
        grpo._sft_checkpoint(f"{s3_bucket}/train/none")

    sweep = f"{s3_bucket}/tune/sw"
    info = export_best({"trial_id": "t", "val_dice": 0.4, "step": 4}, {"lr": 0.1}, run, sweep, "val_dice", job="seg")
    assert info["source"] == latest and info["path"] == f"{sweep}/best" and info["checkpoint_metric"] == 0.4
    assert json.loads(storage.read_text(f"{sweep}/best.json")) == info and read_checkpoint(f"{sweep}/best").step == 4
    export_best({"trial_id": "t", "val_dice": 0.2, "step": 2}, {}, f"{latest[:-1]}0", sweep, "val_dice")
    assert read_checkpoint(f"{sweep}/best").step == 2  # replaced

    # a Result as Ray Train returns it for a run stored in the bucket: paths inside the filesystem
    s3, path = storage.filesystem(run)
    result = ray.train.Result(metrics={"val_dice": 0.4}, error=None, path=path, _storage_filesystem=s3,
                              checkpoint=ray.train.Checkpoint(f"{path}/checkpoint_000001", filesystem=s3))
    summary = summarise(result, "seg", f"{s3_bucket}/train")
    assert summary["run"] == run and summary["checkpoint"] == latest and summary["curves"] == f"{run}/curves.png"
    assert json.loads(storage.read_text(f"{run}/summary.json")) == summary
    assert storage.read_bytes(f"{run}/curves.png")[:4] == b"\x89PNG"
    assert locate_checkpoint(run) == latest  # summary.json beside the checkpoints changes nothing
