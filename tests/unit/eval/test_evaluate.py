"""The evaluation job on a tiny manifest whose right answers are known: planning (held-out only), the numbers the
tables compute from known predictions (labeling incl. a case transport gets right and independent argmax wrong,
Dice / gIoU / cIoU / HD95 with anisotropic spacing, latency, attention, 3D Dice), the report files, bad input."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from rau_ray.cli import main as cli_main
from rau_ray.data import formats
from rau_ray.data.manifest import ManifestRow, write_manifest
from rau_ray.errors import ConfigError, DataError
from rau_ray.eval import report, tables
from rau_ray.eval.evaluate import predict_all
from rau_ray.eval.plan import EvalConfig, plan_eval
from rau_ray.eval.worker import EvalWorker, pack, slot_grid, unpack
from rau_ray.scoring.matching import MatchConfig, assign

SIZE = 100
SPACING = (2.0, 1.0)  # [x, y] mm: columns are 2 mm apart, rows 1 mm
# boxes [x1, y1, x2, y2], x2/y2 exclusive
TARGET = {"A": [22, 45, 32, 55], "B": [33, 45, 43, 55]}  # centres x 27 and 38
REFERENCE = {"A": [20, 45, 30, 55], "B": [47, 45, 57, 55]}  # centres x 25 and 52: both target boxes nearest to A


def _label_map(boxes: dict) -> np.ndarray:
    lab = np.zeros((SIZE, SIZE), np.uint8)
    for value, name in ((1, "A"), (2, "B")):
        x1, y1, x2, y2 = boxes[name]
        lab[y1:y2, x1:x2] = value
    return lab


def _shift(box, dx=1) -> list[int]:
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


def _mask(box, shift=0) -> np.ndarray:
    m = np.zeros((SIZE, SIZE), bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1 + shift:x2 + shift] = True
    return m


@pytest.fixture
def manifest(tmp_path) -> Path:
    """s0, s1: train (references); s2, s3: test (targets); s4: val. One image each, labels A and B."""
    root = tmp_path / "toy"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rows = []
    for i, split in enumerate(("train", "train", "test", "test", "val")):
        sid = f"toy-s{i}"
        formats.write_png(root / "images" / f"{sid}.png", np.full((SIZE, SIZE), 40 + 10 * i, np.uint8))
        formats.write_png(root / "labels" / f"{sid}.png", _label_map(REFERENCE if split == "train" else TARGET))
        rows.append(ManifestRow(id=sid, image=f"images/{sid}.png", label=f"labels/{sid}.png",
                                labels={"1": "A", "2": "B"}, modality="XA", split=split, spacing=SPACING,
                                source="test:toy", subject=f"s{i}", slice=None))
    return write_manifest(root / "manifest.jsonl", rows)


@pytest.fixture
def volumes(tmp_path) -> Path:
    """A 3-case nnU-Net v2 volume set (one case lands in the test split)."""
    root = tmp_path / "vol"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in range(3):
        lab = np.zeros((8, 8, 6), np.uint8)
        lab[2:6, 2:6, 1:5] = 1
        formats.write_nifti(root / "imagesTr" / f"case{c}_0000.nii.gz", lab.astype(np.int16) * 50, (1.0, 1.0, 2.0))
        formats.write_nifti(root / "labelsTr" / f"case{c}.nii.gz", lab, (1.0, 1.0, 2.0))
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "A": 1},
                                                   "file_ending": ".nii.gz", "numTraining": 3}))
    return root / "dataset.json"


def fake_checkpoint(folder: Path, config: dict, step: int = 1) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(folder / "weights.safetensors"))
    (folder / "train_state.json").write_text(json.dumps({"step": step, "config": config}))
    return folder


class OracleWorker(EvalWorker):
    """Known predictions instead of models: s2's reference is s0; s3 finds no reference."""

    def label(self, item):
        rec = {"kind": "label", "dataset": item["dataset"], "manifest": item["manifest"], "target": item["target"],
               "size": [SIZE, SIZE], "ref_size": [SIZE, SIZE],
               "regions": [{"structure": s, "box": b} for s, b in TARGET.items()], "seconds": {}}
        if item["target"] == "toy-s3":
            return [{**rec, "reference": None, "ref_boxes": {}, "error": "no suitable reference",
                     "answers": {"sft": [None, None], "grpo": [None, None]}, "predicted": {}, "reasked": {}}]
        return [{**rec, "reference": "toy-s0", "ref_boxes": REFERENCE, "error": None,
                 "answers": {"sft": [" a ", None], "grpo": ["A", "A"]},
                 # all-boxes answers: SFT's B box is off (IoU 1/3 < 0.5: B wrong though named B); GRPO's boxes
                 # both match (IoU 9/11) but both say A: transport re-labels the second B
                 "predicted": {"sft": [["A", TARGET["A"]], ["B", [38, 45, 48, 55]]],
                               "grpo": [["A", _shift(TARGET["A"])], ["A", _shift(TARGET["B"])]]},
                 "reasked": {"grpo": {}},
                 "reasoning": {"sft": [[2, 1], [0, 0]], "grpo": [[1, 1], [1, 1]]},  # [statements, true] per answer
                 # ground answers [structure, box, valid]: C is the reference's, absent from the target (right: null)
                 "grounded": {"sft": [["A", _shift(TARGET["A"]), True], ["C", [1, 1, 5, 5], True]],
                              "grpo": [["A", TARGET["A"], True], ["B", None, True], ["C", None, True]]},
                 "seconds": {"sft": [0.010, 0.030], "grpo": [0.020, 0.020]}}]

    def segment(self, item):
        if item["target"] != "toy-s2":
            return []
        grid = np.array([[1.0, 0.0], [0.0, 0.0]])
        out = []
        for s, shift, vlm_seconds, attention in (("A", 0, 0.1, [[1.0, 0, 0, 0]]), ("B", 5, 0.3, [[0.25] * 4])):
            truth = _mask(TARGET[s])
            vlm = _mask(TARGET[s], shift)
            memref = np.zeros_like(truth) if s == "A" else truth.copy()
            out.append({"kind": "segment", "dataset": item["dataset"], "manifest": item["manifest"],
                        "target": item["target"], "structure": s, "spacing": list(SPACING), "truth": truth,
                        "reference": "toy-s0", "similarity": 0.9, "error": None, "ref_grid": grid,
                        "preds": {"SAM2-Memory-Ref": {"mask": memref, "box": None, "seconds": 0.05},
                                  "VLM+SAM2": {"mask": vlm, "box": [TARGET[s][0] + shift, 45, TARGET[s][2] + shift, 55],
                                               "seconds": vlm_seconds, "attention": np.array(attention),
                                               "timings": {"generate": vlm_seconds / 2, "total": vlm_seconds}}}})
        return out

    def volume(self, item):
        truth = np.zeros((6, 8, 8), bool)
        truth[1:5, 2:6, 2:6] = True
        pred = np.roll(truth, 1, axis=0)  # one slice off: 3 of 4 slices overlap
        return [{"kind": "volume", "dataset": item["dataset"], "case": item["case"], "structure": "A", "key_slice": 2,
                 "slices": 6, "spacing": [2.0, 1.0, 1.0], "truth": truth, "pred": pred, "seconds": 1.0}]


