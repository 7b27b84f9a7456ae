"""GRPO rewards in trl's signature: right answers score 1, graded boxes score their IoU, garbage scores 0."""

import math

import pytest

from rau_ray.errors import ConfigError
from rau_ray.models.prompts import build_answer
from rau_ray.scoring.answers import FORMAT_CREDIT, matched_mean_iou
from rau_ray.train.rewards import accuracy_reward, completion_text, format_reward, with_decoder

SIZE = [112, 112]
BOXES = {"liver": [10, 20, 50, 70], "spleen": [70, 20, 100, 60], "aorta": [50, 60, 60, 70]}


def solution(task, structure="liver", boxes=BOXES):
    return build_answer(task, label=structure, box=boxes.get(structure), boxes=boxes, think="ref")


def call(reward, completions, task, structure="liver", **extra):
    n = len(completions)
    return reward(prompts=[[{"role": "user", "content": "q"}]] * n, completions=completions, task=[task] * n,
                  solution=[solution(task, structure)] * n, image_size=[SIZE] * n, **extra)


def test_completion_text_takes_strings_and_conversations():
    assert completion_text("abc") == "abc"
    assert completion_text([{"role": "assistant", "content": "abc"}]) == "abc"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]) == "ab"
    assert completion_text({"role": "assistant", "content": "x"}) == "x"
    for junk in (None, 3, [1, 2], [{"role": "user", "content": "x"}], {"content": None}):
        assert completion_text(junk) is None


@pytest.mark.parametrize("task", ["label", "ground", "all_boxes", "segment"])
def test_the_reference_answer_earns_full_format_and_accuracy(task):
    right = solution(task)
    for completion in (right, [{"role": "assistant", "content": right}]):
        assert call(format_reward, [completion], task) == [1.0]
        assert call(accuracy_reward, [completion], task) == [pytest.approx(1.0)]


def test_format_credit_grows_as_the_answer_gets_closer_to_valid():
    texts = ["no tags", "<think>a</think><answer>{not json</answer>", "<think>a</think><answer>{}</answer>",
             "<think>a</think><answer>{\"label\": \"liver\", \"box\": [5, 5, 1, 1]}</answer>",
             solution("ground")]
    scores = call(format_reward, texts, "ground")
    assert scores == [0.0, FORMAT_CREDIT["json"], FORMAT_CREDIT["field"], FORMAT_CREDIT["box"], 1.0]
    assert scores == sorted(scores)


def test_format_checks_coordinates_against_the_image():
    outside = build_answer("ground", label="liver", box=[10, 20, 500, 70])
    assert call(format_reward, [outside], "ground") == [FORMAT_CREDIT["box"]]
    assert call(accuracy_reward, [outside], "ground") == [0.0]


def test_label_accuracy_is_right_or_wrong():
    answers = [build_answer("label", label=name) for name in ("liver", " Liver ", "spleen")]
    assert call(accuracy_reward, answers, "label") == [1.0, 1.0, 0.0]


def test_ground_accuracy_is_graded_by_box_iou():
    half = build_answer("ground", label="liver", box=[10, 20, 30, 70])  # half of the true box
    disjoint = build_answer("ground", label="liver", box=[60, 80, 90, 100])
    wrong_name = build_answer("ground", label="spleen", box=BOXES["liver"])
    assert call(accuracy_reward, [half, disjoint, wrong_name], "ground") == [pytest.approx(0.5), 0.0, 0.0]


def test_absent_structure_rewards_a_null_box():
    absent = build_answer("ground", label="gallbladder", box=None)
    n = 2
    rewards = accuracy_reward(prompts=[None] * n, completions=[absent, build_answer("ground", label="gallbladder",
                                                                                    box=[1, 1, 9, 9])],
                              task=["ground"] * n, solution=[absent] * n, image_size=[SIZE] * n)
    assert rewards == [1.0, 0.0]


def test_all_boxes_matching_is_by_transport_not_by_the_answered_names():
    # the right boxes under swapped names: transport assigns them by position (the names only earn a bonus)
    swapped = {"liver": BOXES["spleen"], "spleen": BOXES["liver"], "aorta": BOXES["aorta"]}
    assert call(accuracy_reward, [build_answer("all_boxes", boxes=swapped)], "all_boxes") == [pytest.approx(1.0)]
    # one box missing: mean over the 3 true boxes
    two = {k: BOXES[k] for k in ("liver", "spleen")}
    assert call(accuracy_reward, [build_answer("all_boxes", boxes=two)], "all_boxes") == [pytest.approx(2 / 3)]


def test_all_boxes_surplus_boxes_cost_as_much_as_missing_ones():
    pred = [(k, v) for k, v in BOXES.items()] + [("liver", [0, 0, 5, 5]), ("spleen", [100, 100, 110, 110])]
    assert matched_mean_iou(pred, list(BOXES.items()), (112, 112)) == pytest.approx(3 / 5)
    assert matched_mean_iou([], list(BOXES.items()), (112, 112)) == 0.0
    assert matched_mean_iou([], [], (112, 112)) == 1.0


