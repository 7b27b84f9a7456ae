"""The main job, ``rau demo`` / ``make demo``: the whole pipeline on an embedded local Ray cluster, tiny profile.

Today: phantom datasets of every modality generated in parallel on Ray, a preview picture of them, a 3D volume
round-tripped through NIfTI + dataset.json import, a reference bank built on Ray, retrieval recall, one RAU
``predict`` (tiny, untrained) drawn as a picture, then short training runs on Ray Train (SFT -> GRPO, segmenter)
with their learning curves, and last the evaluation report of those checkpoints on the held-out subjects of every
dataset and the held-out 3D volumes (``runs/demo/eval/report.md``). Serving joins when it lands.
Use: ``rau demo --out runs/demo``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rau_ray import ray_session
from rau_ray.atomic import atomic_write_text
from rau_ray.data.importers import ImportConfig, import_dataset
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.phantoms import PHANTOMS
from rau_ray.data.preview import preview


def run_models(out: Path) -> dict:
    """Reference bank over the CT train split (Ray), recall on held-out subjects, one tiny RAU prediction."""
    from rau_ray.data.manifest import read_manifest
    from rau_ray.models.profiles import get_profile
    from rau_ray.models.rau import RAUModel
    from rau_ray.models.retrieval import Embedder, ReferenceBank, recall_at_k

    cfg = get_profile("tiny")
    manifest_path = out / "data" / "ct-abdomen" / "manifest.jsonl"
    bank = ReferenceBank.build(manifest_path, cfg.retrieval, split="train")
    bank.save(out / "bank")
    recall = recall_at_k(bank, Embedder(cfg.retrieval), manifest_path, split="test")
    model = RAUModel.build(cfg, bank_dir=str(out / "bank"))
    manifest = read_manifest(manifest_path)
    rows = manifest.select(split="test")
    row = max(rows, key=lambda r: int((manifest.load(r)[1] == 1).sum()))  # the test slice showing most liver
    image, label = manifest.load(row)
    prediction = model.predict(image, "liver", modality=row.modality)
    _draw_prediction(image, label == 1, prediction, out / "predict.png")
    return {"bank": {"entries": len(bank), "index": bank.info["index"]}, "recall": recall,
            "predict": {"target": row.id, "structure": "liver", "reference": prediction.reference,
                        "score": round(prediction.score, 3), "format_error": prediction.format_error,
                        "timings_ms": {k: round(1000 * v, 1) for k, v in prediction.timings.items()},
                        "picture": str(out / "predict.png")}}


CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
# demo-length runs: long enough to show learning on 2 cores, short enough for `make demo`
DEMO_STEPS = {"sft": 200, "grpo": 30, "seg": 120, "seg-cbam": 60}


def run_training(out: Path, steps: dict[str, int] = DEMO_STEPS) -> dict:
    """The tiny training jobs on the demo's CT phantoms, shortened: SFT, then GRPO from the SFT adapter, then the
    segmenters (RAU fusion, CBAM-LoRA SAM2). Each writes its checkpoint and learning curves under
    ``out/train/<run>``; a run left out of ``steps`` is skipped."""
    import yaml

    from rau_ray.errors import ConfigError
    from rau_ray.train.jobs import run_job

    manifest = str(out / "data" / "ct-abdomen" / "manifest.jsonl")
    results = {}
    for run in [r for r in ("sft", "grpo", "seg", "seg-cbam") if r in steps]:
        path = CONFIGS / f"{run}-tiny.yaml"
        if not path.is_file():
            raise ConfigError(f"{path} not found: run the demo from a checkout of the project")
        data = yaml.safe_load(path.read_text())
        data.update(manifest=manifest, name=run, max_steps=steps[run])
        data["scale"] = {**data.get("scale", {}), "storage_path": str(out / "train")}
        if run == "grpo":
            data["sft_checkpoint"] = results["sft"]["checkpoint"]
        tmp = out / "train" / f"{run}.yaml"
        atomic_write_text(tmp, yaml.safe_dump(data))
        print(f"training: {run} ({steps[run]} steps)", flush=True)
        results[run] = run_job(run.split("-")[0], str(tmp))
    return results


def run_evaluation(out: Path, train: dict, seed: int = 0, targets: int = 8) -> dict:
    """``rau eval`` of the demo's checkpoints on the held-out subjects of every phantom dataset and the held-out 3D
    volumes; the report lands in ``out/eval/report.md``."""
    from rau_ray.eval.evaluate import EvalConfig, run_eval

    manifests = [str(out / "data" / name / "manifest.jsonl") for name in PHANTOMS]
    checkpoints = [r["checkpoint"] for r in train.values() if r.get("checkpoint")]
    volumes, structures = str(out / "data" / "ct-abdomen-3d" / "dataset.json"), "liver,spleen,right kidney,left kidney"
    cfg = EvalConfig(manifests=tuple(manifests), out=str(out / "eval"), checkpoints=tuple(checkpoints),
                     volumes=(volumes,), volume_structures=tuple(structures.split(",")), max_targets=targets,
                     seg_structures=3, seed=seed)
    command = " ".join(["rau eval", *[f"--manifest {m}" for m in manifests],
                        *[f"--checkpoint {c}" for c in checkpoints], f"--volumes {volumes}",
                        f"--volume-structures '{structures}'", f"--max-targets {targets}",
                        f"--seg-structures 3 --seed {seed} --out {out / 'eval'}"])
    print(f"evaluation: {len(checkpoints)} checkpoints on {len(manifests)} datasets", flush=True)
    return run_eval(cfg, command=f"{command}   (run by rau demo)")


def _draw_prediction(image, truth, prediction, path: Path) -> None:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rau_ray.atomic import atomic_write_figure
    from rau_ray.data.formats import apply_window

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, mask, title in ((axes[0], truth, "ground truth: liver"),
                            (axes[1], prediction.mask, f"tiny RAU (untrained), score {prediction.score:.2f}")):
        ax.imshow(apply_window(image, "abdomen"), cmap="gray")
        ax.imshow(mask, alpha=0.4 * mask, cmap="autumn")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"reference: {prediction.reference['id']}", fontsize=9)
    atomic_write_figure(path, fig, dpi=90)


def run_demo(out: str | Path = "runs/demo", subjects: int = 24, seed: int = 0, size: int = 192,
             train_steps: dict[str, int] = DEMO_STEPS, eval_targets: int = 8) -> dict:
    out = Path(out)
    t0 = time.perf_counter()
    ray = ray_session.connect()
    print(f"Ray cluster: {ray.cluster_resources().get('CPU', 0):.0f} CPUs", flush=True)
    report: dict = {"datasets": {}}
    for name in PHANTOMS:
        report["datasets"][name] = make_dataset(MakeConfig(modality=name, n=subjects, out=str(out / "data" / name),
                                                           seed=seed, size=size))
    vol_dir = out / "data" / "ct-abdomen-3d"
    report["volumes"] = make_dataset(MakeConfig(modality="ct-abdomen", n=4, out=str(vol_dir), seed=seed, dims=3,
                                                size=128))
    report["imported"] = import_dataset(ImportConfig(dataset_json=str(vol_dir / "dataset.json"),
                                                     out=str(out / "data" / "ct-abdomen-3d-imported"), every=4))
    report["preview"] = str(preview([out / "data" / name for name in PHANTOMS], out / "preview.png", n=4, cols=4))
    report["models"] = run_models(out)
    report["train"] = run_training(out, train_steps)
    report["eval"] = run_evaluation(out, report["train"], seed, eval_targets)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_text(out / "report.json", json.dumps(report, indent=2) + "\n")
    print(f"\nPreview of the phantom data: {report['preview']}\nA tiny RAU prediction: "
          f"{report['models']['predict']['picture']}\nReport: {out / 'report.json'}\n"
          f"Evaluation report (held-out subjects): {report['eval']['report']}", flush=True)
    return report
