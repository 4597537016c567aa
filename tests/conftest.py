"""Shared test setup: corpora from the local mirror, an isolated cache, tiny configs."""

from __future__ import annotations

import importlib.util
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


def cache_precision_timings(cache: Path, **workloads: tuple[float, float]) -> None:
    """Put measured (fp32, bf16) seconds per workload in the precision cache under ``cache`` for this machine, as
    `gptcore.autoprecision` writes them: what ``precision=auto`` then decides without measuring."""
    import json

    from gptcore.autoprecision import CACHE_FILE, machine_key

    entry = {name: {"fp32_s": fp32, "bf16_s": bf16} for name, (fp32, bf16) in workloads.items()}
    (cache / CACHE_FILE).write_text(json.dumps({machine_key(): entry}))


@pytest.fixture(scope="session")
def studies(tmp_path_factory):
    """Every study run once (`tests.studies`); (work folder, {name: (exit code, output)})."""
    from tests.studies import run_studies

    work = tmp_path_factory.mktemp("studies")
    return work, run_studies(work)


# --------------------------------------------------------------------------- two test processes (pytest-xdist)
# `make test` runs `pytest -n 2`: the Ray scenarios spend much of their time waiting on process starts and sockets, so
# two run at once, and the fast tests fill the gaps. A test file is sent whole to one process (its module fixtures
# run once); files that share a session fixture go together. The longest files go first (their `--durations` here),
# so that neither process is left with a long one at the end. (Not `--dist loadgroup` with `xdist_group` marks: under
# pytest 9.2 it silently stops grouping, pytest-dev/pytest-xdist#1386, and a shared fixture would run in both.)
SAME_PROCESS = {"tests/test_mlflow_models.py": "tests/test_studies.py"}  # both read the `studies` fixture
LONGEST_FIRST = [
    "tests/test_studies.py",  # every experiment file on a shared cluster, ~230 s with test_mlflow_models.py
    "tests/test_mlflow_models.py",
    "tests/test_spot.py",  # a reclaim and a grow-back on a 2-node cluster, then a reference run, ~290 s
    "tests/test_interrupted.py",  # three drivers, each with its local Ray, ~110 s
    "tests/test_faults.py",  # ~75 s
    "tests/test_tracking_outage.py",  # ~60 s
    "tests/test_scale_out.py",  # ~55 s
    "tests/test_fsdp.py",  # spawned ranks, ~30 s
]


def _file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the longest files first; each process collects the same order, the work queue follows it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item: pytest.Item) -> int:
        file = _file_of(item.nodeid)
        return LONGEST_FIRST.index(file) if file in LONGEST_FIRST else len(LONGEST_FIRST)

    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda item: (rank(item), order[id(item)]))


if importlib.util.find_spec("xdist"):
    from xdist.scheduler import LoadFileScheduling

    class _FileScheduling(LoadFileScheduling):
        """``--dist loadfile``, with the files of `SAME_PROCESS` as one unit of work, sent in collection order."""

        def __init__(self, config: pytest.Config, log=None) -> None:
            super().__init__(config, log)
            config.option.loadscopereorder = False  # not by test count: `LONGEST_FIRST` has ordered the collection

        def _split_scope(self, nodeid: str) -> str:
            file = _file_of(nodeid)
            return SAME_PROCESS.get(file, file)

    def pytest_xdist_make_scheduler(config: pytest.Config, log) -> LoadFileScheduling:
        return _FileScheduling(config, log)
