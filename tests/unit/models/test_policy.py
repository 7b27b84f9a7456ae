"""The tiny Qwen2.5-VL policy: offline build through from_pretrained, <Seg>, LoRA, gradients, save/load."""

import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from rau_ray.data.phantoms import ct_abdomen
from rau_ray.errors import ConfigError
from rau_ray.models import prompts
from rau_ray.models.policy import QWEN_SPECIAL, TINY, Policy, PolicyConfig, load_policy


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


def test_random_tiny_is_built_offline_into_the_cache_and_loaded_with_from_pretrained():
    policy = load_policy(replace(TINY, init="random"))  # the default (init: pretrained) opens weights/tiny instead
    folder = Path(policy.model.get_base_model().name_or_path)
    assert folder.parent == Path(os.environ["RAU_CACHE"]) and (folder / ".complete").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    config, tok = policy.model.get_base_model().config, policy.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    text = config.get_text_config()
    assert (text.eos_token_id, text.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    assert tok.convert_ids_to_tokens([text.bos_token_id, text.eos_token_id]) == ["<|endoftext|>", "<|im_end|>"]
    assert policy.hidden_size == TINY.hidden_size and len(tok) <= TINY.vocab_size + 1


def test_chat_template_renders_like_qwen25_vl(policy):
    img = Image.new("RGB", (28, 28))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi"}]}]
    text = policy.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n")
    msgs = [{"role": "system", "content": "S"}, *msgs, {"role": "assistant", "content": "A"}]
    text = policy.processor.apply_chat_template(msgs, tokenize=False, add_vision_id=True)
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n") and "Picture 1: <|vision_start|>" in text
    assert text.endswith("<|im_start|>assistant\nA<|im_end|>\n")
    for special in QWEN_SPECIAL:  # each a single, special token
        assert len(policy.tokenizer(special, add_special_tokens=False).input_ids) == 1


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


def test_images_get_3d_rotary_positions_and_resized_size_matches_the_processor(policy, example):
    msgs, _ = example
    inputs = policy.inputs_for([msgs])
    assert "mm_token_type_ids" in inputs  # without them transformers 5 silently falls back to 1D positions
    with torch.no_grad():
        policy.model(**inputs)
    # 3D positions of an image advance by max(h, w)/2 instead of h*w/4: the text after it starts earlier
    assert policy.model.get_base_model().model.rope_deltas.item() < 0
    ref, tgt = (c["image"] for c in msgs[1]["content"] if c["type"] == "image")
    patch = policy.processor.image_processor.patch_size
    for image, (_, h, w) in zip((ref, tgt), inputs["image_grid_thw"].tolist()):
        assert prompts.resized_size(image.height, image.width, policy.processor) == (h * patch, w * patch)


def test_gradients_reach_exactly_the_trainable_parameters(policy, example):
    msgs, completion = example
    with torch.no_grad():  # LoRA B starts at 0, which makes A's gradient 0: give B a value first
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    policy.model.zero_grad()
    loss = policy.model(**policy.inputs_for([msgs], [completion])).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert any("trainable_tokens_delta" in n and "embed_tokens" in n for n in trainable)
    for name, p in policy.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert not any("visual" in n for n in trainable)  # the vision tower stays frozen
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
    assert policy.seg_hidden_states(msgs, "<think></think><answer>{}</answer>").shape == (0, TINY.hidden_size)


def test_completions_keep_seg_and_drop_chat_tokens(policy):
    tok = policy.tokenizer
    ids = tok("<|vision_start|><think>a</think><Seg><|im_end|>junk<|endoftext|>", add_special_tokens=False).input_ids
    assert policy.decode_completion(ids) == "<think>a</think><Seg>"


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
    with pytest.raises(ConfigError, match="min_pixels"):
        PolicyConfig(min_pixels=10_000, max_pixels=100).validate()
    with pytest.raises(ConfigError, match="num_heads"):
        PolicyConfig(hidden_size=60, num_heads=8).validate()
    PolicyConfig(model="Qwen/Qwen2.5-VL-7B-Instruct", hidden_size=60, num_heads=8).validate()  # tiny dims unused
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="load_in_4bit needs a CUDA GPU"):
            PolicyConfig(load_in_4bit=True).validate()
