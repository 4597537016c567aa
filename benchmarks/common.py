"""Shared pieces of the benchmark scripts: one side per subprocess, timing, tables, the machine, shapes.

A script measures each side (ours, the reference) in a fresh Python process started with ``--side``:
process-wide settings one side makes (malloc tuning, thread pools, allocator caches) cannot leak
into the other. A side prints one ``BENCH_RESULT {json}`` line; the parent collects it with
`run_side`. Every script ends with its figures (`Report`): ``BENCH_SUMMARY {json}`` lines that ``run_all.py``
tabulates, and ``benchmarks/results/<bench>.json``, from which ``summary.py`` writes BENCHMARKS.md's summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = "BENCH_RESULT "
SUMMARY = "BENCH_SUMMARY "
RESULTS = ROOT / "benchmarks" / "results"

#: The book's GPT_CONFIG_124M with a 256-token context (chapter 5's training setting).
BOOK_CONFIG: dict[str, Any] = {
    "vocab_size": 50257,
    "context_length": 256,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

#: gptcore's model section for the same shapes: gpt2-small, context 256, no QKV bias, untied head.
OUR_MODEL: dict[str, Any] = {
    "preset": "gpt2-small",
    "context_length": 256,
    "qkv_bias": False,
    "tie_weights": False,
    "init_scheme": "torch",
}


# --------------------------------------------------------------------------- sides


def emit(payload: dict[str, Any], prefix: str = RESULT) -> None:
    """Print one machine-readable line for the parent process."""
    print(prefix + json.dumps(payload), flush=True)


def parse_lines(output: str, prefix: str) -> list[dict[str, Any]]:
    """Every ``prefix {json}`` payload in ``output``, in order."""
    return [json.loads(line[len(prefix) :]) for line in output.splitlines() if line.startswith(prefix)]


def run_side(
    script: str | Path, args: Sequence[str], *, timeout: float = 900.0, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process (``env`` added to its environment); its last
    ``BENCH_RESULT`` plus ``process_s``."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    wall = time.perf_counter() - start
    results = parse_lines(proc.stdout, RESULT)
    if proc.returncode != 0 or not results:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    return {**results[-1], "process_s": wall}


class Report:
    """One script's figures: printed as ``BENCH_SUMMARY`` lines (``run_all.py`` tabulates them) and written to
    ``benchmarks/results/<name>.json`` with the commit, date, machine and load average, where ``summary.py`` reads
    them. Results of separate runs combine there: each script rewrites its own file only."""

    def __init__(self, name: str, *, quick: bool = False) -> None:
        self.name, self.quick = name, quick
        self.figures: list[dict[str, Any]] = []
        self.started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        self.commit = commit()  # the code this run measures, read before it runs

    def figure(
        self,
        figure: str,
        measured: str,
        *,
        ratio: float | None = None,
        like_for_like: str = "",
        goal: str = "-",
        met: bool | None = None,
    ) -> None:
        """One figure: what it is, the measurement beside its reference (``measured``), its ``ratio`` to the
        reference, the same comparison at the same settings on both sides (``like_for_like``) where ``measured``
        differs in settings, and the ``goal`` (``met=None``: no goal, or not measured)."""
        entry = {"figure": figure, "measured": measured, "ratio": ratio, "like_for_like": like_for_like}
        self.figures.append({**entry, "goal": goal, "met": met})
        emit({"bench": figure, "figure": measured, "goal": goal, "met": met}, SUMMARY)

    def unmeasured(self, figure: str, why: str, goal: str = "-") -> None:
        """A figure this machine cannot measure (``why``: "no GPU")."""
        self.figure(figure, f"unmeasured ({why})", goal=goal)

    def save(self) -> Path | None:
        """Write the results file; a run that measured nothing leaves an existing one as it is (a GPU figure is not
        replaced by "unmeasured" from a machine without a GPU)."""
        path = RESULTS / f"{self.name}.json"
        measured = any(not f["measured"].startswith("unmeasured") for f in self.figures)
        if not measured and path.is_file():
            return None
        record = {
            "bench": self.name,
            "command": " ".join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]]),
            "quick": self.quick,
            "commit": self.commit,
            "date": self.started,
            "cpu": cpu_model(),
            "machine": machine(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "figures": self.figures,
        }
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"results: {path.relative_to(ROOT)}", flush=True)
        return path


# --------------------------------------------------------------------------- training steps


def random_batch(batch_size: int, context: int, device: Any = "cpu", vocab_size: int = 50257) -> tuple[Any, Any]:
    """Inputs and next-token targets (``batch_size``, ``context``) of seeded random token ids."""
    import torch

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab_size, (batch_size, context + 1), generator=g).to(device)
    return tokens[:, :-1], tokens[:, 1:]


def our_step(
    model: Any, optimizer: Any, batch: tuple[Any, Any], dtype: Any, grad_clip: float = 0.0
) -> Callable[[], None]:
    """One optimizer step as `gptcore.train.train` takes it: `gptcore.train.optimizer_step` itself."""
    import torch

    from gptcore.train import optimizer_step

    x, _ = batch
    scaler = torch.amp.GradScaler(x.device.type, enabled=dtype == torch.float16)

    def step() -> None:
        optimizer_step(model, optimizer, scaler, [batch], device=x.device, dtype=dtype, grad_clip=grad_clip)

    return step


def book_step(model: Any, optimizer: Any, batch: tuple[Any, Any]) -> Callable[[], None]:
    """One step of the book's ``train_model_simple`` (its `calc_loss_batch`, fp32)."""
    from llms_from_scratch.ch05 import calc_loss_batch

    x, y = batch

    def step() -> None:
        optimizer.zero_grad()
        calc_loss_batch(x, y, model, x.device).backward()
        optimizer.step()

    return step


# --------------------------------------------------------------------------- timing


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int, budget_s: float = float("inf")) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls; fewer once ``budget_s`` is
    spent (at least one timed call; warm-ups only in the first half): a side 30x slower than the others (bf16
    emulated on a CPU without it) is measured, not waited for."""
    start = time.perf_counter()
    for _ in range(warmup):
        if time.perf_counter() - start > budget_s / 2:
            break
        fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
        if time.perf_counter() - start > budget_s:
            break
    return times


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(ours: float, ref: float) -> float:
    return ours / ref if ref else float("nan")


# --------------------------------------------------------------------------- output


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table with aligned columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells[1:])])


def cpu_model() -> str:
    """The CPU's model name (`gptcore.autoprecision.cpu_model`: the key of ``precision=auto``'s cached timings)."""
    from gptcore.autoprecision import cpu_model as model

    return model()


def commit() -> str:
    """HEAD's short hash, with ``+dirty`` when the working tree has uncommitted changes to tracked files."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no")
    return git("log", "-1", "--format=%h") + ("+dirty" if dirty else "")


def machine() -> str:
    """CPU model, cores, memory, bf16 support, GPU, torch version and load average of this machine."""
    import torch

    mem = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    bf16 = "native bf16 (AVX-512 bf16/AMX)" if native else "no native bf16"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    load = ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return f"{cpu_model()}, {os.cpu_count()} cores{mem}, {bf16}{gpu}, torch {torch.__version__}{load}"


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc/self/status (Linux)."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def size(n: float) -> str:
    """Bytes in KiB, MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 2**10:,.1f} KiB"
