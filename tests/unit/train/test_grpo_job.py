"""GRPO job pieces in one process (no Ray): config errors, trl rows, the KL reference copy and the head patch."""

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from rau_ray.config import from_dict
from rau_ray.data.manifest import read_manifest
from rau_ray.data.tasks import make_pairs
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.checkpoint import STATE, WEIGHTS
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import ModelConfig, get_profile
from rau_ray.models.prompts import resized_size
from rau_ray.train.grpo import (
    GRPOJobConfig,
    Prompts,
    _copy_to_reference,
    _patch_output_head,
    adapter_state,
    load_adapter,
    vllm_args,
)
from rau_ray.train.rewards import accuracy_reward, format_reward


@pytest.fixture(scope="module")
def manifest(ct_manifest):
    return ct_manifest(n=4, size=64, slices=1)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return load_policy(get_profile("tiny").policy)


def job(manifest, **fields) -> GRPOJobConfig:
    return from_dict(GRPOJobConfig, {"manifest": manifest, **fields}, "test")


def test_bad_configs_are_clear_errors(manifest, tmp_path):
    with pytest.raises(ConfigError, match="multiple of num_generations"):
        job(manifest, batch_size=3, num_generations=4)
    with pytest.raises(ConfigError, match="at least 2"):
        job(manifest, num_generations=1, batch_size=1)
    with pytest.raises(ConfigError, match="multiple of log_every"):
        job(manifest, log_every=3, checkpoint_every=10)
    with pytest.raises(ConfigError, match="zero_stage 3 is not supported"):
        job(manifest, zero_stage=3)
    with pytest.raises(ConfigError, match="subset"):
        job(manifest, tasks=["label", "caption"])
    with pytest.raises(ConfigError, match="non-negative"):
        job(manifest, mask_dice_weight=-1.0)
    with pytest.raises(ConfigError, match="unknown field"):
        job(manifest, zero=2)
    with pytest.raises(DataError, match="not a training checkpoint"):
        job(manifest, sft_checkpoint=str(tmp_path)).model_config()


def test_use_vllm_is_refused_at_load_without_gpus_or_vllm(manifest):
    """use_vllm (trl's colocate mode) needs GPUs and the vllm package: a config asking for it without either is a
    ConfigError naming the setting, raised by from_dict (config load), before any worker starts."""
    with pytest.raises(ConfigError, match="use_vllm: vLLM generates on GPUs only"):
        job(manifest, use_vllm=True)  # the tiny default: CPU workers
    assert importlib.util.find_spec("vllm") is None  # this machine (CI) has no vllm: the next check must refuse
    gpu = {"num_workers": 1, "use_gpu": True}
    with pytest.raises(ConfigError, match="use_vllm: the vllm package is not installed"):
        job(manifest, use_vllm=True, scale=gpu)
    with pytest.raises(ConfigError, match="zero_stage 3 is not supported"):  # ZeRO-3 stays refused first
        job(manifest, use_vllm=True, scale=gpu, zero_stage=3)
    assert job(manifest, scale=gpu).use_vllm is False and vllm_args(job(manifest)) == {}


def test_use_vllm_reaches_trls_config_as_colocate(manifest, tmp_path):
    from trl import GRPOConfig

    cfg = replace(job(manifest), use_vllm=True)  # validated elsewhere (a GPU machine with vllm)
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **vllm_args(cfg))
    assert args.use_vllm is True and args.vllm_mode == "colocate"
    plain = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **vllm_args(job(manifest)))
    assert plain.use_vllm is False


def test_model_section_follows_the_sft_checkpoint(manifest, tmp_path):
    (tmp_path / WEIGHTS).write_bytes(b"")
    (tmp_path / STATE).write_text(json.dumps({"step": 5, "config": {"model": {"profile": "tiny",
                                                                               "policy": {"lora_rank": 4}}}}))
    assert job(manifest, sft_checkpoint=str(tmp_path)).model_config().policy.lora_rank == 4
    assert job(manifest, sft_checkpoint=str(tmp_path), model={"profile": "tiny"}).model_config() == ModelConfig()
    assert job(manifest).model_config() == ModelConfig()


def test_rows_are_the_sft_prompts_with_reward_columns(manifest, policy):
    items = make_pairs(read_manifest(manifest), tasks=("label", "all_boxes"))
    prompts = Prompts(policy.processor)
    batch = prompts({k: [i[k] for i in items[:2]] for k in items[0]})  # how datasets' with_transform calls it
    assert len(batch["prompt"]) == 2 and batch["task"] == [items[0]["task"], items[1]["task"]]
    for i, _item in enumerate(items[:2]):
        messages = batch["prompt"][i]
        images = [c for m in messages if isinstance(m["content"], list) for c in m["content"] if c["type"] == "image"]
        assert len(images) == 2  # reference + target
        w, h = batch["image_size"][i]  # the target as the processor resizes it: where answer boxes live
        assert (h, w) == tuple(resized_size(images[1]["image"].height, images[1]["image"].width, policy.processor))
        kwargs = {k: [batch[k][i]] for k in ("task", "solution", "image_size")}
        assert accuracy_reward(None, [batch["solution"][i]], **kwargs) == [pytest.approx(1.0)]
        assert format_reward(None, [batch["solution"][i]], **kwargs) == [1.0]
        # trl renders them with the policy's chat template exactly as the SFT does
        rendered = policy.processor.apply_chat_template([messages], add_generation_prompt=True, tokenize=True,
                                                        return_dict=True)
        assert rendered["input_ids"][0] == policy.inputs_for([messages])["input_ids"][0].tolist()


def test_reference_copy_and_head_patch_cover_the_seg_rows(policy):
    model = policy.model
    model.add_adapter("ref", model.peft_config["default"])  # what trl does for a peft policy with beta > 0
    try:
        rows = {n: p for n, p in model.named_parameters() if n.endswith(".default") and "trainable_tokens" in n}
        assert rows  # the <Seg> rows of the embedding and the output head
        with torch.no_grad():
            for p in rows.values():
                p.add_(1.0)
        _copy_to_reference(model)
        params = dict(model.named_parameters())
        for name, p in rows.items():
            assert torch.equal(params[name[:-len("default")] + "ref"], p)
        head = model.get_output_embeddings()
        _patch_output_head(model)
        assert head.bias is None
        seg = policy.seg_token_id
        assert torch.equal(head.weight[seg], next(p for n, p in rows.items() if "lm_head" in n)[0])
        before = adapter_state(model)
        assert not any(".ref" in k for k in before)
        with torch.no_grad():
            for p in rows.values():
                p.sub_(1.0)
        load_adapter(model, before)  # round trip into `default`
        assert all(torch.equal(adapter_state(model)[k], v) for k, v in before.items())
    finally:
        model.delete_adapter("ref")


def test_an_adapter_of_another_shape_is_a_config_error(policy):
    weights = adapter_state(policy.model)
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])
    with pytest.raises(ConfigError, match="does not fit this policy"):
        load_adapter(policy.model, weights, "other.safetensors")
