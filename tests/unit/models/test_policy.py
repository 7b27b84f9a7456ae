"""The tiny Qwen2.5-VL policy: offline build through from_pretrained, <Seg>, LoRA, gradients, save/load."""

import numpy as np
import pytest
import torch

from rau_ray.data.phantoms import ct_abdomen
from rau_ray.errors import ConfigError
from rau_ray.models import prompts
from rau_ray.models.policy import TINY, Policy, PolicyConfig, load_policy


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return load_policy(TINY)


@pytest.fixture(scope="module")
def example():
    s = ct_abdomen.generate_2d(0, 0, size=96)
    ref, tgt = prompts.to_pil(s[0].image), prompts.to_pil(s[2].image)
    msgs = prompts.build_messages("segment", ref, {"liver": [10, 10, 50, 60], "aorta": [40, 50, 48, 58]}, tgt,
                                  structure="liver")
    return msgs, prompts.build_answer("segment", label="liver", box=[4, 8, 30, 40], think="left of the aorta")


def test_seg_is_one_token_and_embeddings_resized(policy):
    tok = policy.tokenizer
    assert tok("<Seg>", add_special_tokens=False).input_ids == [policy.seg_token_id]
    assert policy.model.get_input_embeddings().weight.shape[0] >= len(tok) > policy.seg_token_id
    for special in ("<|image_pad|>", "<|vision_start|>", "<|im_start|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id


def test_lora_parameter_count_matches_hand_formula(policy):
    c = TINY
    head_dim = c.hidden_size // c.num_heads
    kv = c.num_kv_heads * head_dim
    per_layer = c.lora_rank * ((c.hidden_size + c.hidden_size) * 2 + (c.hidden_size + kv) * 2)  # q,o and k,v
    expected = c.num_layers * per_layer + 2 * c.hidden_size  # + the <Seg> rows of embed_tokens and lm_head
    assert policy.parameter_counts()["trainable"] == expected
    assert policy.parameter_counts()["total"] > 20 * expected


def test_labels_cover_only_the_completion(policy, example):
    msgs, completion = example
    inputs = policy.inputs_for([msgs], [completion])
    labelled = inputs["input_ids"][0][inputs["labels"][0] != -100]
    text = policy.tokenizer.decode(labelled)
    assert text.startswith("<think>") and text.rstrip().endswith("<|im_end|>")
    assert inputs["image_grid_thw"].shape == (2, 3)  # reference and target


def test_gradients_reach_exactly_the_trainable_parameters(policy, example):
    msgs, completion = example
    policy.model.zero_grad()
    loss = policy.model(**policy.inputs_for([msgs], [completion])).loss
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in policy.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0 or "lora_A" in name, name  # B starts at 0
        else:
            assert p.grad is None, name
    policy.model.zero_grad()


def test_generate_and_seg_hidden_states(policy, example):
    msgs, completion = example
    texts = policy.generate([msgs, msgs], max_new_tokens=8)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[1]  # greedy, left-padded batch: same input, same output
    h = policy.seg_hidden_states(msgs, completion)
    assert h.shape == (1, TINY.hidden_size) and torch.isfinite(h).all()
    two = completion.replace("</answer>", "</answer><Seg>")
    assert policy.seg_hidden_states(msgs, two).shape == (2, TINY.hidden_size)


def test_save_load_round_trip_gives_identical_logits(policy, example, tmp_path):
    msgs, completion = example
    with torch.no_grad():  # make the adapter non-trivial first
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.save(tmp_path / "policy")
    assert (tmp_path / "policy" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = Policy.load(tmp_path / "policy")
    assert loaded.seg_token_id == policy.seg_token_id
    policy.model.eval()
    with torch.no_grad():
        a = policy.model(**policy.inputs_for([msgs], [completion])).logits
        b = loaded.model(**loaded.inputs_for([msgs], [completion])).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match="policy.dtype"):
        PolicyConfig(dtype="float8").validate()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA GPU"):
            PolicyConfig(load_in_4bit=True).validate()
