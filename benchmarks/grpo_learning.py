"""GRPO learning check on the tiny profile: SFT (label task) -> GRPO; mean accuracy reward of sampled rollouts
(trl's sampling, temperature T) and greedy accuracy, SFT start vs GRPO end, on the train and val splits.

Run: ``rau data make --modality ct-abdomen --n 24 --size 192 --out runs/data/ct24`` then
``GRPO_LR=0.001 python benchmarks/grpo_learning.py runs/data/ct24/manifest.jsonl runs/bench/grpo null grpo 100``
(args: manifest, run folder, structures JSON or null, GRPO run name, SFT steps). About 5-8 minutes on 2 cores.
"""
import json
import os
import sys
import time

import ray
import torch

ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
from rau_ray.config import from_dict
from rau_ray.data.manifest import read_manifest
from rau_ray.data.tasks import make_pairs
from rau_ray.models.checkpoint import read_history, read_weights_and_state
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import model_config_from
from rau_ray.train.grpo import GRPOJobConfig, load_adapter, run_grpo
from rau_ray.train.policy_examples import PolicyExamples
from rau_ray.train.rewards import accuracy_score, format_score
from rau_ray.train.sft import SFTConfig, run_sft

DATA, RUNS, T = sys.argv[1], sys.argv[2], 0.4
MODEL = {"profile": "tiny", "policy": {"lora_rank": 32, "lora_alpha": 64, "lora_targets": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}
scale = {"storage_path": RUNS, "max_failures": 2}
STRUCT = json.loads(sys.argv[3]) if len(sys.argv) > 3 else None
GNAME = sys.argv[4] if len(sys.argv) > 4 else "grpo"
SFT_STEPS = int(sys.argv[5]) if len(sys.argv) > 5 else 100
SNAME = "sft" if SFT_STEPS == 100 else f"sft{SFT_STEPS}"
t0 = time.time()
from pathlib import Path


class _R: pass
if Path(RUNS, SNAME).is_dir():
    import glob
    sft = _R(); sft.checkpoint = _R(); sft.checkpoint.path = sorted(glob.glob(RUNS + f"/{SNAME}/checkpoint_2*"))[-1]
    sft.metrics = {"loss": None, "val_format": None, "val_accuracy": None}
else:
  sft = run_sft(from_dict(SFTConfig, dict(manifest=DATA, name=SNAME, model=MODEL, scale=scale, tasks=["label"],
                                        batch_size=4, lr=0.003, epochs=20, max_steps=SFT_STEPS, log_every=20,
                                        eval_items=24, max_new_tokens=110, checkpoint_every=SFT_STEPS)))
t_sft = time.time() - t0
print("SFT", round(t_sft), "s", {k: sft.metrics[k] for k in ("loss", "val_format", "val_accuracy")}, flush=True)
t0 = time.time()
grpo = run_grpo(from_dict(GRPOJobConfig, dict(manifest=DATA, name=GNAME, structures=STRUCT, sft_checkpoint=sft.checkpoint.path,
                                              scale=scale, tasks=["label"], num_generations=8, batch_size=8,
                                              temperature=T, max_completion_length=128, beta=0.04, lr=float(os.environ.get("GRPO_LR", "0.001")),
                                              format_weight=0.5, max_steps=100, checkpoint_every=50)))
t_grpo = time.time() - t0
history = read_history(grpo.checkpoint.path)
mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
print("GRPO", round(t_grpo), "s; training-log accuracy reward, steps 1-10:", round(mean(history[:10], "rewards/accuracy/mean"), 3),
      "steps 91-100:", round(mean(history[-10:], "rewards/accuracy/mean"), 3),
      "| format", round(mean(history[:10], "rewards/format/mean"), 3), "->", round(mean(history[-10:], "rewards/format/mean"), 3),
      "| kl (last 10)", round(mean(history[-10:], "kl"), 3), flush=True)


def evaluate(checkpoint, split, k=8):
    """Mean rewards of k samples per prompt with trl's sampling (temperature T, no top-k/top-p), and greedy."""
    weights, state = read_weights_and_state(checkpoint)
    policy = load_policy(model_config_from(state["config"]["model"]).policy)
    load_adapter(policy.model, weights)
    policy.model.eval()
    examples = PolicyExamples(policy.processor)
    items = make_pairs(read_manifest(DATA), split=split, tasks=("label",), seed=0)
    items = [i for i in items if STRUCT is None or i["structure"] in STRUCT]
    from collections import Counter

    from rau_ray.models.prompts import parse_answer
    said, right = Counter(), Counter()
    torch.manual_seed(123)
    acc = fmt = greedy = n = 0
    for item in items:
        messages, solution = examples.example(item)
        size = examples.truth(item)["image_size"]
        inputs = policy.inputs_for([messages] * k)
        with torch.no_grad():
            out = policy.model.generate(**inputs, max_new_tokens=128, do_sample=True, temperature=T, top_k=0, top_p=1.0)
        for ids in out[:, inputs["input_ids"].shape[1]:].tolist():
            text = policy.decode_completion(ids)
            acc += accuracy_score(text, "label", solution, size); fmt += format_score(text, "label", size); n += 1
        g = policy.generate([messages], max_new_tokens=128)[0]
        greedy += accuracy_score(g, "label", solution, size)
        p = parse_answer(g, "label"); lab = p.label if p else "<invalid>"; said[lab] += 1; right[lab] += lab == item["structure"]
    return {"split": split, "prompts": len(items), "samples": n, "format": round(fmt / n, 3),
            "accuracy": round(acc / n, 3), "greedy_accuracy": round(greedy / len(items), 3),
            "greedy_labels (said, right)": {k: (v, right[k]) for k, v in said.most_common()}}


for split in ("train",) if STRUCT else ("train", "val"):
    print("SFT start ", evaluate(sft.checkpoint.path, split), flush=True)
    print("GRPO end  ", evaluate(grpo.checkpoint.path, split), flush=True)
