"""Benchmark: tiny-profile latency on this CPU — SAM2 image embedding vs a prompt on the cached embedding, and a
full RAU ``predict`` with a cold vs a cached target embedding. Medians after warm-up, all in one process.
Run: ``.venv/bin/python benchmarks/predict_latency.py [--repeats 20]``.
"""

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

from rau_ray.data.formats import apply_window
from rau_ray.data.phantoms import ct_abdomen
from rau_ray.models.profiles import get_profile
from rau_ray.models.rau import RAUModel, Reference
from rau_ray.models.sam2_builder import embed_image, predict_with_prompts


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--size", type=int, default=192, help="phantom image side")
    p.add_argument("--paper-sam2-repeats", type=int, default=3,
                   help="also time SAM2.1 hiera-large (random weights, 1024 px) on this CPU; 0 skips it")
    a = p.parse_args()
    torch.manual_seed(0)
    cfg = get_profile("tiny")
    model = RAUModel.build(cfg)
    samples = [s for subject in range(a.repeats + 2) for s in ct_abdomen.generate_2d(3, subject, size=a.size)[2:3]]
    ref = Reference(samples[0].image, samples[0].label, samples[0].labels)
    images = [apply_window(s.image, "abdomen") for s in samples]
    predictor = model.segmenter.predictor
    emb = embed_image(predictor, images[1])
    it = iter(range(10**9))

    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "image_side": a.size, "sam2_input": cfg.sam2.image_size, "repeats": a.repeats,
        "sam2_image_embedding_ms": median_ms(lambda: embed_image(predictor, images[1 + next(it) % len(images[1:])]),
                                             a.repeats),
        "sam2_point_prompt_on_cached_embedding_ms": median_ms(
            lambda: predict_with_prompts(predictor, emb, points=np.array([[60, 80]]), labels=np.array([1])),
            a.repeats),
    }
    model.predict(samples[1].image, "liver", reference=ref)  # warm the reference embedding into the cache
    cold = iter(samples[2:])
    result["rau_predict_new_target_ms"] = median_ms(
        lambda: model.predict(next(cold).image, "liver", reference=ref), a.repeats - 1)
    result["rau_predict_cached_target_ms"] = median_ms(
        lambda: model.predict(samples[1].image, "aorta", reference=ref), a.repeats)
    p = model.predict(samples[1].image, "liver", reference=ref)
    result["predict_stage_ms"] = {k: round(1000 * v, 2) for k, v in p.timings.items()}
    result["prompt_vs_embedding"] = round(result["sam2_point_prompt_on_cached_embedding_ms"]
                                          / result["sam2_image_embedding_ms"], 3)
    if a.paper_sam2_repeats:
        from sam2.build_sam import build_sam2

        from rau_ray.models.sam2_builder import PAPER, predictor_for

        big = predictor_for(build_sam2(PAPER.config, None, device="cpu", hydra_overrides_extra=PAPER.hydra_overrides()))
        big_image = apply_window(ct_abdomen.generate_2d(3, 0, size=512)[0].image, "abdomen")
        big_emb = embed_image(big, big_image)
        result["paper_sam2_cpu"] = {
            "model": "SAM2.1 hiera-large, random weights, 1024 px input, fp32",
            "image_embedding_ms": median_ms(lambda: embed_image(big, big_image), a.paper_sam2_repeats),
            "point_prompt_on_cached_embedding_ms": median_ms(
                lambda: predict_with_prompts(big, big_emb, points=np.array([[200, 260]]), labels=np.array([1])),
                a.paper_sam2_repeats * 5),
        }
        r = result["paper_sam2_cpu"]
        r["prompt_vs_embedding"] = round(r["point_prompt_on_cached_embedding_ms"] / r["image_embedding_ms"], 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
