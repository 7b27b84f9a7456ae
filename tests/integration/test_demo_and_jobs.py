"""The main job (`rau demo`) and a `jobs/` entrypoint, on the session's real Ray cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

from ray import serve

from rau_ray.data.manifest import read_manifest
from rau_ray.demo import run_demo
from rau_ray.models.checkpoint import read_history
from rau_ray.train.curves import curve_keys

REPO = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end(ray_cluster, tmp_path, capfd):
    steps = {"sft": 4, "grpo": 2, "seg": 4, "seg-memref": 2, "seg-cbam": 2}
    # one Ray Train worker a run (the demo's configs ask for 2): each worker's start-up is ~7 s of CPU here, and the
    # 2-worker path of every job is tested in its own test (test_train_sft, test_grpo, test_seg_train, test_cluster)
    runs = {job: {"max_steps": n, "scale": {"num_workers": 1}} for job, n in steps.items()}
    # a 4-step policy writes until its budget runs out: shorter budgets for SFT's validation, GRPO's rollouts and
    # (from the checkpoints' configs) the evaluation's answers keep the test lean; the checks are the same
    runs["sft"].update(eval_items=4, max_new_tokens=64)
    runs["grpo"]["max_completion_length"] = 64
    report = run_demo(tmp_path / "demo", subjects=6, size=64, train_runs=runs, eval_targets=1)
    screen, screen_err = capfd.readouterr()
    # a person reads the terminal: a line per stage and the summary table, two screens at most; the rest in the log
    lines = (screen + screen_err).splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("rau demo -> ")), None)
    assert first is not None and str(tmp_path / "demo" / "demo.log") in lines[first], "\n".join(lines)
    lines = lines[first:]  # what the demo printed (the session's earlier test setup may print before it)
    assert len(lines) <= 60, "\n".join(lines)
    for stage in ("data", "models", "train", "eval", "eval_shipped", "serve"):
        assert any(line.startswith(f"{stage} ") for line in lines), stage
    assert "| train grpo |" in screen and "| eval (shipped) |" in screen and "Dice VLM+SAM2" in screen
    assert not any("PlacementGroupCleaner" in line or "FutureWarning" in line for line in lines)
    assert "GET    readiness" in (tmp_path / "demo" / "demo.log").read_text()  # the serving log went to the file
    assert set(report["datasets"]) == {"ct-abdomen", "xray-angio", "ultrasound", "xray-msk"}
    assert report["datasets"]["ct-abdomen"]["samples"] == 24
    assert read_manifest(tmp_path / "demo" / "data" / "ct-abdomen-3d-imported").rows
    assert (tmp_path / "demo" / "preview.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["volumes"]["samples"] == 4
    models = report["models"]
    assert models["bank"]["entries"] > 0 and models["recall"]["modality@1"] == 1.0
    assert models["predict"]["reference"]["id"].startswith("ct-abdomen-")
    assert (tmp_path / "demo" / "predict.png").stat().st_size > 5_000
    train = report["train"]
    assert set(train) == {"sft", "grpo", "seg", "seg-memref", "seg-cbam"}  # every stage of the recipe
    for job, n in steps.items():
        assert train[job]["metrics"]["step"] == n and Path(train[job]["checkpoint"]).is_dir()
    drawn = 0
    for job in train:  # a few steps may change no metric (one logged row): then there is no curve to draw
        if curve_keys(read_history(train[job]["checkpoint"])):
            assert Path(train[job]["curves"]).stat().st_size > 5_000
            drawn += 1
    assert drawn >= 1
    assert {"rewards/format/mean", "rewards/accuracy/mean", "kl"} <= set(train["grpo"]["metrics"])
    ev = report["eval"]  # the demo ends with the evaluation report of its checkpoints
    assert Path(ev["report"]).name == "report.md" and "| seed | 0 |" in Path(ev["report"]).read_text()
    assert set(ev["labeling"]) == set(ev["segmentation_dice"]) == set(report["datasets"])
    assert all(0 <= ev["labeling"][ds][row] <= 1 for ds in ev["labeling"] for row in ("SFT", "GRPO", "GRPO+OT"))
    assert 0 <= ev["segmentation_dice"]["ct-abdomen"]["VLM+SAM2"] <= 1 and ev["volumes_dice"]
    assert 0 <= ev["segmentation_dice"]["ct-abdomen"]["CBAM-LoRA SAM2 (box)"] <= 1  # the CBAM run is evaluated too
    assert Path(ev["pictures"]["gallery"]).stat().st_size > 5_000
    assert 0 <= ev["segmentation_dice"]["ct-abdomen"]["SAM2-Memory-Ref-SFT"] <= 1
    # beside them, the shipped checkpoints (the long runs) on the same CT targets
    shipped = report["eval_shipped"]
    assert set(shipped["segmentation_dice"]) == {"ct-abdomen"} and "shipped:grpo" in Path(shipped["report"]).read_text()
    shipped_rows = set(shipped["segmentation_dice"]["ct-abdomen"])
    assert {"VLM+SAM2", "SAM2-Memory-Ref-SFT", "CBAM-LoRA SAM2 (box)"} <= shipped_rows
    # then Ray Serve on the demo's bank and checkpoints answers real HTTP requests, and is shut down
    serve_report = report["serve"]
    assert serve_report["ready"] and serve_report["url"].startswith("http://127.0.0.1:")
    assert (serve_report["policy"], serve_report["segmenter"]) == ("shipped:grpo", "shipped:seg")
    saved = json.loads((tmp_path / "demo" / "serve" / "responses.json").read_text())
    by_name = {r["request"]: r for r in saved["responses"]}
    segment = by_name["segment"]
    assert segment["status"] == 200 and segment["path"] == "/v1/segment"
    for result in segment["response"]["results"]:
        assert result["mask"]["format"] == "rle" and result["mask"]["size"] == [64, 64]
        assert result["reasoning"] and result["reference"]["id"].startswith("ct-abdomen-")
    assert by_name["label"]["status"] == 200 and by_name["label"]["response"]["regions"]
    commands = [r for r in saved["responses"] if r["request"].startswith("command: ")]
    assert all(r["status"] == 200 for r in commands), commands
    assert [r["response"]["operations"][0]["op"] for r in commands] == [
        "segment", "add_point", "undo", "set_window", "show_metrics"]
    assert "area_px" in commands[-1]["response"]["results"][0]["metrics"]
    mask = by_name["session mask"]
    assert mask["status"] == 200 and mask["response"]["content_type"] == "image/png"
    assert Path(serve_report["picture"]).stat().st_size > 5_000
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["serve"]["segment"]
    assert "rau" not in serve.status().applications


def test_make_data_job_with_config(ray_cluster, tmp_path):
    env = dict(os.environ, RAY_ADDRESS=ray_cluster)
    cmd = [sys.executable, "jobs/make_data.py", "--config", "jobs/configs/data-tiny.yaml", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(read_manifest(tmp_path)) == 24 * 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("modality: ct-abdomen\nn: 2\nout: x\nsize: big\n")
    r = subprocess.run(cmd[:3] + [str(bad)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert r.returncode == 1 and "size: expected int, got 'big'" in r.stderr and "Traceback" not in r.stderr
