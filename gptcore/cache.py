"""Where gptcore keeps what it downloads or builds once per machine: ``$GPTCORE_CACHE_DIR``, else
``~/.cache/gptcore``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GPTCORE_CACHE_DIR"  # downloads, prepared datasets, the tokenizer's ranks; default ~/.cache/gptcore


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptcore"
    return Path(os.environ.get(CACHE_ENV) or default).expanduser().absolute()
