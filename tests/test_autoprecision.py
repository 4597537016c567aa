"""``precision=auto`` on a CPU: the faster of bf16 and fp32 as measured on this machine, per workload, measured once."""

import json

import pytest
import torch

from gptcore.autoprecision import CACHE_FILE, machine_key
from gptcore.runtime import resolve_precision

from .conftest import cache_precision_timings

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCORE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_auto_takes_the_faster_precision_of_each_workload(cache):
    """Given measured timings: bf16 where it was faster, fp32 where it was not, for training and sampling apart."""
    cache_precision_timings(cache, train=(2.0, 1.0), sample=(1.0, 2.0))  # (fp32 s, bf16 s)
    assert resolve_precision("auto", CPU, "train") is torch.bfloat16
    assert resolve_precision("auto", CPU, "sample") is None
    cache_precision_timings(cache, train=(1.0, 1.5), sample=(3.0, 0.5))
    assert resolve_precision("auto", CPU, "train") is None
    assert resolve_precision("auto", CPU, "sample") is torch.bfloat16
    assert resolve_precision("bf16", CPU, "sample") is torch.bfloat16  # an explicit precision is kept as it is
    assert resolve_precision("fp32", CPU, "train") is None


def test_the_measurement_is_written_once_and_reused(cache):
    """No timings for this machine: measured (leaving the global random stream as it was) and cached under its CPU
    model and torch version, other machines' entries kept; a second resolution reads the cache (its timings decide)
    and writes nothing."""
    other = {"Other CPU | torch 0.0": {"train": {"fp32_s": 1.0, "bf16_s": 2.0}}}
    (cache / CACHE_FILE).write_text(json.dumps(other))
    rng = torch.random.get_rng_state()
    auto = resolve_precision("auto", CPU, "train")
    assert torch.equal(torch.random.get_rng_state(), rng)  # a run that measures draws the numbers a cached one draws
    entries = json.loads((cache / CACHE_FILE).read_text())
    assert entries["Other CPU | torch 0.0"] == other["Other CPU | torch 0.0"]
    measured = entries[machine_key()]
    assert list(measured) == ["train"]  # sampling is measured when something samples
    fp32_s, bf16_s = measured["train"]["fp32_s"], measured["train"]["bf16_s"]
    assert fp32_s > 0 and bf16_s > 0
    assert auto is (torch.bfloat16 if bf16_s < fp32_s else None)

    measured["train"].update(fp32_s=bf16_s, bf16_s=fp32_s)  # swapped: only a read of the cache can see this
    written = json.dumps(entries)
    (cache / CACHE_FILE).write_text(written)
    assert resolve_precision("auto", CPU, "train") is (None if auto is torch.bfloat16 else torch.bfloat16)
    assert (cache / CACHE_FILE).read_text() == written
