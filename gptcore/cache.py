"""Where gptcore keeps what it downloads or builds once per machine: ``$GPTCORE_CACHE_DIR``, else
``~/.cache/gptcore``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

CACHE_ENV = "GPTCORE_CACHE_DIR"  # downloads, prepared datasets, the tokenizer's ranks; default ~/.cache/gptcore


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptcore"
    return Path(os.environ.get(CACHE_ENV) or default).expanduser().absolute()


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