def brute_hd95(pred: np.ndarray, truth: np.ndarray, spacing_rc: tuple[float, float]) -> float:
    """Independent HD95: surface = pixels with a 4-neighbour outside the mask (or on the border), all pairs."""
    def surface(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner) * np.asarray(spacing_rc)

    a, b = surface(pred), surface(truth)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95)))


def test_transport_is_right_where_independent_argmax_is_wrong():
    """The case the labeling table relies on: both target boxes are nearest to A's prototype."""
    boxes = list(TARGET.values())
    assert assign(boxes, (SIZE, SIZE), REFERENCE, (SIZE, SIZE), MatchConfig(method="independent")).labels == ["A", "A"]
    assert assign(boxes, (SIZE, SIZE), REFERENCE, (SIZE, SIZE), MatchConfig(method="emd"),
                  predicted_labels=["A", "A"]).labels == ["A", "B"]


def test_a_region_transport_leaves_unassigned_falls_back_to_the_policys_own_answer():
    """A third region far from every prototype (out of the reference's layout): transport leaves it unassigned,
    so GRPO+OT takes the policy's answer to that region asked alone."""
    far = [0, 0, 4, 4]  # the top-left corner: no prototype near it
    record = {"kind": "label", "size": [SIZE, SIZE], "ref_size": [SIZE, SIZE], "ref_boxes": REFERENCE, "error": None,
              "regions": [{"structure": s, "box": b} for s, b in TARGET.items()] + [{"structure": "C", "box": far}],
              "answers": {"grpo": ["A", "A", "C"]}}
    plan = assign([r["box"] for r in record["regions"]], (SIZE, SIZE), REFERENCE, (SIZE, SIZE),
                  MatchConfig(method="emd"), predicted_labels=["A", "A", "C"])
    assert plan.labels[2] is None  # transport alone leaves it out
    assert tables.row_labels(record, "grpo", "emd") == ["A", "B", "C"]
    assert tables.row_labels(record, None, "emd")[2] is None  # without a policy there is nothing to fall back to


