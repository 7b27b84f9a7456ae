"""Submit a ``jobs/`` entrypoint to a Ray cluster with the Ray Jobs SDK, stream its logs, return its final status.

The job runs ``python jobs/<JOB>.py --config <FILE> [ARGS...]`` on the cluster, in a ``runtime_env`` whose
``working_dir`` is this repository (uploaded without ``.git``, ``.venv``, ``runs``...; the config must lie inside
it, since that is what the cluster receives), plus what the flags add: ``pip`` packages installed for the job,
``env_vars``, a ``py_executable`` or an ``image_uri`` (a container image, for clusters whose nodes have none of
this installed). ``--runtime-env FILE`` (YAML) gives any other field; the flags win over it.
Use: ``rau submit sft --address http://HEAD:8265 --config jobs/configs/sft-paper.yaml --follow``, or from Python
``submit_job(build_submission("sft", "jobs/configs/sft-paper.yaml"), "http://HEAD:8265", follow=True)``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ray.job_submission import JobSubmissionClient

from rau_ray.errors import ConfigError, RauError

REPO = Path(__file__).resolve().parents[2]
# Never uploaded (gitignore syntax, relative to working_dir): the venv, VCS data, outputs, caches.
DEFAULT_EXCLUDES = (".git", ".venv", "venv", "runs", "outputs", "data", "**/__pycache__", "*.egg-info",
                    ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_PORT = 8265  # the dashboard's HTTP port, which serves the Jobs API


@dataclass
class Submission:
    """What is sent: the entrypoint command, the runtime_env, and the id it gets."""

    entrypoint: str
    runtime_env: dict
    submission_id: str | None = None
    metadata: dict = field(default_factory=dict)
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None


def job_script(job: str, working_dir: Path) -> str:
    """``jobs/<job>.py`` (relative, posix) for a job name (``sft``, ``make_data``, ``make-data``) or a path."""
    candidates = [job] if job.endswith(".py") else [f"jobs/{job}.py", f"jobs/{job.replace('-', '_')}.py"]
    for rel in candidates:
        path = (working_dir / rel).resolve()
        if path.is_file():
            return _inside(path, working_dir, "job")
    known = sorted(p.stem for p in (working_dir / "jobs").glob("*.py") if not p.name.startswith("_"))
    raise ConfigError(f"unknown job {job!r}: no {candidates[0]} in {working_dir}; "
                      f"choose one of {', '.join(known) or '(no jobs/*.py there)'}")


def _inside(path: Path, working_dir: Path, what: str) -> str:
    try:
        return path.resolve().relative_to(working_dir.resolve()).as_posix()
    except ValueError:
        raise ConfigError(f"{what} {path} is outside the working dir {working_dir}: the cluster receives only the "
                          "working dir, so put it there (or pass --working-dir)") from None


def parse_env(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ConfigError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def build_submission(job: str, config: str | os.PathLike, args: list[str] | tuple[str, ...] = (),
                     working_dir: str | os.PathLike = REPO, excludes: list[str] | tuple[str, ...] = (),
                     pip: list[str] | tuple[str, ...] = (), env: dict[str, str] | None = None,
                     runtime_env_file: str | os.PathLike | None = None, python: str = "python",
                     py_executable: str | None = None, image_uri: str | None = None,
                     submission_id: str | None = None, entrypoint_num_cpus: float | None = None,
                     entrypoint_num_gpus: float | None = None) -> Submission:
    """Check the job and config locally, then build the entrypoint and runtime_env (nothing is sent yet)."""
    working_dir = Path(working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise ConfigError(f"working dir {working_dir}: no such folder")
    script = job_script(job, working_dir)
    config_path = Path(config).expanduser()
    if not config_path.is_absolute() and not config_path.is_file():
        config_path = working_dir / config_path  # relative to the working dir as the job sees it
    if not config_path.is_file():
        raise ConfigError(f"config file not found: {config}")
    rel_config = _inside(config_path, working_dir, "config")
    try:
        loaded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{config}: not valid YAML ({e})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{config}: expected a mapping of fields, got {type(loaded).__name__}")

    runtime_env: dict = {}
    if runtime_env_file:
        try:
            runtime_env = yaml.safe_load(Path(runtime_env_file).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"runtime env {runtime_env_file}: {e}") from None
        if not isinstance(runtime_env, dict):
            raise ConfigError(f"runtime env {runtime_env_file}: expected a mapping (a Ray runtime_env)")
    runtime_env["working_dir"] = str(working_dir)
    runtime_env["excludes"] = list(dict.fromkeys([*DEFAULT_EXCLUDES, *runtime_env.get("excludes", []), *excludes]))
    if pip:
        runtime_env["pip"] = list(pip)
    if env:
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **env}
    if py_executable:
        runtime_env["py_executable"] = py_executable
    if image_uri:
        runtime_env["image_uri"] = image_uri
    entrypoint = shlex.join([python, script, "--config", rel_config, *args])
    return Submission(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                      metadata={"job": Path(script).stem, "config": rel_config, "submitted_by": "rau submit"},
                      entrypoint_num_cpus=entrypoint_num_cpus, entrypoint_num_gpus=entrypoint_num_gpus)


def normalise_address(address: str | None) -> str:
    """The Jobs API URL: ``--address``, else $RAY_API_SERVER_ADDRESS; ``host:port`` gets ``http://``."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address:
        raise ConfigError(f"no job server address: pass --address http://HEAD:{DEFAULT_PORT} (the head's dashboard "
                          "port; `ray dashboard cluster.yaml` forwards it) or set RAY_API_SERVER_ADDRESS")
    return address if "://" in address else f"http://{address}"


