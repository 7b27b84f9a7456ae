"""`rau submit` argument handling and the submit / follow / wait logic, against a fake Jobs API client (the real
cluster is tests/integration/test_cluster.py)."""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path

import pytest

from rau_ray.cli import build_parser
from rau_ray.cluster.submit import (
    DEFAULT_EXCLUDES,
    build_submission,
    normalise_address,
    parse_env,
    run_from_args,
    submit_job,
)
from rau_ray.errors import ConfigError, RauError

REPO = Path(__file__).resolve().parents[3]


def test_submission_runs_the_jobs_entrypoint_with_the_repo_as_working_dir():
    s = build_submission("make-data", "jobs/configs/data-tiny.yaml", args=["--out", "/tmp/a b"])
    assert shlex.split(s.entrypoint) == ["python", "jobs/make_data.py", "--config", "jobs/configs/data-tiny.yaml",
                                         "--out", "/tmp/a b"]
    assert s.runtime_env["working_dir"] == str(REPO)
    assert {".git", ".venv", "runs"} <= set(s.runtime_env["excludes"])
    assert "pip" not in s.runtime_env and "py_executable" not in s.runtime_env  # nothing installed unless asked
    assert s.metadata["job"] == "make_data"
    # an absolute config path inside the repo becomes relative (the job runs in the uploaded copy)
    s = build_submission("jobs/sft.py", REPO / "jobs/configs/sft-paper.yaml", python="/opt/py/bin/python")
    assert shlex.split(s.entrypoint)[:4] == ["/opt/py/bin/python", "jobs/sft.py", "--config",
                                             "jobs/configs/sft-paper.yaml"]


def test_runtime_env_options_and_file(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars: {A: '1', B: '2'}\nexcludes: [benchmarks]\nconda: null\n")
    s = build_submission("sft", "jobs/configs/sft-paper.yaml", pip=["-e .", "wandb==0.19"], env={"B": "3"},
                         runtime_env_file=env_file, excludes=["docs"], py_executable="python3.11",
                         image_uri="registry/rau-ray:0.1.0")
    env = s.runtime_env
    assert env["pip"] == ["-e .", "wandb==0.19"] and env["env_vars"] == {"A": "1", "B": "3"}  # flags win
    assert env["excludes"][:len(DEFAULT_EXCLUDES)] == list(DEFAULT_EXCLUDES)
    assert {"benchmarks", "docs"} <= set(env["excludes"]) and "conda" in env
    assert env["py_executable"] == "python3.11" and env["image_uri"] == "registry/rau-ray:0.1.0"


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown job 'nope'.*make_data.*sft"):
        build_submission("nope", "jobs/configs/sft-tiny.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        build_submission("sft", "jobs/configs/missing.yaml")
    outside = tmp_path / "c.yaml"
    outside.write_text("name: x\n")
    with pytest.raises(ConfigError, match="outside the working dir"):
        build_submission("sft", outside)
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "sft.py").write_text("")
    (tmp_path / "bad.yaml").write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_submission("sft", tmp_path / "bad.yaml", working_dir=tmp_path)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_env(["novalue"])
    assert parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}


def test_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="--address http://HEAD:8265"):
        normalise_address(None)
    assert normalise_address("10.0.0.1:8265") == "http://10.0.0.1:8265"
    assert normalise_address("https://ray.example.com") == "https://ray.example.com"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "127.0.0.1:8265")
    assert normalise_address(None) == "http://127.0.0.1:8265"


class FakeClient:
    """The part of JobSubmissionClient that submit_job uses; the job runs through ``statuses``."""

    def __init__(self, statuses, logs="step 1\nstep 2\n"):
        self.statuses, self.logs, self.submitted = list(statuses), logs, None

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return kwargs["submission_id"] or "raysubmit_fake"

    def get_job_status(self, job_id):
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    async def tail_job_logs(self, job_id):
        for line in self.logs.splitlines(keepends=True):
            yield line

    def get_job_info(self, job_id):
        return type("Info", (), {"message": "done" if self.statuses[-1] == "SUCCEEDED" else "exit code 1"})()

    def get_job_logs(self, job_id):
        return self.logs


