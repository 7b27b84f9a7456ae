"""A serving process needs no training stack: a fresh interpreter imports every module of rau_ray.serve and builds
the Retriever, Policy and Segmenter replicas' models (tiny profile, CPU), and neither DeepSpeed nor trl (nor
datasets, which only trl uses) gets imported — so ``pip install '.[serve,cpu]'`` (no [train]) serves; the
Commander's module imports no model stack at all.
Run: ``.venv/bin/pytest tests/integration/test_serving_imports.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINING_ONLY = ("deepspeed", "trl", "datasets")

SCRIPT = """
import importlib, json, pkgutil, sys
import rau_ray.serve
for m in pkgutil.walk_packages(rau_ray.serve.__path__, "rau_ray.serve."):
    importlib.import_module(m.name)
from rau_ray.serve import deployments
deployments.Retriever.func_or_class(phantom_subjects=2, phantom_size=64)
deployments.Policy.func_or_class()
deployments.Segmenter.func_or_class()
print(json.dumps(sorted(m.split(".")[0] for m in sys.modules)))
"""


def test_serving_replicas_import_no_training_package(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # the session's model cache (tests/conftest.py); temp files here
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert {"torch", "sam2", "faiss", "peft", "fastapi", "ray"} <= loaded  # the replicas were really built
    assert not loaded & set(TRAINING_ONLY), sorted(loaded & set(TRAINING_ONLY))


def test_the_commander_replica_imports_no_model_stack():
    """The Commander holds no model: its module (what its replica process imports) pulls in neither torch nor
    transformers, so the replica starts in about a second."""
    script = "import json, sys; import rau_ray.serve.commander; print(json.dumps(sorted(sys.modules)))"
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = {m.split(".")[0] for m in json.loads(r.stdout.strip().splitlines()[-1])}
    assert "ray" in loaded and "rau_ray" in loaded
    assert not loaded & {"torch", "transformers", "peft", "sam2", "faiss"}, sorted(loaded)
