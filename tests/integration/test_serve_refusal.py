"""Serving a segmenter with a policy it was not trained on: the real Serve app answers 503 naming both, never a mask."""

import json
import socket
import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save_file

from rau_ray.errors import ConfigError
from rau_ray.models import checkpoint as ck

SFT = {"manifest": "m.jsonl", "name": "sft", "model": {"profile": "tiny"}, "split": "train", "zero_stage": 2,
       "tasks": ["label"], "seed": 0}
SEG = {"manifest": "m.jsonl", "name": "seg", "mode": "rau", "model": {"profile": "tiny"}, "train_split": "train",
       "seed": 0}


def _write(folder, weights, config):
    folder.mkdir(parents=True)
    save_file(weights, str(folder / ck.WEIGHTS))
    (folder / ck.STATE).write_text(json.dumps({"step": 1, "config": config}))
    return str(folder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_mismatched_pair_is_refused_with_503_naming_both(ray_cluster, tmp_path):
    from ray import serve

    from rau_ray.serve.app import start, stop

    own = _write(tmp_path / "own-policy", {"w": torch.ones(2)}, SFT)
    other = _write(tmp_path / "other-policy", {"w": torch.full((2,), 2.0)}, SFT)
    seg = _write(tmp_path / "segmenter", {"projector.0.weight": torch.zeros(1)},
                 {**SEG, "policy_checkpoint": own, "policy_sha256": ck.weights_digest(ck.read_checkpoint(own))})
    port = _free_port()
    try:
        with pytest.raises(ConfigError, match="refuses to serve: the segmenter .*segmenter.* not on the sft policy "
                                              ".*other-policy"):
            start(profile="tiny", port=port, policy_checkpoint=other, segmenter_checkpoint=seg, timeout_s=240)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/healthz", timeout=10) as r:  # alive, so the reason can be read
            assert r.status == 200
        for path in ("/readyz", "/v1/structures"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(base + path, timeout=10)
            assert e.value.code == 503
            error = json.loads(e.value.read())["error"]
            assert "segmenter" in error and "other-policy" in error and "own-policy" in error, error
        request = urllib.request.Request(base + "/v1/segment", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 503
    finally:
        stop()
    assert not serve.status().applications
