"""Storage paths: local folders, pyarrow URIs (file:// here; s3:// / gs:// on clusters), clear errors otherwise."""

from __future__ import annotations

import pytest

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
