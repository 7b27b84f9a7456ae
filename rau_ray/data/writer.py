"""Run per-item work (generate or convert, then encode) on Ray or in-process, and write what comes back.

Workers return encoded bytes instead of writing, so nothing needs a shared filesystem; the driver writes every
file atomically (temp + rename) as results arrive, with a progress bar. Used by ``make`` and ``importers``.
Use: ``rows, n_files = write_all(partial(work, cfg), items, out, backend="ray", desc="ct-abdomen")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rau_ray import ray_session
from rau_ray.atomic import atomic_write_bytes, remove_stale_temps
from rau_ray.data.manifest import ManifestRow
from rau_ray.errors import RauError

BACKENDS = ("ray", "local")


@dataclass
class Encoded:
    """What one unit of work produced: files to write and the manifest rows describing them."""

    files: list[tuple[str, bytes]] = field(default_factory=list)  # (path relative to the output folder, bytes)
    rows: list[ManifestRow] = field(default_factory=list)


def _run_chunk(fn: Callable, items: Sequence) -> list[Encoded]:
    return [fn(item) for item in items]


def write_all(fn: Callable[[object], Encoded], items: Sequence, out: Path, backend: str = "ray",
              desc: str = "", unit: str = "item", progress: bool = True,
              items_per_task: int = 0) -> tuple[list[ManifestRow], int]:
    """Apply ``fn`` to every item and write the files; returns (all manifest rows, number of files written).

    ``items_per_task`` 0 picks a chunk size giving each CPU about four tasks: large enough to hide Ray's
    per-task overhead, small enough to balance the load and move the progress bar.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if out.is_dir():
        remove_stale_temps(out)  # left by a writer that was killed (SIGKILL skips cleanup)
    rows: list[ManifestRow] = []
    n_files = 0
    with tqdm(total=len(items), unit=unit, desc=f"{desc} ({backend})", disable=not progress) as bar:

        def write(enc: Encoded) -> None:
            nonlocal n_files
            for rel, data in enc.files:
                atomic_write_bytes(out / rel, data)
            n_files += len(enc.files)
            rows.extend(enc.rows)
            bar.update(1)

        if backend == "local":
            for item in items:
                write(fn(item))
            return rows, n_files

        ray = ray_session.connect()
        per_task = items_per_task or max(1, min(16, len(items) // (4 * ray_session.cluster_cpus())))
        remote = ray.remote(num_cpus=1)(_run_chunk)
        fn_ref = ray.put(fn)
        pending = [remote.remote(fn_ref, items[i:i + per_task]) for i in range(0, len(items), per_task)]
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                try:
                    results = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, RauError):  # bad input found by a worker: the user's error, unwrapped
                        raise e.cause from None
                    raise
                for enc in results:
                    write(enc)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            remove_stale_temps(out)  # a Ctrl-C landing between mkstemp and its cleanup handler leaves one
            raise
    return rows, n_files
