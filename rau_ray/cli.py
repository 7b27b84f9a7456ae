"""The ``rau`` command line: each subcommand parses its arguments and calls one library function.

Bad input ends with ``error: <what and where>`` and exit status 2, never a traceback.
Use: ``rau --help``, ``rau data make --modality ct-abdomen --n 20 --out data/ct``, ``rau demo``.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import sys

from rau_ray.errors import RauError


class RauCommandError(RauError):
    """A command text that maps to no operation (shown as a user error)."""


def _profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="tiny", choices=("tiny", "paper"), help="model profile (default: tiny)")
    p.add_argument("--config", help="model config YAML (a profile plus overrides); wins over --profile")


def _data_make(a: argparse.Namespace) -> dict:
    from rau_ray.data.make import MakeConfig, make_dataset

    cfg = MakeConfig(modality=a.modality, n=a.n, out=a.out, seed=a.seed, dims=a.dims, size=a.size,
                     slices_per_subject=a.slices_per_subject, held_out=a.held_out)
    return make_dataset(cfg, backend=a.backend)


def _data_import(a: argparse.Namespace) -> dict:
    if a.dicom:
        from rau_ray.data.dicom_import import DicomImportConfig, import_dicom_folder

        return import_dicom_folder(DicomImportConfig(folder=a.dicom, out=a.out, min_pixels=a.min_pixels,
                                                     every=a.every), backend=a.backend)
    from rau_ray.data.importers import ImportConfig, import_dataset

    return import_dataset(ImportConfig(dataset_json=a.dataset_json, out=a.out, min_pixels=a.min_pixels,
                                       every=a.every), backend=a.backend)


def _data_preview(a: argparse.Namespace) -> dict:
    from rau_ray.data.preview import preview

    return {"preview": str(preview(a.dirs, a.out, n=a.n, cols=a.cols, window=a.window))}


def _models_describe(a: argparse.Namespace) -> dict:
    from rau_ray.models.describe import describe
    from rau_ray.models.profiles import get_profile, load_model_config

    return describe(load_model_config(a.config) if a.config else get_profile(a.profile))


def _model_config(a: argparse.Namespace):
    from rau_ray.models.profiles import get_profile, load_model_config

    return load_model_config(a.config) if a.config else get_profile(a.profile)


def _index_build(a: argparse.Namespace) -> dict:
    from rau_ray.models.retrieval import ReferenceBank

    bank = ReferenceBank.build(a.manifest, _model_config(a).retrieval, split=None if a.split == "all" else a.split,
                               backend=a.backend)
    bank.save(a.out)
    return {"out": a.out, **bank.info}


def _index_recall(a: argparse.Namespace) -> dict:
    from rau_ray.models.retrieval import Embedder, ReferenceBank, recall_at_k

    embedder = Embedder(_model_config(a).retrieval)
    return recall_at_k(ReferenceBank.load(a.bank, embedder), embedder, a.manifest, split=a.split,
                       pose_tolerance=a.pose_tolerance)


def _command_parse(a: argparse.Namespace) -> list:
    from rau_ray.commands import CommandError, OpenAICompatibleFallback, parse_command

    try:
        fallback = OpenAICompatibleFallback(a.llm_url, a.llm_model, timeout=a.llm_timeout) if a.llm_url else None
        return parse_command(a.text, fallback=fallback, structures=a.structure or ())
    except CommandError as e:
        raise RauCommandError(str(e)) from None


def _train(a: argparse.Namespace) -> dict:
    from rau_ray.train.jobs import overrides, run_job

    return run_job(a.job, a.config, overrides(a), a.set)


def _pretrain(a: argparse.Namespace) -> dict:
    from rau_ray.train.jobs import overrides, run_job

    return run_job(f"pretrain-{a.backbone}", a.config, overrides(a), a.set)


def _ship(a: argparse.Namespace) -> dict:
    from rau_ray.train.ship import ship

    return ship(a.checkpoint, a.name, a.step)


def _export(a: argparse.Namespace) -> dict:
    from rau_ray.models.export import export_checkpoint

    return export_checkpoint(a.checkpoint, a.out, overwrite=a.overwrite)


def _tune(a: argparse.Namespace) -> dict:
    from rau_ray.tune.sweep import load_sweep_config, run_sweep

    summary = run_sweep(load_sweep_config(a.config), resume=a.resume)
    if summary.get("interrupted"):  # what finished is saved; --resume continues
        print(json.dumps(summary, indent=2))
        raise KeyboardInterrupt
    return summary


def _eval(a: argparse.Namespace) -> dict:
    from rau_ray.eval.evaluate import config_from_args, run_eval

    return run_eval(config_from_args(a), command=" ".join(["rau", *map(shlex.quote, sys.argv[1:])]))


def _submit(a: argparse.Namespace) -> dict:
    from rau_ray.cluster.submit import run_from_args

    result = run_from_args(a)
    if result["status"] in ("FAILED", "STOPPED"):  # like `ray job submit`: exit 1 when the job did not succeed
        print(json.dumps(result, indent=2))
        sys.exit(1)
    return result


def _pacs_segment(a: argparse.Namespace) -> dict:
    """The stage lines (fetch / segment / store, timed) go to stderr; the JSON result (the SEG's UIDs, the timings)
    to stdout. Checkpoints: serve_configs/local.yaml's pair unless named (--checkpoint alone: its own policy)."""
    from rau_ray.dicomweb import DicomWeb

    pacs = DicomWeb(a.url, timeout_s=a.timeout)
    try:  # the URL, the study and the series are checked before the models' imports and loading (seconds)
        pacs.pick_series(a.study, a.series)
    finally:
        pacs.close()
    from rau_ray.serve.app import local_options
    from rau_ray.serve.pacs import run_cli

    served, _ = local_options()
    policy = a.policy or (None if a.checkpoint else served.get("policy_checkpoint"))
    result = run_cli(a.url, a.study, a.structures, series=a.series, timeout_s=a.timeout, policy_checkpoint=policy,
                     segmenter_checkpoint=a.checkpoint or served.get("segmenter_checkpoint"), bank_dir=a.bank,
                     profile=a.profile, threads=a.threads if a.threads is not None else served.get("threads", 1),
                     propagate=a.propagate,
                     say=lambda line: print(line, file=sys.stderr, flush=True))
    result["series"].pop("instance_uids", None)  # the SEG references them; the terminal needs no 64 UIDs
    return result


def _keys(a: argparse.Namespace):
    """``rau keys add`` prints the new key (NAME.SECRET) alone on stdout, once (the file keeps only its salted
    hash), and how to use it on stderr; ``list`` and ``revoke`` print JSON."""
    from rau_ray.serve import keys

    if a.keys_command == "add":
        key = keys.add_key(a.file, a.name)
        print(key)
        print(f"key {a.name!r} added to {a.file} (stored as a salted scrypt hash; this is the only time the key is "
              f"shown). Clients send 'Authorization: Bearer <key>'; MONAI Label / 3D Slicer: username {a.name}, "
              "password = the part after the dot.", file=sys.stderr)
        return None
    if a.keys_command == "revoke":
        return keys.revoke_key(a.file, a.name)
    return keys.list_keys(a.file)


def _demo(a: argparse.Namespace) -> None:
    """The demo prints its own stage lines and summary table; its whole report is the report.json it names."""
    from rau_ray.demo import run_demo

    run_demo(a.out, subjects=a.subjects, seed=a.seed, serve_forever=a.serve_forever, port=a.port)


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), or None."""
    return next((w for w in argv if not w.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``rau`` parser; ``only``: build just that subcommand's own arguments (None: all of them). Several come
    from modules that take seconds to import (torch, transformers, Ray Train): ``rau data make`` need not wait for
    them, and ``rau --help`` lists the subcommands without them."""
    from rau_ray.data.phantoms import PHANTOMS

    def full(name: str) -> bool:
        return only is None or only == name

    p = argparse.ArgumentParser(prog="rau", description="RAU-Ray: reference-based anatomical understanding on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job, end to end, on an embedded local Ray cluster (tiny profile)")
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    demo.add_argument("--subjects", type=int, default=24, help="phantom subjects per modality (default: 24)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--serve-forever", action="store_true",
                      help="leave the Ray Serve app up after the demo's requests (web page at the printed URL) "
                           "until Ctrl-C; default: stop it")
    demo.add_argument("--port", type=int, help="HTTP port of the Serve app (default: a free one)")
    demo.set_defaults(func=_demo)

    data = sub.add_parser("data", help="make phantom datasets, import real ones, preview them")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    make = dsub.add_parser("make", help="generate a procedural anatomy phantom dataset (parallel on Ray)")
    make.add_argument("--modality", required=True, choices=sorted(PHANTOMS), help="which phantom")
    make.add_argument("--n", type=int, required=True, help="number of subjects")
    make.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical files (default: 0)")
    make.add_argument("--out", required=True, help="output folder")
    make.add_argument("--dims", type=int, default=2, choices=(2, 3),
                      help="2: PNG samples + manifest.jsonl; 3: NIfTI volumes + dataset.json (ct-abdomen)")
    make.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    make.add_argument("--slices-per-subject", type=int, default=4, help="ct-abdomen 2D: axial slices per subject")
    make.add_argument("--held-out", action="store_true",
                      help="every subject in the test split (a held-out set: use a seed no training run used)")
    make.add_argument("--backend", choices=("ray", "local"), default="ray", help="ray (parallel) or local")
    make.set_defaults(func=_data_make)

    imp = dsub.add_parser("import", help="convert an MSD / nnU-Net v2 dataset (dataset.json) or a folder of DICOM "
                                         "series with their DICOM-SEGs to 2D samples")
    what = imp.add_mutually_exclusive_group(required=True)
    what.add_argument("--dataset-json", help="path to the dataset's dataset.json")
    what.add_argument("--dicom", help="folder of DICOM series, each annotated by a DICOM-SEG that references it")
    imp.add_argument("--out", required=True, help="output folder (manifest.jsonl + images/ + labels/)")
    imp.add_argument("--min-pixels", type=int, default=20, help="keep slices with at least this many labelled px")
    imp.add_argument("--every", type=int, default=1, help="keep every k-th kept slice (default: 1)")
    imp.add_argument("--backend", choices=("ray", "local"), default="ray")
    imp.set_defaults(func=_data_import)

    prev = dsub.add_parser("preview", help="draw a grid of samples with coloured label overlays")
    prev.add_argument("dirs", nargs="+", help="dataset folder(s) with manifest.jsonl or dataset.json")
    prev.add_argument("--out", required=True, help="PNG to write")
    prev.add_argument("--n", type=int, default=8, help="samples per dataset (default: 8)")
    prev.add_argument("--cols", type=int, default=4, help="images per row (default: 4)")
    prev.add_argument("--window", default="abdomen", help="CT window: preset name or 'level,width'")
    prev.set_defaults(func=_data_preview)

    models = sub.add_parser("models", help="inspect the model profiles")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="MODELS_COMMAND")
    desc = msub.add_parser("describe", help="parameter counts (total / trainable) per component")
    _profile_args(desc)
    desc.add_argument("--json", action="store_true", help="print JSON (the default output is JSON too)")
    desc.set_defaults(func=_models_describe)

    index = sub.add_parser("index", help="reference banks: DINOv2 embeddings in a faiss index")
    isub = index.add_subparsers(dest="index_command", required=True, metavar="INDEX_COMMAND")
    build = isub.add_parser("build", help="embed a manifest's references (parallel on Ray) and save the bank")
    build.add_argument("--manifest", required=True, help="manifest.jsonl (or its folder)")
    build.add_argument("--out", required=True, help="bank folder to write")
    build.add_argument("--split", default="train", help="rows to index: train (default), val, test or all")
    build.add_argument("--backend", choices=("ray", "local"), default="ray")
    _profile_args(build)
    build.set_defaults(func=_index_build)
    recall = isub.add_parser("recall", help="retrieval recall@1/@5 (same modality, nearest pose) of a bank")
    recall.add_argument("--bank", required=True)
    recall.add_argument("--manifest", required=True, help="queries: a manifest (its --split rows)")
    recall.add_argument("--split", default="test")
    recall.add_argument("--pose-tolerance", type=int, default=2, help="|slice difference| counted as same pose")
    _profile_args(recall)
    recall.set_defaults(func=_index_recall)

    command = sub.add_parser("command", help="natural-language commands for interactive segmentation")
    csub = command.add_subparsers(dest="command_command", required=True, metavar="COMMAND_COMMAND")
    parse = csub.add_parser("parse", help="print the operations a command text maps to (JSON)")
    parse.add_argument("text")
    parse.add_argument("--structure", action="append", metavar="NAME",
                       help="a structure name to accept as a target besides the built-in anatomy (repeatable)")
    parse.add_argument("--llm-url", help="LLM fallback (off by default): an OpenAI-compatible endpoint, e.g. "
                                         "http://127.0.0.1:8001 (POST /v1/chat/completions); asked only when the "
                                         "deterministic parser refuses the text, its answer validated")
    parse.add_argument("--llm-model", default="default", help="model name sent to the fallback endpoint")
    parse.add_argument("--llm-timeout", type=float, default=10.0, help="seconds to wait for the fallback")
    parse.set_defaults(func=_command_parse)

    train = sub.add_parser("train", help="training jobs on Ray Train: sft, grpo (policy), seg (segmenter)")
    train.add_argument("job", choices=("sft", "grpo", "seg"), help="which training job")
    if full("train") or full("pretrain"):
        from rau_ray.train.jobs import add_arguments

        add_arguments(train)
    train.set_defaults(func=_train)

    pre = sub.add_parser("pretrain", help="pretrain a tiny backbone on Ray Train (sam2, dino, policy) and export it "
                                          "where the tiny profile loads it from (weights/tiny/)")
    pre.add_argument("backbone", choices=("sam2", "dino", "policy"), help="which backbone")
    if full("train") or full("pretrain"):
        add_arguments(pre)
    pre.set_defaults(func=_pretrain)

    shp = sub.add_parser("ship", help="copy a trained checkpoint into weights/tiny/rau/<name> (then shipped:<name>), "
                                      "a policy's adapter also as a plain peft folder")
    if full("ship"):
        from rau_ray.train.ship import add_arguments as ship_arguments

        ship_arguments(shp)
    shp.set_defaults(func=_ship)

    exp = sub.add_parser("export", help="a checkpoint as artifacts others load: a peft adapter folder with the "
                                        "processor (<Seg>), an RAU segmenter's weights + config, a model card")
    if full("export"):
        from rau_ray.models.export import add_arguments as export_arguments

        export_arguments(exp)
    exp.set_defaults(func=_export)

    tune = sub.add_parser("tune", help="Ray Tune sweep over a training job (projector width, LoRA rank, lr...): "
                                       "ASHA, results table, heatmap, best checkpoint exported")
    if full("tune"):
        from rau_ray.tune.sweep import add_arguments as tune_arguments

        tune_arguments(tune)
    tune.set_defaults(func=_tune)

    ev = sub.add_parser("eval", help="evaluation report on held-out targets: labeling, segmentation, retrieval, "
                                     "latency, 3D (Ray actors)")
    if full("eval"):
        from rau_ray.eval.evaluate import add_arguments as eval_arguments

        eval_arguments(ev)
    ev.set_defaults(func=_eval)

    submit = sub.add_parser("submit", help="submit a jobs/ entrypoint to a Ray cluster (Ray Jobs API, runtime_env "
                                           "with this repo), stream its logs, exit with its final status")
    if full("submit"):
        from rau_ray.cluster.submit import add_arguments as submit_arguments

        submit_arguments(submit)
    submit.set_defaults(func=_submit)

    keys_p = sub.add_parser("keys", help="API keys of the Serve app: add (prints the key once), list, revoke")
    ksub = keys_p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    for action, text in (("add", "make a key NAME.SECRET; the file keeps its salted hash (mode 0600)"),
                         ("list", "the keys: name, created, revoked"),
                         ("revoke", "refuse a key from its next request on (the running app re-reads the file)")):
        kp = ksub.add_parser(action, help=text)
        if action != "list":
            kp.add_argument("name", help="the key's name (letters, digits, _ or -): who or what holds it")
        kp.add_argument("--file", required=True, help="the keys file (serve args.api_keys_file)")
        kp.set_defaults(func=_keys)

    pacs = sub.add_parser("pacs", help="a PACS over DICOMweb (e.g. Orthanc): segment a study, store the DICOM-SEG")
    psub = pacs.add_subparsers(dest="pacs_command", required=True, metavar="ACTION")
    pseg = psub.add_parser("segment", help="find the study's series (QIDO-RS), fetch it (WADO-RS), segment the "
                                           "structures, store one DICOM-SEG in the study (STOW-RS); prints the SEG's "
                                           "UIDs and the timings")
    pseg.add_argument("--url", required=True, help="the DICOMweb service root, e.g. http://127.0.0.1:8042/dicom-web")
    pseg.add_argument("--study", required=True, help="Study Instance UID")
    pseg.add_argument("--structures", required=True, help="comma-separated, e.g. liver,spleen")
    pseg.add_argument("--series", help="Series Instance UID (default: the study's one image series)")
    pseg.add_argument("--checkpoint", help="segmenter checkpoint (default: serve_configs/local.yaml's, shipped:seg)")
    pseg.add_argument("--policy", help="policy checkpoint (default: local.yaml's with its segmenter, else the "
                                       "--checkpoint's own)")
    pseg.add_argument("--bank", help="reference bank folder (`rau index build`); default: a small CT phantom bank")
    pseg.add_argument("--profile", default="tiny", choices=("tiny", "paper"))
    pseg.add_argument("--timeout", type=float, default=30.0, help="each DICOMweb request's timeout, s (default 30)")
    pseg.add_argument("--threads", type=int, help="torch threads (default: local.yaml's per-replica threads, 1)")
    pseg.add_argument("--propagate", action="store_true", help="a key slice carried through by SAM2: faster than the "
                                                               "full pipeline on every slice, weaker on small organs")
    pseg.set_defaults(func=_pacs_segment)
    return p


def parse(words: list[str]) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides accepted after the options too."""
    parser = build_parser(only=_chosen_command(words) or "")
    args, extra = parser.parse_known_args(words)
    # KEY=VALUE overrides after the options (`rau train sft --config C lr=1e-3`): argparse gives a positional list
    # only the words before the first option, so the rest arrive here
    if extra and isinstance(getattr(args, "set", None), list) and all("=" in w and not w.startswith("-")
                                                                        for w in extra):
        args.set = [*args.set, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        result = args.func(args)
    except RauError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: files already written are complete; nothing is half-written", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


def entry() -> None:
    """The ``rau`` command (and ``python -m rau_ray.cli``): ``main``, then exit without the interpreter's final
    garbage collections, which walk every object torch and transformers made (~1.4 s of each command's exit here).
    ``gc.freeze`` only exempts the objects alive now from the collector: atexit handlers (Ray's disconnect) still
    run and files are still flushed and closed. Not in ``main``: a test calling it in-process keeps its collector."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
