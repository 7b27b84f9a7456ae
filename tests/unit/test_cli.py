"""The ``rau`` parser: each subcommand builds only its own arguments, so light commands start fast."""

import subprocess
import sys

import pytest

from rau_ray.cli import _chosen_command, build_parser


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
