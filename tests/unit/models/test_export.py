"""rau export: the shipped RAU chain (shipped:seg, which brings shipped:grpo) exported, then loaded as somebody
without RAU-Ray's loader would (transformers' AutoModelForImageTextToText + PeftModel.from_pretrained, AutoProcessor):
the same logits as the project's own policy loader on one input, the segmenter's tensors equal, a model card; a
checkpoint without a policy and a non-empty --out refused before anything is written.

Run: pytest tests/unit/models/test_export.py
"""

import json

import pytest
import torch
import yaml

from rau_ray.data.phantoms import ct_abdomen
from rau_ray.errors import ConfigError
from rau_ray.models import prompts
from rau_ray.models.checkpoint import load_policy_checkpoint, load_segmenter_checkpoint, read_checkpoint
from rau_ray.models.export import export_checkpoint, load_exported_segmenter
from rau_ray.models.pretrained import weights_root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "rau-tiny"
    return out, export_checkpoint("shipped:seg", out)


def test_the_export_loads_with_plain_peft_and_gives_the_project_loaders_logits(exported):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out, facts = exported
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "processor_config.json",
                 "README.md", "train_config.yaml", "policy_train_config.yaml", "export.json"):
        assert (out / name).is_file(), name
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids(prompts.SEG_TOKEN) == facts["seg_token_id"]
    base = AutoModelForImageTextToText.from_pretrained(weights_root() / "qwen2_5_vl")
    base.resize_token_embeddings(len(processor.tokenizer))
    plain = PeftModel.from_pretrained(base, out).eval()

    ours = load_policy_checkpoint(read_checkpoint("shipped:grpo"))  # what eval / Serve / RAUModel load
    s = ct_abdomen.generate_2d(0, 0, size=96)
    ref, tgt = prompts.to_pil(s[0].image), prompts.to_pil(s[2].image)
    messages = prompts.build_messages("segment", ref, {"liver": [10, 10, 50, 60]}, tgt, structure="liver")
    completion = prompts.build_answer("segment", label="liver", box=[4, 8, 30, 40], think="left of the aorta")
    assert prompts.SEG_TOKEN in completion  # the trained <Seg> rows are on the path
    inputs = ours.inputs_for([messages], [completion])
    inputs.pop("labels")
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + completion
    theirs = processor(text=[text + "<|im_end|>"], images=[ref, tgt], return_tensors="pt")
    assert torch.equal(theirs["input_ids"], inputs["input_ids"])  # the exported processor reads it the same
    with torch.no_grad():
        expected = ours.model(**inputs).logits
        got = plain(**theirs).logits
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), plain.disable_adapter():  # the comparison can fail: without the adapter it differs
        bare = plain(**theirs).logits
    assert (bare - expected).abs().max() > 1e-2


def test_the_exported_segmenter_is_the_checkpoints(exported):
    out, facts = exported
    ck = read_checkpoint("shipped:seg")
    ours = load_segmenter_checkpoint(ck).state_dict()
    theirs = load_exported_segmenter(out).state_dict()
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    saved = json.loads((out / "segmenter" / "config.json").read_text())
    assert saved["policy_sha256"] == ck.config["policy_sha256"] == facts["policy"]["weights_sha256"]


def test_the_model_card_says_base_data_steps_metrics_and_command(exported):
    out, facts = exported
    card = (out / "README.md").read_text()
    seg, grpo = read_checkpoint("shipped:seg"), read_checkpoint("shipped:grpo")
    assert "weights/tiny/qwen2_5_vl" in card and f"`{seg.config['manifest']}`" in card
    assert f"step {seg.step}" in card and f"step {grpo.step}" in card
    assert "rau train seg --config train_config.yaml" in card and "rau train grpo --config policy_train_config.yaml" \
        in card
    last_dice = [row["val_dice"] for row in seg.history() if "val_dice" in row][-1]
    assert f"| val_dice | {last_dice:.4g} |" in card and "| reward |" in card  # both runs' metrics
    assert yaml.safe_load((out / "train_config.yaml").read_text()) == seg.config
    assert json.loads((out / "export.json").read_text())["command"] == facts["command"]


def test_a_checkpoint_without_a_policy_is_refused_naming_it_before_anything_is_written(tmp_path):
    out = tmp_path / "cbam"
    with pytest.raises(ConfigError, match=r"shipped:seg-cbam: a cbam checkpoint \(.*seg-cbam\) holds no policy"):
        export_checkpoint("shipped:seg-cbam", out)
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_out_is_refused_unless_overwrite_and_replaced_whole(tmp_path):
    out = tmp_path / "grpo"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"--out .*grpo: exists and is not empty; .* --overwrite"):
        export_checkpoint("shipped:grpo", out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    facts = export_checkpoint("shipped:grpo", out, overwrite=True)
    assert facts["kind"] == "grpo" and "policy" not in facts and not (out / "segmenter").exists()
    assert not (out / "mine.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["grpo"]  # no temp folder left beside it