def test_follow_streams_logs_and_returns_the_final_status():
    sub = build_submission("make_data", "jobs/configs/data-tiny.yaml", submission_id="rau-1")
    client, out = FakeClient(["PENDING", "RUNNING", "SUCCEEDED"]), io.StringIO()
    result = submit_job(sub, "127.0.0.1:8265", follow=True, out=out, poll_s=0, client=client)
    assert out.getvalue() == "step 1\nstep 2\n"
    assert result["status"] == "SUCCEEDED" and result["submission_id"] == "rau-1"
    assert result["stop"] == "ray job stop rau-1 --address http://127.0.0.1:8265"
    assert client.submitted["runtime_env"]["working_dir"] == str(REPO)
    assert client.submitted["entrypoint"] == sub.entrypoint


def test_waiting_without_follow_reports_a_failure_with_its_logs():
    sub = build_submission("make_data", "jobs/configs/data-tiny.yaml")
    result = submit_job(sub, "http://h:8265", client=FakeClient(["RUNNING", "FAILED"], logs="Traceback: boom\n"),
                        poll_s=0, out=io.StringIO())
    assert result["status"] == "FAILED" and "boom" in result["logs_tail"] and result["message"] == "exit code 1"
    result = submit_job(sub, "http://h:8265", wait=False, client=FakeClient(["PENDING"]))
    assert result["status"] == "PENDING"  # --no-wait: submitted, not waited for
    with pytest.raises(RauError, match="still RUNNING"):
        submit_job(sub, "http://h:8265", client=FakeClient(["RUNNING"]), poll_s=0, timeout_s=0)


def test_cli_parses_job_options_and_script_arguments(monkeypatch):
    a = build_parser().parse_args(["submit", "make_data", "--address", "h:8265", "--config",
                                   "jobs/configs/data-tiny.yaml", "--follow"])
    assert (a.job, a.address, a.follow, a.args) == ("make_data", "h:8265", True, [])
    a = build_parser().parse_args(["submit", "--config", "jobs/configs/data-tiny.yaml", "--pip", "x==1", "--env",
                                   "A=1", "make_data", "--", "--out", "/tmp/x"])
    assert a.args == ["--out", "/tmp/x"] and a.pip == ["x==1"] and a.env == ["A=1"]
    captured = {}

    def fake_submit(submission, address, **kw):
        captured.update(submission=submission, address=address, **kw)
        return {"status": "SUCCEEDED"}

    monkeypatch.setattr("rau_ray.cluster.submit.submit_job", fake_submit)
    run_from_args(a)
    assert captured["submission"].entrypoint.endswith("--out /tmp/x") and captured["wait"] is True
    assert captured["submission"].runtime_env["env_vars"] == {"A": "1"}


def test_cli_errors_and_exit_status(monkeypatch, capsys):
    from rau_ray import cli

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert cli.main(["submit", "sft", "--config", "jobs/configs/sft-tiny.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error: no job server address")
    assert cli.main(["submit", "sft", "--config", "jobs/configs/sft-tiny.yaml", "--address", "127.0.0.1:9"]) == 2
    assert "error: cannot reach the Ray job server at http://127.0.0.1:9" in capsys.readouterr().err
    # a job that failed: the CLI prints its state and exits 1 (like `ray job submit`)
    monkeypatch.setattr("rau_ray.cluster.submit.submit_job", lambda *a, **k: {"status": "FAILED", "message": "x"})
    with pytest.raises(SystemExit) as e:
        cli.main(["submit", "sft", "--address", "h:1", "--config", "jobs/configs/sft-tiny.yaml"])
    assert e.value.code == 1 and json.loads(capsys.readouterr().out)["status"] == "FAILED"