def connect(address: str):
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, OSError) as e:
        raise RauError(f"cannot reach the Ray job server at {address}: {_short(e)}; the address is the head's "
                       f"dashboard HTTP port ({DEFAULT_PORT} by default), not the GCS port (6379)") from None


def submit_job(submission: Submission, address: str | None, follow: bool = False, wait: bool = True,
               out=None, poll_s: float = 1.0, timeout_s: float | None = None, client=None) -> dict:
    """Submit; with ``follow`` stream the job's logs to ``out`` until it ends; with ``wait`` (default) return once it
    reached a final status. Returns ``{"submission_id", "status", "message", ...}``; a FAILED/STOPPED job is
    returned too (the caller decides; the CLI exits 1). Ctrl-C detaches: the job keeps running."""
    out = out or sys.stdout
    address = normalise_address(address)
    client = client or connect(address)
    try:
        job_id = client.submit_job(entrypoint=submission.entrypoint, runtime_env=submission.runtime_env,
                                   submission_id=submission.submission_id, metadata=submission.metadata,
                                   entrypoint_num_cpus=submission.entrypoint_num_cpus,
                                   entrypoint_num_gpus=submission.entrypoint_num_gpus)
    except (RuntimeError, ValueError, OSError, TypeError) as e:  # runtime_env rejected, upload too large, server
        raise RauError(f"job submission to {address} failed: {_short(e)}") from None
    result = {"submission_id": job_id, "address": address, "entrypoint": submission.entrypoint,
              "stop": f"ray job stop {job_id} --address {address}",
              "logs": f"ray job logs {job_id} --address {address} --follow"}
    print(f"submitted {job_id}: {submission.entrypoint}", file=sys.stderr, flush=True)
    if not (follow or wait):
        return {**result, "status": str(client.get_job_status(job_id))}
    try:
        if follow:
            asyncio.run(_tail(client, job_id, out))
        status = _wait(client, job_id, poll_s, timeout_s)
    except KeyboardInterrupt:
        print(f"detached; job {job_id} keeps running. Stop it with: {result['stop']}", file=sys.stderr)
        raise
    info = client.get_job_info(job_id)
    result.update(status=status, message=info.message or "")
    if status != "SUCCEEDED" and not follow:  # show why, since the logs were not streamed
        result["logs_tail"] = client.get_job_logs(job_id)[-4000:]
    return result


async def _tail(client, job_id: str, out) -> None:
    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()


def _wait(client, job_id: str, poll_s: float, timeout_s: float | None) -> str:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id))
        status = status.rsplit(".", 1)[-1]  # JobStatus.SUCCEEDED -> SUCCEEDED
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise RauError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def _short(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 600 else text[:600] + "..."


def add_arguments(p) -> None:
    p.add_argument("job", help="a jobs/ entrypoint: make_data, sft, grpo, seg, eval, tune (or a path jobs/X.py)")
    p.add_argument("--config", required=True, help="the job's config YAML, inside the working dir")
    p.add_argument("--address", help=f"job server URL, http://HEAD:{DEFAULT_PORT} (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--no-wait", action="store_true", help="return right after submitting (prints the job id)")
    p.add_argument("--working-dir", default=str(REPO), help="folder uploaded as the job's working_dir "
                                                            "(default: this repository)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="also leave out of the upload (gitignore syntax; .git, .venv, runs... always are)")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="pip requirement installed for the job (runtime_env pip), e.g. --pip -e. or a wheel")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="env var of the job")
    p.add_argument("--runtime-env", help="a runtime_env YAML (any Ray field); the flags override it")
    p.add_argument("--python", default="python", help="interpreter of the entrypoint on the cluster "
                                                      "(default: python, the nodes' PATH)")
    p.add_argument("--py-executable", help="runtime_env py_executable: interpreter of the job's Ray workers")
    p.add_argument("--image-uri", help="runtime_env image_uri: run the job in this container image")
    p.add_argument("--submission-id", help="job id to use (default: Ray makes one)")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver process")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver process")
    p.add_argument("--timeout", type=float, help="give up waiting after this many seconds (the job keeps running)")
    p.add_argument("args", nargs="*", metavar="-- ARGS",
                   help="more arguments for the job script, after --; then JOB goes last: "
                        "rau submit --config C --address URL sft -- --max-steps 10")


def run_from_args(a) -> dict:
    """``rau submit``: the submission's final state (the CLI exits 1 unless SUCCEEDED, like ``ray job submit``)."""
    submission = build_submission(
        a.job, a.config, args=a.args, working_dir=a.working_dir, excludes=a.exclude, pip=a.pip,
        env=parse_env(a.env), runtime_env_file=a.runtime_env, python=a.python, py_executable=a.py_executable,
        image_uri=a.image_uri, submission_id=a.submission_id, entrypoint_num_cpus=a.entrypoint_num_cpus,
        entrypoint_num_gpus=a.entrypoint_num_gpus)
    return submit_job(submission, a.address, follow=a.follow, wait=not a.no_wait, timeout_s=a.timeout)