def test_labeling_scores_the_policys_predicted_boxes_with_the_reask_fallback():
    """A known case where predicted and true boxes differ: a true structure is right only when a predicted box
    matches it (IoU >= 0.5) and carries its label; a label the all-boxes answer leaves out is re-asked alone."""
    base = {"kind": "label", "size": [SIZE, SIZE], "ref_size": [SIZE, SIZE], "ref_boxes": REFERENCE, "error": None,
            "regions": [{"structure": s, "box": b} for s, b in TARGET.items()], "answers": {"grpo": ["A", "B"]}}
    # right names, B's box 10 px off (IoU 0): on the true boxes both would be right, on the predicted ones B is not
    off = {**base, "predicted": {"grpo": [["A", TARGET["A"]], ["B", _shift(TARGET["B"], 10)]]}}
    assert tables.row_labels(off, "grpo", None, "given") == ["A", "B"]
    assert tables.row_labels(off, "grpo", None, "predicted") == ["A", None]
    # B left out of the all-boxes answer: transport leaves it, the re-asked grounding answer's box is scored
    left_out = {**base, "predicted": {"grpo": [["A", _shift(TARGET["A"])]]}, "reasked": {"grpo": {"B": TARGET["B"]}}}
    assert tables.row_labels(left_out, "grpo", "emd", "predicted") == ["A", "B"]
    assert tables.row_labels(left_out, "grpo", None, "predicted") == ["A", None]  # no transport, no re-ask
    absent = {**left_out, "reasked": {"grpo": {"B": None}}}  # re-asked, answered absent
    assert tables.row_labels(absent, "grpo", "emd", "predicted") == ["A", None]
    malformed = {**base, "predicted": {"grpo": None}, "reasked": {"grpo": {"A": TARGET["A"], "B": TARGET["B"]}}}
    assert tables.row_labels(malformed, "grpo", "emd", "predicted") == ["A", "B"]  # every label re-asked
    assert tables.row_labels(base, "grpo", "emd", "predicted") is None  # no all-boxes answer recorded: n/a
    assert tables.match_regions([("A", TARGET["A"]), ("B", TARGET["A"])], base["regions"]) == ["A", None]


