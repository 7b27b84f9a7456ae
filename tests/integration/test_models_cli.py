"""`rau models describe`, `rau index build / recall` (to a folder and to an s3:// bucket), `rau command parse` as a
user runs them. Run: ``.venv/bin/pytest tests/integration/test_models_cli.py``."""

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


def test_index_build_to_a_bucket(run_cli, tmp_path, s3_bucket):
    """``--out s3://...`` (the session's moto server) uploads the bank; loaded from there it answers as built."""
    from rau_ray.models.retrieval import TINY, Embedder, ReferenceBank

    make_dataset(MakeConfig("ct-abdomen", n=4, out=str(tmp_path / "ct"), size=64), backend="local", progress=False)
    uri = f"{s3_bucket}/banks/ct"
    r = run_cli("index", "build", "--manifest", tmp_path / "ct" / "manifest.jsonl", "--out", uri, "--backend", "local")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["out"] == uri
    embedder = Embedder(TINY)
    built = ReferenceBank.build(tmp_path / "ct" / "manifest.jsonl", TINY, backend="local", progress=False)
    loaded = ReferenceBank.load(uri, embedder)
    assert loaded.rows == json.loads(json.dumps(built.rows)) and loaded.info == built.info
    queries = built.index.reconstruct_n(0, len(built))
    assert [[(h.row["id"], round(h.similarity, 5)) for h in res.hits] for res in built.search(queries, k=3)] == \
           [[(h.row["id"], round(h.similarity, 5)) for h in res.hits] for res in loaded.search(queries, k=3)]


def test_command_parse(run_cli):
    r = run_cli("command", "parse", "segment the liver then export as nifti")
    assert r.returncode == 0 and [op["op"] for op in json.loads(r.stdout)] == ["segment", "export"]
    r = run_cli("command", "parse", "drop table users")
    assert r.returncode == 2 and "not a command" in r.stderr
