"""Atomic file writes: write to a temp file in the same folder, fsync, then rename over the target.

An interrupted write leaves either the old file or nothing, never a half-written one.
Use: ``atomic_write_bytes(path, data)`` or ``with atomic_open(path, "w") as f: ...``; a whole folder:
``with atomic_dir(path) as tmp: ...`` (filled in a temp folder, renamed into place).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside ``path``; on a clean exit it replaces ``path``, on an exception it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open supports modes 'w' and 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A temp folder beside ``path`` to fill; on a clean exit it replaces ``path`` (an old folder there is renamed
    aside, then removed), on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; a written folder is for whoever may read its parent
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files left by a writer that was killed (SIGKILL skips cleanup). Returns how many."""
    n = 0
    for p in Path(folder).rglob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n


def figure_png(fig, dpi: int = 100) -> bytes:
    """A matplotlib figure as PNG bytes; the figure is closed so figures do not pile up in memory."""
    # every process imports this module, few draw (pyplot is 0.45 s of each Ray worker's start); a caller with a figure
    # has imported pyplot already
    from matplotlib import pyplot as plt  # noqa: PLC0415 - see above

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def atomic_write_figure(path: str | os.PathLike, fig, dpi: int = 100) -> Path:
    """A matplotlib figure as PNG at ``path`` (atomically), then closed (``storage.write_figure``: also URIs)."""
    atomic_write_bytes(path, figure_png(fig, dpi))
    return Path(path)
