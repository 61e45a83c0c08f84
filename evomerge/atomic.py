"""Atomic, durable writes: a file or a directory either appears whole or not at all.

Every writer in evomerge (recipes, run-dir state, exports, checkpoints, the zoo) goes through here, so
they all get the same guarantee: the content is written to a temporary name in the target's own
directory, flushed to disk (``fsync``), renamed over the target, and the directory entry is flushed
too. A crash leaves either the old content or the new, never half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (a rename inside it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically and durably."""
    write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp: str | Path, out_dir: str | Path) -> None:
    """Move a fully written directory ``tmp`` to ``out_dir``, replacing what was there.

    The old directory is renamed aside first and deleted only once the new one is in place.
    """
    tmp, out_dir = Path(tmp), Path(out_dir)
    fsync_dir(tmp)
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, trash / "old")
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)


@contextlib.contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on error it is removed."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the result private
    try:
        yield tmp
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