def test_mask_boxes_rows_read_each_named_box_off_the_chains_mask():
    """"GRPO+OT (mask boxes)" and the grounding row "GRPO (mask boxes)": each box the policy wrote for a structure is
    replaced by the box of the chain's own mask of it; an empty mask makes it absent (null), a null answer stays
    null, and a record without mask boxes leaves the row n/a."""
    base = {"kind": "label", "dataset": "toy", "subject": "s", "target": "t", "size": [SIZE, SIZE],
            "ref_size": [SIZE, SIZE], "ref_boxes": REFERENCE, "error": None,
            "regions": [{"structure": s, "box": b} for s, b in TARGET.items()], "answers": {"grpo": ["A", "B"]}}
    def low(box):  # 8 px lower: IoU 0.11 with its own truth, none with the other
        return [box[0], box[1] + 8, box[2], box[3] + 8]

    written = {**base, "predicted": {"grpo": [["A", low(TARGET["A"])], ["B", low(TARGET["B"])]]},
               "reasked": {"grpo": {}}, "grounded": {"grpo": [["A", low(TARGET["A"]), True], ["B", None, True]]}}
    assert tables.row_labels(written, "grpo", "emd", "predicted") == [None, None]  # both boxes IoU < 0.5
    assert tables.row_labels(written, "grpo", "emd", "masks") is None  # no mask boxes recorded: n/a
    masked = {**written, "mask_boxes": {"A": TARGET["A"], "B": None}}  # A's mask fits, B's mask was empty
    assert tables.row_labels(masked, "grpo", "emd", "masks") == ["A", None]
    assert tables.predicted_entries(masked, "grpo", None, "masks") == [("A", [float(v) for v in TARGET["A"]])]
    # transport names the structure first, the mask of that name gives the box: a box written "A" at B's place
    misnamed = {**masked, "predicted": {"grpo": [["A", low(TARGET["A"])], ["A", low(TARGET["B"])]]},
                "mask_boxes": dict(TARGET)}
    assert tables.row_labels(misnamed, "grpo", "emd", "masks") == ["A", "B"]
    assert tables.row_labels(misnamed, "grpo", None, "masks") == ["A", None]  # no transport: B is never named
    rows = tables.labeling_table([masked])["toy"]["rows"]
    assert rows["GRPO+OT (mask boxes)"]["correct"] == 1 and rows["GRPO+OT"]["correct"] == 0
    ground = tables.grounding_table([masked])["toy"]
    assert ground["GRPO (mask boxes)"]["iou"] == pytest.approx(0.5) and ground["GRPO"]["iou"] < 0.2
    assert "GRPO (mask boxes)" not in tables.grounding_table([written])["toy"]
    # a structure the target lacks (C): the policy boxes it, the chain's mask of it is empty -> answered null
    absent = {**masked, "grounded": {"grpo": [["A", low(TARGET["A"]), True], ["C", [0, 0, 5, 5], True]]},
              "mask_boxes": {"A": TARGET["A"], "C": None}}
    ground = tables.grounding_table([absent])["toy"]
    assert ground["GRPO"]["null"] == 0.0 and ground["GRPO (mask boxes)"]["null"] == 1.0


def test_grpo_gain_over_sft_is_paired_region_by_region():
    """Two subjects: GRPO right where SFT is wrong on one region of each -> gap +0.5, an interval that excludes 0
    because the pairs move together (unpaired, both policies' intervals would overlap)."""
    recs = [{"kind": "label", "dataset": "toy", "subject": s, "target": s, "size": [SIZE, SIZE],
             "ref_size": [SIZE, SIZE], "ref_boxes": REFERENCE, "error": None,
             "regions": [{"structure": k, "box": b} for k, b in TARGET.items()],
             "answers": {"sft": ["A", "A"], "grpo": ["A", "B"]}} for s in ("s1", "s2")]
    lab = tables.labeling_table(recs)["toy"]
    assert lab["rows"]["SFT"]["accuracy"] == 0.5 and lab["rows"]["GRPO"]["accuracy"] == 1.0
    assert lab["grpo_minus_sft"] == {"gap": 0.5, "ci95": [0.5, 0.5]}
    assert tables.labeling_table([{**recs[0], "answers": {"grpo": ["A", "B"]}}])["toy"]["grpo_minus_sft"] is None


def test_plan_holds_out_test_subjects(manifest, volumes, tmp_path):
    plan = plan_eval(EvalConfig(manifests=(str(manifest),), out=str(tmp_path / "out"), volumes=(str(volumes),),
                                backend="local"))
    (ds,) = plan.datasets
    assert ds.name == "toy" and ds.distribution == "in" and ds.reference_split == "train"
    assert [r.id for r in ds.targets] == ["toy-s2", "toy-s3"] and ds.held_out == 2
    assert {i["kind"] for i in plan.items} == {"segment", "volume"}  # no policy checkpoint: no labeling items
    assert [i["structures"] for i in plan.items if i["kind"] == "segment"] == [["A", "B"], ["A", "B"]]
    from rau_ray.data.importers import read_dataset_json

    test_cases = [c.id for c in read_dataset_json(volumes).cases if c.split == "test"]
    assert [i["case"] for i in plan.items if i["kind"] == "volume"] == test_cases and len(test_cases) == 1
    sampled = plan_eval(EvalConfig(manifests=(str(manifest),), max_targets=1, seg_structures=1, backend="local"))
    again = plan_eval(EvalConfig(manifests=(str(manifest),), max_targets=1, seg_structures=1, backend="local"))
    assert len(sampled.datasets[0].targets) == 1 and sampled.items == again.items  # seeded
    assert len(sampled.items[0]["structures"]) == 1


