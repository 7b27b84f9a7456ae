"""Policy task items: references of another subject, and ground questions about absent structures (answer null)."""

import pytest

from rau_ray.data.manifest import read_manifest
from rau_ray.data.tasks import label_boxes, make_pairs


def _present(m, row_id):
    row = next(r for r in m.rows if r.id == row_id)
    return set(label_boxes(m.load(row)[1], row.label_names))


def test_ground_items_ask_for_absent_structures_at_the_share_asked(ct_manifest):
    m = read_manifest(ct_manifest(6, 64, 4))
    never = make_pairs(m, tasks=("label", "ground"), absent_share=0.0)
    always = make_pairs(m, tasks=("label", "ground"), absent_share=1.0)
    assert [i for i in never if i["task"] == "label"] == [i for i in always if i["task"] == "label"]  # untouched
    absent, subject = 0, {r.id: r.subject for r in m.rows}
    for item in always:
        ref, tgt = _present(m, item["reference"]), _present(m, item["target"])
        assert item["structure"] in ref and subject[item["target"]] != subject[item["reference"]]
        if item["task"] == "ground" and ref - tgt:
            assert item["structure"] in ref - tgt  # share 1: always one the target lacks
            absent += 1
        elif item["task"] == "ground":
            assert item["structure"] in tgt
    assert absent > 0  # the phantom's slices do lack structures their references show
    assert all(i["structure"] in _present(m, i["target"]) for i in never)
    with pytest.raises(ValueError, match="absent_share"):
        make_pairs(m, absent_share=1.5)


def test_an_absent_structure_trains_a_null_answer_with_true_reasoning(ct_manifest):
    from rau_ray.models import prompts
    from rau_ray.models.policy import load_policy
    from rau_ray.models.profiles import get_profile
    from rau_ray.scoring.reasoning import check
    from rau_ray.train.policy_examples import PolicyExamples

    m = read_manifest(ct_manifest(6, 64, 4))
    examples = PolicyExamples(load_policy(get_profile("tiny").policy).processor)
    items = make_pairs(m, tasks=("ground", "label"), absent_share=1.0)
    absent = next(i for i in items if i["task"] == "ground" and i["structure"] not in _present(m, i["target"]))
    _, completion = examples.example(absent)
    parsed = prompts.parse_answer(completion, "ground")
    assert parsed and parsed.box is None and f"there is no {absent['structure']}" in parsed.think
    assert examples.truth(absent)["box"] is None
    label = next(i for i in items if i["task"] == "label")
    _, completion = examples.example(label)
    question, boxes = examples.question(label)
    said = check(prompts.parse_answer(completion, "label").think, boxes, question.reference_boxes)
    assert said.statements and said.share == 1.0  # the SFT target's relative-position claim is true


def test_retrieved_references_are_the_banks_best_hit_of_another_subject(ct_manifest):
    from rau_ray.models.profiles import get_profile
    from rau_ray.models.retrieval import Embedder, ReferenceBank, reference_picker

    m = read_manifest(ct_manifest(6, 64, 4))
    retrieval = get_profile("tiny").retrieval
    items = make_pairs(m, split="train", tasks=("segment",), retrieve=reference_picker(retrieval))
    assert items
    rows = {r.id: r for r in m.rows}
    bank = ReferenceBank.build(m.path, retrieval, split="train", backend="local", progress=False)
    embedder = Embedder(retrieval)
    for item in items:
        target = rows[item["target"]]
        assert rows[item["reference"]].subject != target.subject
        query = embedder.embed([m.load(target)[0]], [target.modality])[0]
        best = bank.search(query, k=1, modality=target.modality, exclude_subject=target.subject, min_similarity=-1)
        assert best.hits[0].row["id"] == item["reference"]  # what inference would retrieve for this target
    nearest = make_pairs(m, split="train", tasks=("segment",))
    assert [i["reference"] for i in items] != [i["reference"] for i in nearest]