HOSTILE = [None, 42, "", "<answer>{}</answer>", "<think>" * 5000, "<think>a</think><answer>[1, 2]</answer>",
           "<think>a</think><answer>{\"label\": NaN}</answer>",
           "<think>a</think><answer>{\"boxes\": [[1e400]]}</answer>",
           [{"role": "assistant", "content": None}], [{"role": "assistant"}], "\x00\ufffd" * 100,
           "<think>a</think><answer>{\"label\": 7, \"box\": [1, 2, 3, 10" + "0" * 500 + "]}</answer>"]


@pytest.mark.parametrize("task", ["label", "ground", "all_boxes", "segment"])
def test_garbage_scores_zero_and_never_raises(task):
    assert call(accuracy_reward, HOSTILE, task) == [0.0] * len(HOSTILE)
    formats = call(format_reward, HOSTILE, task)
    assert all(0.0 <= f < 1.0 for f in formats)  # the ones with both tags get partial credit, none full
    assert formats[:4] == [0.0] * 4 and formats[8:11] == [0.0] * 3  # no tags, or not text: nothing


def test_bad_truth_or_size_scores_zero_but_missing_columns_are_a_config_error():
    right = solution("ground")
    assert accuracy_reward(prompts=[None], completions=[right], task=["ground"], solution=["garbage"],
                           image_size=[SIZE]) == [0.0]
    assert accuracy_reward(prompts=[None], completions=[right], task=["nope"], solution=[right],
                           image_size=[SIZE]) == [0.0]
    all_right = solution("all_boxes")
    assert accuracy_reward(prompts=[None], completions=[all_right], task=["all_boxes"], solution=[all_right],
                           image_size=[None]) == [0.0]  # no size: the transport cost is undefined
    with pytest.raises(ConfigError, match="solution"):
        accuracy_reward(prompts=[None], completions=[right], task=["ground"])
    with pytest.raises(ConfigError, match="task"):
        format_reward(prompts=[None, None], completions=[right, right], task=["ground"])


def test_with_decoder_re_decodes_ids_and_names_the_reward():
    texts = {1: solution("label"), 2: "junk"}
    decode = lambda ids: texts[ids[0]]  # noqa: E731
    reward = with_decoder(accuracy_reward, decode, name="accuracy")
    assert reward.__name__ == "accuracy"
    out = reward(prompts=[None, None], completions=["", ""], completion_ids=[[1], [2]], task=["label"] * 2,
                 solution=[solution("label")] * 2, image_size=[SIZE] * 2)
    assert out == [1.0, 0.0]
    failing = with_decoder(format_reward, lambda ids: 1 / 0)  # a decoder that breaks scores 0, never raises
    assert failing(prompts=[None], completions=["x"], completion_ids=[[1]], task=["label"]) == [0.0]
    assert failing.__name__ == "format_reward"


def test_rewards_are_finite_and_in_unit_interval():
    texts = [solution(t) for t in ("label", "ground", "all_boxes", "segment")] + HOSTILE
    for task in ("label", "ground", "all_boxes", "segment"):
        for reward in (format_reward, accuracy_reward):
            for value in call(reward, texts, task):
                assert math.isfinite(value) and 0.0 <= value <= 1.0


@pytest.fixture(scope="module")
def seg_setup(tmp_path_factory):
    """The tiny policy + SAM2 segmenter and one segment item of a small phantom set."""
    from rau_ray.data.make import MakeConfig, make_dataset
    from rau_ray.data.manifest import read_manifest
    from rau_ray.data.tasks import make_pairs
    from rau_ray.models.fusion import RAUSegmenter
    from rau_ray.models.policy import load_policy
    from rau_ray.models.profiles import get_profile
    from rau_ray.models.sam2_builder import build_sam2_model
    from rau_ray.train.grpo import Prompts

    out = tmp_path_factory.mktemp("dice_data") / "ct"
    make_dataset(MakeConfig("ct-abdomen", n=4, out=str(out), size=64, slices_per_subject=1), backend="local",
                 progress=False)
    cfg = get_profile("tiny")
    policy = load_policy(cfg.policy)
    segmenter = RAUSegmenter(build_sam2_model(cfg.sam2), cfg.fusion).eval()
    item = make_pairs(read_manifest(out / "manifest.jsonl"), tasks=("segment", "label"))[:2]
    return policy, segmenter, [Prompts(policy.processor).row(i) for i in item]


def test_mask_dice_scores_segment_answers_through_sam2(seg_setup):
    from rau_ray.train.rewards import MaskDiceReward

    policy, segmenter, (seg_row, label_row) = seg_setup
    reward = MaskDiceReward(policy, segmenter)
    assert reward.__name__ == "mask_dice"
    rows = [seg_row, seg_row, seg_row, label_row]
    completions = [seg_row["solution"], "garbage", solution("ground"), label_row["solution"]]
    columns = {k: [r[k] for r in rows] for k in ("task", "manifest", "reference", "target", "structure",
                                                "image_size")}
    scores = reward(prompts=[r["prompt"] for r in rows], completions=completions, **columns)
    assert 0.0 <= scores[0] <= 1.0 and math.isfinite(scores[0])
    assert scores[1:] == [0.0, 0.0, None]  # garbage, a non-segment answer; another task is not scored
    cached = len(reward._cache)
    assert reward(prompts=[seg_row["prompt"]], completions=[seg_row["solution"]],
                  **{k: v[:1] for k, v in columns.items()}) == [pytest.approx(scores[0])]
    assert len(reward._cache) == cached  # same images: SAM2 embeddings and the reference memory are reused
