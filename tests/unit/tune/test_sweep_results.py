"""A sweep's outputs from made-up trial records: ranking, table files, heatmap cells and PNG, the best export."""

import csv
import json

import pytest
import torch

from rau_ray.tune.results import best_row, export_best, heatmap_grid, plot_heatmap, short_names, trial_rows, write_table

PATHS = ["model.fusion.projector_dim", "model.policy.lora_rank", "lr"]


def record(trial_id, dim, rank, dices, steps=None, status="finished", lr=1e-3):
    steps = steps or list(range(0, 2 * len(dices), 2))
    history = [{"step": s, "val_dice": d, "time_total_s": 10.0 * (i + 1)} for i, (s, d) in enumerate(zip(steps, dices))]
    return {"trial_id": trial_id, "status": status, "history": history,
            "config": {"model.fusion.projector_dim": dim, "model.policy.lora_rank": rank, "lr": lr}}


RECORDS = [
    record("t0", 128, 4, [0.1, 0.3, 0.4]),
    record("t1", 256, 4, [0.1, 0.6, 0.5]),  # best ever 0.6, last 0.5
    record("t2", 128, 8, [0.1, 0.2], steps=[0, 2]),  # stopped by ASHA at step 2 < max_t 4
    record("t3", 256, 8, [0.1], status="error"),
    record("t4", 256, 4, [0.05, 0.45, 0.45], lr=3e-4),  # the same cell as t1, worse
    {"trial_id": "t5", "status": "unfinished", "history": [], "config": {"model.fusion.projector_dim": 512,
                                                                        "model.policy.lora_rank": 4, "lr": 1e-3}},
]


def test_rows_are_ranked_by_last_metric_with_statuses():
    rows = trial_rows(RECORDS, PATHS, "val_dice", "max", max_t=4)
    assert [r["trial_id"] for r in rows] == ["t1", "t4", "t0", "t2", "t3", "t5"]
    by_id = {r["trial_id"]: r for r in rows}
    assert by_id["t1"]["val_dice"] == 0.5 and by_id["t1"]["best_val_dice"] == 0.6 and by_id["t1"]["step"] == 4
    assert by_id["t2"]["status"] == "stopped early" and by_id["t0"]["status"] == "finished"
    assert by_id["t3"]["status"] == "error" and by_id["t5"]["val_dice"] is None and by_id["t5"]["reports"] == 0
    assert by_id["t0"]["time_s"] == 30.0 and by_id["t0"]["model.policy.lora_rank"] == 4
    assert best_row(rows, "val_dice", "max")["trial_id"] == "t1"
    assert best_row(trial_rows(RECORDS, PATHS, "val_dice", "min"), "val_dice", "min")["trial_id"] == "t2"
    assert best_row(trial_rows(RECORDS[3:4], PATHS, "val_dice", "max"), "val_dice", "max") is None  # errors only


def test_table_files(tmp_path):
    rows = trial_rows(RECORDS, PATHS, "val_dice", "max", max_t=4)
    paths = write_table(rows, tmp_path, PATHS, "val_dice", "max", title="demo")
    table = list(csv.DictReader(open(paths["table_csv"])))
    assert [r["trial_id"] for r in table] == ["t1", "t4", "t0", "t2", "t3", "t5"]
    assert table[0]["model.fusion.projector_dim"] == "256" and float(table[0]["val_dice"]) == 0.5
    assert table[-1]["val_dice"] == ""
    md = open(paths["table_md"]).read()
    assert md.startswith("# Sweep demo") and "| rank | trial | status | projector_dim | lora_rank | lr |" in md
    assert "| 1 | t1 | finished | 256 | 4 | 0.001 | 0.5000 | 0.6000 | 4 | 3 | 30 |" in md
    assert short_names(["a.x", "b.x", "c.y"]) == {"a.x": "a.x", "b.x": "b.x", "c.y": "y"}


def test_heatmap_cells_and_png(tmp_path):
    rows = trial_rows(RECORDS, PATHS, "val_dice", "max")
    xs, ys, matrix = heatmap_grid(rows, "model.fusion.projector_dim", "model.policy.lora_rank", "val_dice", "max")
    assert xs == [128, 256, 512] and ys == [4, 8]
    assert matrix == [[0.4, 0.5, None], [0.2, 0.1, None]]  # best per cell (t1 beats t4); t5 reported nothing
    out = plot_heatmap(rows, "model.fusion.projector_dim", "model.policy.lora_rank", "val_dice", "max",
                       tmp_path / "heatmap.png", title="demo")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def fake_run(folder, steps, dim=128):
    from safetensors.torch import save_file

    for step in steps:
        ck = folder / f"checkpoint_{step:03d}"
        ck.mkdir(parents=True)
        save_file({"projector.0.weight": torch.full((dim, 4), float(step))}, str(ck / "weights.safetensors"))
        (ck / "train_state.json").write_text(json.dumps({"step": step, "config": {"mode": "rau", "name": "x"}}))
        (ck / "history.jsonl").write_text("".join(json.dumps({"step": s, "val_dice": s / 10}) + "\n"
                                                  for s in range(step + 1)))


def test_export_copies_the_latest_checkpoint_and_replaces_an_older_export(tmp_path):
    from rau_ray.models.checkpoint import read_checkpoint

    fake_run(tmp_path / "runs" / "t1", [2, 4])
    best = {"trial_id": "t1", "val_dice": 0.4, "step": 4}
    info = export_best(best, {"lr": 0.01}, tmp_path / "runs" / "t1", tmp_path, "val_dice", job="seg")
    assert info["checkpoint_step"] == 4 and info["checkpoint_metric"] == 0.4 and info["config"] == {"lr": 0.01}
    assert json.loads((tmp_path / "best.json").read_text()) == info
    ck = read_checkpoint(tmp_path / "best")
    assert ck.kind == "seg" and ck.step == 4 and ck.weights["projector.0.weight"][0, 0] == 4.0

    fake_run(tmp_path / "runs" / "t2", [6], dim=64)
    info = export_best({"trial_id": "t2", "val_dice": 0.6, "step": 6}, {}, tmp_path / "runs" / "t2", tmp_path,
                       "val_dice")
    assert read_checkpoint(tmp_path / "best").step == 6 and info["trial_id"] == "t2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.json", "runs"]  # no temp folders left


def test_export_of_a_run_without_checkpoints_is_a_clear_error(tmp_path):
    from rau_ray.errors import DataError

    (tmp_path / "runs" / "t0").mkdir(parents=True)
    with pytest.raises(DataError, match="not a training checkpoint"):
        export_best({"trial_id": "t0"}, {}, tmp_path / "runs" / "t0", tmp_path, "val_dice")
