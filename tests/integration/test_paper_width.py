"""Paper width on CPU (issue 21 item 1): the paper profile's models at full width, depth and inputs cut.

``rau_ray.models.paper_cut`` writes Qwen2.5-VL-7B's config with 2 decoder layers and 2 vision blocks (hidden 3584,
its 152064-row vocabulary), DINOv2-base with 2 layers and SAM2.1 hiera-large's widths at 256 px, random bf16 weights,
once for the module; every part loads them by path through the paper profile's code and runs
``benchmarks/paper_width.py``'s functions: one ``predict`` (LoRA on the 3584-wide projections), one SFT step on Ray
Train (DeepSpeed ZeRO-2, sft-paper.yaml; one worker: two hold ~13 GB), one segmenter step on its checkpoint (the seg
job's trainer, in this process), and ``benchmarks/gpu_latency.py --scale paper-cut`` as a script. Each part prints
its wall time and peak RSS. Measured by the benchmark only, over this module's 3-minute budget: the GRPO step (one
worker: 74-92 s and 8.3-8.6 GiB here), the 2-worker jobs, the seg job on Ray Train and a request through gpu.yaml's
graph (BENCHMARKS.md "Paper width on CPU").
"""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from rau_ray.models.paper_cut import DINO_DIR, POLICY_DIR, SAM2_FILE, write_paper_cut

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("paper_width", REPO / "benchmarks" / "paper_width.py")
paper_width = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(paper_width)


def record(name: str, part: dict) -> None:
    """The part's wall time and memory in the test log (``-s`` / a failure's captured output)."""
    print(f"paper width {name}: " + json.dumps({k: part[k] for k in ("wall_s", "peak_rss_gib",
                                                                      "peak_process_rss_gib") if k in part}))


@pytest.fixture(scope="module")
def paper_cut(tmp_path_factory):
    folder = tmp_path_factory.mktemp("paper_cut")
    return folder, write_paper_cut(folder)


@pytest.fixture(scope="module")
def manifest(ct_manifest):
    return ct_manifest(5, 64, 2)


def test_the_models_have_the_papers_widths(paper_cut):
    folder, cfg = paper_cut
    qwen = json.loads((folder / POLICY_DIR / "config.json").read_text())
    text, vision = qwen["text_config"], qwen["vision_config"]
    assert (text["hidden_size"], text["intermediate_size"], text["num_attention_heads"], text["num_key_value_heads"],
            text["vocab_size"], text["num_hidden_layers"]) == (3584, 18944, 28, 4, 152064, 2)
    assert (vision["hidden_size"], vision["out_hidden_size"], vision["intermediate_size"], vision["num_heads"],
            vision["patch_size"], vision["depth"]) == (1280, 3584, 3420, 16, 14, 2)
    with safe_open(str(folder / POLICY_DIR / "model.safetensors"), "pt") as f:
        head = f.get_slice("lm_head.weight")
        assert head.get_shape() == [152064, 3584] and head.get_dtype() == "BF16"
    dino = json.loads((folder / DINO_DIR / "config.json").read_text())
    assert (dino["hidden_size"], dino["num_attention_heads"], dino["patch_size"], dino["num_hidden_layers"]) == (
        768, 12, 14, 2)
    sam = torch.load(folder / SAM2_FILE, map_location="cpu", weights_only=True)["model"]
    assert sam["image_encoder.trunk.patch_embed.proj.weight"].shape[0] == 144  # hiera-large's stage-1 width
    assert sam["image_encoder.neck.convs.0.conv.weight"].shape[:2] == (256, 1152)  # its neck from stage 4's 1152
    assert cfg.profile == "paper" and cfg.policy.model == str(folder.resolve() / POLICY_DIR)
    assert cfg.sam2.image_size == 256 and cfg.fusion.llm_hidden_size == 3584


def test_predict_at_paper_width(paper_cut, manifest):
    _, cfg = paper_cut
    out = paper_width.timed(paper_width.part_predict, cfg, manifest)
    record("predict", out)
    assert out["mask_shape"] == out["target_shape"] == [64, 64] and math.isfinite(out["score"])
    assert (out["embedding_rows"], out["hidden_size"], out["dtype"]) == (152064, 3584, "torch.bfloat16")
    assert out["seg_token_id"] < 152064  # <Seg> took a spare row of the 7B's padded vocabulary: nothing resized
    assert out["sam2_image_size"] == 256
    # LoRA r16 wraps the attention projections of both decoder layers, all reading the 3584-wide stream
    lora = out["lora"]
    assert len(lora) == 8 and all(".language_model.layers." in m["name"] for m in lora)
    assert {(m["name"].rsplit(".", 1)[1], m["in"], m["out"], m["r"]) for m in lora} == {
        ("q_proj", 3584, 3584, 16), ("k_proj", 3584, 512, 16), ("v_proj", 3584, 512, 16), ("o_proj", 3584, 3584, 16)}
    assert 0 < out["parameters"]["trainable"] < 1e6 < 1.6e9 < out["parameters"]["total"]


def test_gpu_latency_script_runs_at_paper_width(paper_cut, monkeypatch, capsys):
    folder, _ = paper_cut
    monkeypatch.setattr(sys, "argv", ["gpu_latency.py", "--scale", "paper-cut", "--models", str(folder),
                                      "--device", "cpu", "--repeats", "1", "--warmup", "0", "--new-tokens", "2"])
    with paper_width.PeakRSS() as rss:
        runpy.run_path(str(REPO / "benchmarks" / "gpu_latency.py"), run_name="__main__")
    out = json.loads(capsys.readouterr().out)
    print(f"paper width gpu_latency.py: {json.dumps(rss.report())}")
    assert out["scale"] == "paper-cut" and out["policy"] == {"hidden_size": 3584, "embedding_rows": 152064,
                                                             "decoder_layers": 2, "dtype": "torch.bfloat16"}
    assert out["sam2_image_size"] == 256
    for key in ("sam2_image_embedding_ms", "generate_2_tokens_ms", "predict_full_ms", "predict_cached_embeddings_ms"):
        assert 0 < out[key] < 120_000, key


def test_sft_and_segmenter_steps_at_paper_width(ray_cluster, paper_cut, manifest, tmp_path):
    folder, _ = paper_cut
    sft = paper_width.timed(paper_width.part_sft, folder, manifest, str(tmp_path / "runs"), workers=1)
    record("sft", sft)
    assert sft["zero_stage"] == 2 and sft["gradient_checkpointing"] and sft["metrics"]["step"] == 1
    assert sft["metrics"]["loss"] > 0 and math.isfinite(sft["metrics"]["loss"]) and "val_format" in sft["metrics"]
    # the adapter: LoRA r16 on 3584-wide inputs (k / v out 512) and the trainable <Seg> rows of embedding and head
    assert {"(16, 3584)", "(3584, 16)", "(512, 16)", "(1, 3584)"} <= set(sft["adapter"]["shapes"])

    seg = paper_width.timed(paper_width.part_seg_step, sft["checkpoint"], folder, manifest)
    record("seg step", seg)
    assert seg["answers"] == "generated" and seg["items"] == 1 and math.isfinite(seg["metrics"]["loss"])
    assert any(shape[1] == 3584 for shape in seg["projector_in"])  # the projector reads the 3584-wide <Seg> state
