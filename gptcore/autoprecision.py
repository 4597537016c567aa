"""What ``precision=auto`` means on a CPU: bf16 autocast or fp32, whichever a short measurement here finds faster.

Whether bf16 pays on a CPU depends on the CPU and on the work, not on a feature flag: on an Intel Xeon with AVX-512
bf16, training steps ran 1.9x faster under bf16 autocast while batch-1 decoding ran slower than in fp32; on CPUs
without native bf16 it is emulated. So each workload is measured once per machine, with a micro-benchmark of its
own shape (about a second each; ~2 s for training where bf16 is emulated, 20-30x slower):

- ``train``: forward and backward of a transformer MLP (768 -> 3072 -> 768) on 128 tokens, the matmuls a
  training step is made of;
- ``sample``: batch-1 decoding through 128 MB of fp32 weights (more than a CPU's caches, as gpt2-small's 650 MB
  are), each weight cast to bf16 once per autocast region, as `gptcore.sampling.generate` runs under autocast.

The timings are cached in ``<cache_dir>/precision.json`` under the CPU model and torch version (`machine_key`), so
each machine measures once; delete the file (or an entry) to measure again. GPUs are not measured (`resolve_precision`
keeps bf16 where a GPU supports it).
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import torch

from gptcore.cache import cache_dir
from gptcore.files import atomic_write_bytes

Workload = Literal["train", "sample"]
WORKLOADS: tuple[Workload, ...] = ("train", "sample")
CACHE_FILE = "precision.json"
ROUNDS = 3  # fp32 and bf16 alternate, the fastest round of each counts: robust to another process's bursts
CLEAR_GAP = 2.0  # a ratio no burst of another process explains: the rounds stop there


def cache_path() -> Path:
    """The per-machine timings file (under ``$GPTCORE_CACHE_DIR`` when set: tests point it elsewhere)."""
    return cache_dir() / CACHE_FILE


def cpu_model() -> str:
    """The CPU's model name as Linux reports it (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What the cached timings hold for: the CPU model and the torch build that ran them."""
    return f"{cpu_model()} | torch {torch.__version__}"


def bf16_is_faster(timings: dict[str, float]) -> bool:
    """The rule: bf16 where its measured time is below fp32's (``timings``: seconds of each, ``fp32_s``/``bf16_s``)."""
    return timings["bf16_s"] < timings["fp32_s"]


def cpu_prefers_bf16(workload: Workload) -> bool:
    """Whether ``workload`` runs faster under bf16 autocast than in fp32 on this CPU: cached timings, measured here
    first if this machine has none for it."""
    return bf16_is_faster(cpu_timings(workload))


def cpu_timings(workload: Workload) -> dict[str, float]:
    """This machine's cached fp32 and bf16 seconds of ``workload``; measured and cached once when missing (under a
    lock, so that processes starting together measure once and not against each other)."""
    from gptcore.corpus import locked

    path, key = cache_path(), machine_key()
    cached = _read(path).get(key, {}).get(workload)
    if cached is not None:
        return cached
    with locked(path.with_name(path.name + ".lock")):
        entries = _read(path)  # another process may have measured while this one waited
        cached = entries.get(key, {}).get(workload)
        if cached is not None:
            return cached
        timings = {**measure(workload), "measured_at": datetime.now(UTC).isoformat(timespec="seconds")}
        entries.setdefault(key, {})[workload] = timings
        atomic_write_bytes(path, (json.dumps(entries, indent=1, sort_keys=True) + "\n").encode())
        return timings


def _read(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """The cache's entries; none when it is missing or unreadable (a cache is rebuilt, not trusted)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def measure(workload: Workload) -> dict[str, float]:
    """Seconds of ``workload``'s micro-benchmark in fp32 and under bf16 autocast, on this process's CPU threads; the
    fastest of up to `ROUNDS` rounds each, fewer once one is `CLEAR_GAP` times the other (emulated bf16 can be 30x
    slower: more rounds would only cost time)."""
    with torch.random.fork_rng(devices=[]):  # the probes' random weights leave a run's random stream as it was
        run = {"train": _training_probe, "sample": _decoding_probe}[workload]()
        best = {"fp32_s": float("inf"), "bf16_s": float("inf")}
        run(None), run(torch.bfloat16)  # warm-up: first-call allocations and kernel selection
        for _ in range(ROUNDS):
            for name, dtype in (("fp32_s", None), ("bf16_s", torch.bfloat16)):
                best[name] = min(best[name], run(dtype))
            if max(best.values()) >= CLEAR_GAP * min(best.values()):
                break
    return best


def _training_probe() -> Callable[[torch.dtype | None], float]:
    """One MLP block's forward and backward on 128 tokens; seconds per call."""
    gen = torch.Generator().manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(768, 3072), torch.nn.GELU(), torch.nn.Linear(3072, 768))
    x = torch.randn(128, 768, generator=gen)

    def step(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = mlp(x)
        out.float().square().mean().backward()
        mlp.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def _decoding_probe(tokens: int = 8) -> Callable[[torch.dtype | None], float]:
    """``tokens`` batch-1 positions through 4 MLPs of 1024 -> 4096 -> 1024 (128 MB of fp32 weights); seconds per
    call, the weights' bf16 casts (once per autocast region, before the first position) not counted."""
    layers = []
    for _ in range(4):
        layers += [torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024)]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(0))

    def decode(dtype: torch.dtype | None) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            model(x)  # casts every weight (kept for the region, as in generate)
            start = time.perf_counter()
            for _ in range(tokens):
                model(x)
            return time.perf_counter() - start

    return decode
