"""Shared test setup: corpora from the local mirror, an isolated cache, tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def _environment(tmp_path_factory):
    os.environ.setdefault("GPTCORE_DATA_DIR", str(SHARED_DATA))
    os.environ["GPTCORE_CACHE_DIR"] = str(tmp_path_factory.mktemp("gptcore-cache"))
    yield


@pytest.fixture
def verdict_path() -> Path:
    path = Path(os.environ["GPTCORE_DATA_DIR"]) / "the-verdict.txt"
    assert path.is_file(), f"the-verdict.txt not found in {path.parent}; set GPTCORE_DATA_DIR"
    return path


def tiny_job(**sections):
    """A JobConfig with the tiny model on the-verdict, a few steps; override by section dicts."""
    from gptcore.config import JobConfig

    raw = {
        "model": {"preset": "micro", "dropout": 0.0},
        "data": {"corpus": "the-verdict"},
        "train": {"batch_size": 4, "max_steps": 6, "eval_every": 3, "eval_iters": 2, "sample_max_new_tokens": 5},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return JobConfig.from_dict(raw)


@pytest.fixture(scope="session")
def studies(tmp_path_factory):
    """Every study run once (`tests.studies`); (work folder, {name: (exit code, output)})."""
    from tests.studies import run_studies

    work = tmp_path_factory.mktemp("studies")
    return work, run_studies(work)
