"""Benchmark for a lent GPU: the paper profile at full size with random weights, bf16 — image embedding, token
generation and a full RAU ``predict`` (medians after warm-up), against SpinalSAM-R1's < 800 ms per interaction.

Random weights give real latency: the architecture (Qwen2.5-VL-7B, SAM2.1 hiera-large at 1024 px, DINOv2-base) is
what costs time. The tokenizer is the offline tiny one with Qwen2.5-VL's image processor (14 px patches) and the
paper's pixel bounds; the vocabulary size (embedding and output rows) is the 7B's (``rau_ray.models.paper_cut``).
``--scale paper-cut`` runs the same measurements on ``paper_cut``'s models (the paper widths, 2 decoder layers,
SAM2 at 256 px, 56 px policy images), loaded by path through the paper profile: what a CPU test runs so this script
cannot rot before a GPU is lent (``--models DIR``: their folder, written there once). ``--scale tiny``: the tiny
profile.
Run: ``python benchmarks/gpu_latency.py [--repeats 20] [--warmup 2] [--new-tokens 64] [--scale paper|paper-cut|tiny]
[--models DIR] [--device cuda]``.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from rau_ray.data.phantoms import ct_abdomen
from rau_ray.models import prompts
from rau_ray.models.precision import sam2_autocast
from rau_ray.models.profiles import get_profile
from rau_ray.models.rau import RAUModel, Reference


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, repeats: int, device: str, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 1)


def paper_model(device: str) -> RAUModel:
    """The full paper profile, random bf16 weights built on ``device`` (no download, nothing written)."""
    from peft import get_peft_model
    from sam2.build_sam import build_sam2

    from rau_ray.models.fusion import RAUSegmenter
    from rau_ray.models.paper_cut import qwen_config, qwen_processor, random_qwen
    from rau_ray.models.policy import Policy, _add_project_tokens, _lora_config, _tied

    cfg = get_profile("paper")
    processor = qwen_processor(cfg.policy.min_pixels, cfg.policy.max_pixels)
    model = random_qwen(qwen_config(processor.tokenizer, layers=28, vision_blocks=32), cfg.policy.dtype, device)
    seg_id = _add_project_tokens(model, processor)
    lora = _lora_config(cfg.policy, seg_id, _tied(model))  # the <Seg> rows of lm_head only when it is not tied
    policy = Policy(get_peft_model(model, lora).eval(), processor, cfg.policy)
    sam = build_sam2(cfg.sam2.config, None, device=device, hydra_overrides_extra=cfg.sam2.hydra_overrides())
    segmenter = RAUSegmenter(sam, cfg.fusion).to(device)  # fp32 weights under bf16 autocast, as SAM2 runs
    return RAUModel(cfg, policy, segmenter)


def paper_cut_model(device: str, models: str | None) -> RAUModel:
    """``rau_ray.models.paper_cut``'s models (written to ``models``, or a temp folder, once), loaded by path through
    the paper profile's code, on ``device``."""
    from rau_ray.models.paper_cut import write_paper_cut

    cfg = write_paper_cut(models or tempfile.mkdtemp(prefix="rau-paper-cut-"))
    model = RAUModel.build(replace(cfg, sam2=replace(cfg.sam2, device=device)))
    model.policy.model.to(device)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated (and predict's max_new_tokens)")
    p.add_argument("--scale", choices=("paper", "paper-cut", "tiny"), default="paper")
    p.add_argument("--models", help="--scale paper-cut: the folder of its models (written there if missing)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    if a.scale == "paper":
        model = paper_model(a.device)
    elif a.scale == "paper-cut":
        model = paper_cut_model(a.device, a.models)
    else:
        model = RAUModel.build(get_profile("tiny"))
    model.cfg = replace(model.cfg, max_new_tokens=a.new_tokens)
    upper = [ct_abdomen.generate_2d(0, subject, size=512, slices=4)[-1] for subject in (1, 2)]  # liver level
    ref = Reference(upper[0].image, upper[0].label, upper[0].labels)
    target = upper[1].image
    tgt_u8 = np.asarray(prompts.to_pil(target))
    seg = model.segmenter
    messages = prompts.build_messages("segment", prompts.to_pil(ref.image), {"liver": [10, 10, 200, 200]},
                                      prompts.to_pil(target), structure="liver")
    inputs = model.policy.inputs_for([messages])
    autocast = sam2_autocast(a.device)  # SAM2 as the Serve Segmenter runs it: bf16 on CUDA, fp32 on CPU

    def generate():
        with torch.no_grad():
            model.policy.model.generate(**inputs, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                                        do_sample=False)

    def full_predict():
        model._embeddings.clear()  # a new image: the encoder runs
        with autocast:
            model.predict(target, "liver", reference=ref)

    def cached_predict():
        with autocast:
            model.predict(target, "liver", reference=ref)

    with autocast:
        emb_ms = median_ms(lambda: seg.set_image(tgt_u8), a.repeats, a.device, a.warmup)
    result = {
        "date": time.strftime("%Y-%m-%d"), "scale": a.scale, "device": a.device,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor(),
        "repeats": a.repeats, "warmup": a.warmup,
        "policy": {"hidden_size": model.policy.hidden_size,
                   "embedding_rows": int(model.policy.model.get_input_embeddings().weight.shape[0]),
                   "decoder_layers": model.policy.model.get_base_model().config.text_config.num_hidden_layers,
                   "dtype": str(model.policy.model.get_input_embeddings().weight.dtype)},
        "sam2_image_size": int(seg.sam.image_size),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "sam2_image_embedding_ms": emb_ms,
        f"generate_{a.new_tokens}_tokens_ms": median_ms(generate, a.repeats, a.device, a.warmup),
        "predict_full_ms": median_ms(full_predict, a.repeats, a.device, a.warmup),
        "predict_cached_embeddings_ms": median_ms(cached_predict, a.repeats, a.device, a.warmup),
        "target_ms": 800,
    }
    if a.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
