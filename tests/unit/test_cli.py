"""The ``rau`` parser: each subcommand builds only its own arguments, so light commands start fast."""

import subprocess
import sys

import pytest

from rau_ray.cli import _chosen_command, build_parser, parse


def test_the_chosen_command_is_the_first_word_that_is_not_an_option():
    assert _chosen_command(["data", "make", "--n", "3"]) == "data"
    assert _chosen_command(["--help"]) is None
    assert _chosen_command([]) is None


def test_only_the_chosen_subcommand_gets_its_heavy_arguments():
    a = build_parser(only="eval").parse_args(["eval", "--config", "x.yaml"])
    assert a.config == "x.yaml"
    with pytest.raises(SystemExit):  # the train job's options are not built when only eval is
        build_parser(only="eval").parse_args(["train", "sft", "--config", "x.yaml"])
    a = build_parser().parse_args(["train", "sft", "--config", "x.yaml"])  # None: every subcommand is whole
    assert (a.job, a.config) == ("sft", "x.yaml")


def test_light_commands_do_not_import_torch():
    code = ("import sys; from rau_ray.cli import build_parser; "
            "build_parser(only='data').parse_args(['data', 'make', '--modality', 'ct-abdomen', '--n', '2', "
            "'--out', 'o']); print(sorted(m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_key_value_overrides_are_taken_before_or_after_the_options():
    after = parse(["pretrain", "dino", "--config", "c.yaml", "--max-steps", "9", "lr=1e-3", "scale.num_workers=1"])
    assert (after.backbone, after.config, after.max_steps) == ("dino", "c.yaml", 9)
    assert after.set == ["lr=1e-3", "scale.num_workers=1"]
    both = parse(["train", "sft", "seed=3", "--config", "c.yaml", "lr=1e-3"])
    assert both.set == ["seed=3", "lr=1e-3"]
    with pytest.raises(SystemExit):  # a stray word that is no KEY=VALUE is still refused
        parse(["train", "sft", "--config", "c.yaml", "oops"])
    with pytest.raises(SystemExit):  # and a command without overrides takes none
        parse(["eval", "--config", "c.yaml", "lr=1e-3"])


def test_demo_prints_its_summary_not_its_whole_report(monkeypatch, capsys, tmp_path):
    """`make demo`'s terminal: the demo's own lines; the report (hundreds of lines of JSON) stays in report.json."""
    import rau_ray.demo
    from rau_ray.cli import main

    def fake_demo(out, **kw):
        print("rau demo -> summary")
        return {"datasets": {f"d{i}": {"samples": i} for i in range(200)}}

    monkeypatch.setattr(rau_ray.demo, "run_demo", fake_demo)
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    assert capsys.readouterr().out.splitlines() == ["rau demo -> summary"]