def test_plan_refuses_what_is_not_held_out(manifest, tmp_path):
    with pytest.raises(ConfigError, match="targets must be held out"):
        plan_eval(EvalConfig(manifests=(str(manifest),), split="train"))
    sft_on_test = fake_checkpoint(tmp_path / "sft", {"manifest": str(manifest), "split": "test", "zero_stage": 2,
                                                     "tasks": ["label"]})
    with pytest.raises(ConfigError, match="trained on split 'test'"):
        plan_eval(EvalConfig(manifests=(str(manifest),), checkpoints=(str(sft_on_test),)))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[2]["subject"] = "s0"  # a test image of a training subject
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="in both split 'test' and 'train'"):
        plan_eval(EvalConfig(manifests=(str(manifest),)))


def test_checkpoint_kinds_and_bad_input(manifest, tmp_path):
    sft = fake_checkpoint(tmp_path / "a", {"manifest": "m", "split": "train", "zero_stage": 2, "tasks": ["label"]})
    grpo = fake_checkpoint(tmp_path / "b", {"manifest": "m", "split": "train", "num_generations": 4})
    plan = plan_eval(EvalConfig(manifests=(str(manifest),), checkpoints=(str(sft), str(grpo))))
    assert set(plan.checkpoints) == {"sft", "grpo"} and {i["kind"] for i in plan.items} == {"label", "segment"}
    other = fake_checkpoint(tmp_path / "c", {"zero_stage": 2, "tasks": ["label"]})
    with pytest.raises(ConfigError, match="two sft checkpoints"):
        plan_eval(EvalConfig(manifests=(str(manifest),), checkpoints=(str(sft), str(other))))
    with pytest.raises(ConfigError, match="a sft checkpoint, not a grpo one"):
        plan_eval(EvalConfig(manifests=(str(manifest),), grpo=str(sft)))
    with pytest.raises(DataError, match="not a training checkpoint"):
        plan_eval(EvalConfig(manifests=(str(manifest),), checkpoints=(str(tmp_path),)))
    seg = fake_checkpoint(tmp_path / "seg", {"manifest": "m", "train_split": "train", "mode": "rau",
                                             "model": {"profile": "tiny"}})
    with pytest.raises(ConfigError, match=r"seg was trained on the <Seg> states of the profile's base policy .*not "
                                          r"on the grpo policy .*b \(weights sha256"):
        plan_eval(EvalConfig(manifests=(str(manifest),), checkpoints=(str(grpo), str(seg)), seg_policy="grpo"))
    with pytest.raises(DataError, match="no rows in split 'nope'"):
        plan_eval(EvalConfig(manifests=(str(manifest),), split="nope"))


