"""`rau models describe`, `rau index build / recall`, `rau command parse` as a user runs them."""

import json

from rau_ray.data.make import MakeConfig, make_dataset


def test_models_describe_tiny(run_cli):
    r = run_cli("models", "describe", "--profile", "tiny", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["profile"] == "tiny"
    assert 0 < d["policy"]["trainable"] < d["policy"]["total"] < 5_000_000
    assert d["cbam_lora_sam2"]["trainable"] < d["cbam_lora_sam2"]["total"]
    assert d["total"] == d["retrieval"]["total"] + d["policy"]["total"] + d["fusion_segmenter"]["total"]


def test_index_build_and_recall(run_cli, tmp_path):
    make_dataset(MakeConfig("ct-abdomen", n=6, out=str(tmp_path / "ct"), size=64), backend="local", progress=False)
    r = run_cli("index", "build", "--manifest", tmp_path / "ct" / "manifest.jsonl", "--out", tmp_path / "bank")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["index"] == "flat" and info["count"] > 0
    assert {p.name for p in (tmp_path / "bank").iterdir()} == {"bank.json", "metadata.jsonl", "index.faiss"}
    r = run_cli("index", "recall", "--bank", tmp_path / "bank", "--manifest", tmp_path / "ct" / "manifest.jsonl")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["modality@1"] == 1.0
    r = run_cli("index", "recall", "--bank", tmp_path, "--manifest", tmp_path / "ct" / "manifest.jsonl")
    assert r.returncode == 2 and "not a reference bank" in r.stderr and "Traceback" not in r.stderr


def test_command_parse(run_cli):
    r = run_cli("command", "parse", "segment the liver then export as nifti")
    assert r.returncode == 0 and [op["op"] for op in json.loads(r.stdout)] == ["segment", "export"]
    r = run_cli("command", "parse", "drop table users")
    assert r.returncode == 2 and "not a command" in r.stderr
