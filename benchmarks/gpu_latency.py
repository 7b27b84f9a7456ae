"""Benchmark for a lent GPU: the paper profile at full size with random weights, bf16 — image embedding, 64-token
generation and a full RAU ``predict`` (medians after warm-up), against SpinalSAM-R1's < 800 ms per interaction.

Random weights give real latency: the architecture (Qwen2.5-VL-7B, SAM2.1 hiera-large at 1024 px, DINOv2-base) is
what costs time. The tokenizer/processor are the offline tiny ones with the paper's pixel bounds (the vocabulary
size is the 7B's). ``--scale tiny`` runs the same code on the tiny profile (a CPU smoke test of this script).
Run: ``python benchmarks/gpu_latency.py [--repeats 20] [--scale paper|tiny] [--device cuda]``.
"""

import argparse
import json
import platform
import statistics
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
    from peft import get_peft_model
    from sam2.build_sam import build_sam2
    from transformers import AutoProcessor, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from rau_ray.models import pretrained
    from rau_ray.models.describe import QWEN25_VL_7B
    from rau_ray.models.fusion import RAUSegmenter
    from rau_ray.models.policy import TINY, Policy, _add_project_tokens, _lora_config, _save_tiny, _tied

    cfg = get_profile("paper")
    tiny_path = pretrained.resolve("tiny", "policy", lambda f: _save_tiny(TINY, f),
                                   {"benchmark": "processor", "vocab": TINY.vocab_size})
    processor = AutoProcessor.from_pretrained(tiny_path)
    processor.image_processor.size = {"shortest_edge": cfg.policy.min_pixels, "longest_edge": cfg.policy.max_pixels}
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                      "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    arch = json.loads(json.dumps(QWEN25_VL_7B))
    arch["text_config"].update(bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                               pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(**arch, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    seg_id = _add_project_tokens(model, processor)
    lora = _lora_config(cfg.policy, seg_id, _tied(model))  # the <Seg> rows of lm_head only when it is not tied
    policy = Policy(get_peft_model(model, lora).eval(), processor, cfg.policy)
    sam = build_sam2(cfg.sam2.config, None, device=device, hydra_overrides_extra=cfg.sam2.hydra_overrides())
    segmenter = RAUSegmenter(sam, cfg.fusion).to(device)  # fp32 weights under bf16 autocast, as SAM2 runs
    return RAUModel(replace(cfg, max_new_tokens=64), policy, segmenter)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--scale", choices=("paper", "tiny"), default="paper")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    model = paper_model(a.device) if a.scale == "paper" else RAUModel.build(replace(get_profile("tiny"),
                                                                                   max_new_tokens=64))
    upper = [ct_abdomen.generate_2d(0, subject, size=512, slices=4)[-1] for subject in (1, 2)]  # liver level
    ref = Reference(upper[0].image, upper[0].label, upper[0].labels)
    target = upper[1].image
    tgt_u8 = np.asarray(prompts.to_pil(target))
    seg = model.segmenter
    messages = prompts.build_messages("segment", prompts.to_pil(ref.image), {"liver": [10, 10, 200, 200]},
                                      prompts.to_pil(target), structure="liver")
    inputs = model.policy.inputs_for([messages])
    autocast = sam2_autocast(a.device)  # SAM2 as the Serve Segmenter runs it: bf16 on CUDA, fp32 on CPU

    def generate64():
        with torch.no_grad():
            model.policy.model.generate(**inputs, max_new_tokens=64, min_new_tokens=64, do_sample=False)

    def full_predict():
        model._embeddings.clear()  # a new image: the encoder runs
        with autocast:
            model.predict(target, "liver", reference=ref)

    def cached_predict():
        with autocast:
            model.predict(target, "liver", reference=ref)

    with autocast:
        emb_ms = median_ms(lambda: seg.set_image(tgt_u8), a.repeats, a.device)
    result = {
        "date": time.strftime("%Y-%m-%d"), "scale": a.scale, "device": a.device,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor(),
        "repeats": a.repeats,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "sam2_image_embedding_ms": emb_ms,
        "generate_64_tokens_ms": median_ms(generate64, a.repeats, a.device),
        "predict_full_ms": median_ms(full_predict, a.repeats, a.device),
        "predict_cached_embeddings_ms": median_ms(cached_predict, a.repeats, a.device),
        "target_ms": 800,
    }
    if a.device.startswith("cuda"):
        result["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