def test_cli_bad_input_is_an_error_with_status_2(tmp_path, capsys):
    assert cli_main(["eval", "--manifest", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert cli_main(["eval", "--out", str(tmp_path / "o")]) == 2
    assert "give --manifest" in capsys.readouterr().err


def test_records_survive_the_wire():
    recs = [{"kind": "segment", "truth": np.eye(3, dtype=bool), "preds": {"m": {"mask": None, "attention":
                                                                             np.ones((1, 4), np.float32)}},
             "spacing": [np.float64(1.5), 2]}]
    back = unpack(*pack(recs))
    assert back[0]["truth"].dtype == bool and (back[0]["truth"] == np.eye(3)).all()
    assert back[0]["preds"]["m"]["mask"] is None and back[0]["preds"]["m"]["attention"].shape == (1, 4)
    assert back[0]["spacing"] == [1.5, 2]
    with pytest.raises(DataError, match="corrupt image"):  # a worker's user error comes back as the error
        unpack(json.dumps({"error": "DataError", "message": "corrupt image"}), b"")


def test_known_predictions_give_known_numbers(manifest, volumes, tmp_path):
    out = tmp_path / "report"
    cfg = EvalConfig(manifests=(str(manifest),), out=str(out), volumes=(str(volumes),), backend="local")
    plan = plan_eval(cfg)
    # no policy checkpoint given: add the labeling items a policy checkpoint would have planned
    plan.items += [{"kind": "label", "dataset": "toy", "manifest": str(manifest), "target": t}
                   for t in ("toy-s2", "toy-s3")]
    records = predict_all(plan, OracleWorker, progress=False)
    recall = {"toy": {"queries": 2, "modality@1": 1.0, "modality@5": 1.0, "pose@1": 0.5, "pose@5": 1.0}}
    summary = report.write_report(out, plan, records, recall, report.header(plan, "rau eval --toy", 1.0))
    t = json.loads((out / "tables.json").read_text())

    # labeling over 4 regions (s3 found no reference: its 2 regions count wrong)
    lab = t["labeling"]["toy"]
    assert lab["regions"] == 4 and lab["targets"] == 2 and lab["failed_retrieval"] == 1
    assert lab["rows"]["SFT"] == {"accuracy": 0.25, "ci95": [0.0, 0.5], "correct": 1,
                                  "valid": 0.5}  # " a " counts (case, blanks); interval over the 2 subjects
    assert lab["rows"]["GRPO"]["accuracy"] == 0.25 and lab["rows"]["GRPO"]["valid"] == 1.0  # A, A: 2nd wrong
    assert lab["rows"]["GRPO+OT (given boxes)"]["accuracy"] == 0.5  # transport: A, B
    assert lab["grpo_minus_sft"] == {"gap": 0.0, "ci95": [0.0, 0.0]}  # both right on the same region only
    assert lab["rows"]["SFT boxes"] == {"accuracy": 0.25, "ci95": [0.0, 0.5], "correct": 1, "valid": 1.0}
    assert lab["rows"]["GRPO boxes"]["accuracy"] == 0.25  # its boxes match, its second label is wrong
    assert lab["rows"]["GRPO+OT"]["accuracy"] == 0.5  # on its predicted boxes, re-labelled: A, B
    assert lab["rows"]["OT (boxes only)"]["accuracy"] == 0.5 and lab["rows"]["OT (boxes only)"]["valid"] is None
    if tables.match_available("fgw"):
        assert 0 <= lab["rows"]["GRPO+FGW"]["accuracy"] <= 0.5
    else:
        assert lab["rows"]["GRPO+FGW"] is None
    assert t["per_label"]["toy"]["GRPO"]["B"] == {"n": 2, "correct": 0, "accuracy": 0.0}
    assert t["per_label"]["toy"]["GRPO+OT"]["B"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert t["reasoning"]["toy"]["SFT"] == {"answers": 2, "with_statements": 1, "statements": 2, "true": 1,
                                           "share": 0.5, "ci95": [0.5, 0.5]}
    assert t["reasoning"]["toy"]["GRPO"]["share"] == 1.0
    grounding = t["grounding"]["toy"]  # present: IoU (null = 0); absent: answered null
    assert grounding["GRPO"] == {"present": 2, "iou": 0.5, "iou_ci95": [0.5, 0.5], "absent": 1, "null": 1.0,
                                 "null_ci95": [1.0, 1.0]}
    assert grounding["SFT"]["iou"] == pytest.approx(9 / 11) and grounding["SFT"]["null"] == 0.0
    assert t["per_label"]["toy"]["SFT boxes"]["B"] == {"n": 2, "correct": 0, "accuracy": 0.0}

    # segmentation: VLM+SAM2 exact on A, B shifted 5 columns (|P ∩ G| = 50 of 100 each)
    vlm = t["segmentation"]["toy"]["VLM+SAM2"]
    hd_b = brute_hd95(_mask(TARGET["B"], 5), _mask(TARGET["B"]), (SPACING[1], SPACING[0]))
    assert hd_b == pytest.approx(10.0)  # the far corners: 5 columns x 2 mm
    assert vlm["dice_ci95"] == [0.75, 0.75]  # one subject: the interval is its mean
    assert vlm["n"] == 2 and vlm["dice"] == pytest.approx(0.75) and vlm["giou"] == pytest.approx((1 + 1 / 3) / 2)
    assert vlm["ciou"] == pytest.approx(150 / 250) and vlm["hd95"] == pytest.approx(hd_b / 2)
    assert vlm["box_iou"] == pytest.approx((1 + 1 / 3) / 2) and vlm["empty"] == 0
    mem = t["segmentation"]["toy"]["SAM2-Memory-Ref"]
    assert mem["dice"] == 0.5 and mem["giou"] == 0.5 and mem["ciou"] == 0.5 and mem["hd95"] == 0.0
    assert mem["hd95_inf"] == 1 and mem["empty"] == 1 and mem["box_iou"] == 0.0
    assert "CBAM-LoRA SAM2 (box)" not in t["segmentation"]["toy"]

    # attention: one-hot on the structure's slot (entropy 0, lift 4) and uniform (entropy 1, lift 1)
    att = t["attention"]["toy"]
    assert att["entropy"] == pytest.approx(0.5) and att["lift"] == pytest.approx(2.5)
    assert att["cross_case_cosine"] == pytest.approx(0.5)

    # latency (ms): medians and linear-interpolated p95
    lat = t["latency"]
    assert lat["VLM+SAM2"]["median_ms"] == pytest.approx(200) and lat["VLM+SAM2"]["p95_ms"] == pytest.approx(290)
    assert lat["label answer (SFT)"]["median_ms"] == pytest.approx(20) and lat["VLM+SAM2: generate"]["n"] == 2

    # 3D: a 4-slice cube one slice off -> Dice 2*48/128
    (vol,) = t["volumes"].values()
    assert vol["A"]["dice"] == pytest.approx(0.75) and vol["all"]["n"] == 1

    # the report: header, tables, pictures
    md = (out / "report.md").read_text()
    assert "| command | `rau eval --toy` |" in md and "| seed | 0 |" in md and "| sft checkpoint | n/a |" in md
    assert "| toy | in | 4 | 0.250 [0.000, 0.500] | 0.250 [0.000, 0.500] | 0.500 [0.000, 1.000] | 0.500 [0.000, " \
           "1.000] |" in md
    assert "toy: SAM2-Memory-Ref returned an empty mask on 1 of 2 items" in md
    assert "toy: labeling from the chain's own boxes (GRPO+OT 0.500) is no better than transport on the true boxes " \
           "alone (0.500)" in md
    assert "| toy | in | CBAM-LoRA SAM2 (box) | n/a |" in md
    assert t["header"]["seed"] == 0 and t["header"]["datasets"]["toy"]["targets"] == 2
    for name in ("gallery", "label_accuracy", "attention"):
        assert Path(summary["pictures"][name]).stat().st_size > 5_000
    assert summary["pictures"]["learning_curves"] is None  # no checkpoints given
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {line["kind"] for line in lines} == {"segment", "label", "volume"}
    assert math.isclose(lines[0]["scores"]["VLM+SAM2"]["dice"], 1.0)


def test_attention_stats_read_collapse():
    grid = np.array([[0.5, 0.5], [0.0, 0.0]])
    s = tables.attention_stats(np.array([[0.0, 0.0, 0.5, 0.5]]), grid)  # all of it off the structure
    assert s["on_structure"] == 0.0 and s["lift"] == 0.0 and s["entropy"] == pytest.approx(0.5)
    assert slot_grid(np.pad(np.ones((4, 4), bool), ((0, 4), (0, 4))), 4).tolist() == [[1, 0], [0, 0]]


@pytest.mark.parametrize("name", ["eval-tiny.yaml", "eval-paper.yaml"])
def test_shipped_configs_load(name):
    from rau_ray.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[3] / "jobs" / "configs" / name, EvalConfig)
    assert cfg.split == "test" and cfg.manifests
