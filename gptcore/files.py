"""Atomic writes: a file or folder appears whole at its destination or not at all, even if the process is killed."""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync(file: Path) -> None:
    """Flush ``file`` to the disk, so that a rename after it never publishes a file the OS has not written yet."""
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; where the OS can swap atomically, ``dst`` is never missing in between."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if exchange(src, dst):  # src now holds the old folder
        shutil.rmtree(src, ignore_errors=True)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")  # elsewhere: two renames (a brief gap)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
