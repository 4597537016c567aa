"""Orchestration overhead (issue 26): a sweep through ``python -m orchestrator run`` vs the same trainings plainly,
before and after a change, in one run.

micro sweep   (default) 4 trials of the ``micro`` preset on tinyshakespeare, 40 steps each (an evaluation with a
              sample at steps 20 and 40, a checkpoint at the end), one worker, ``max_concurrent=1``; the experiment
              file is written into each side's work folder
main job      (``--main``) ``experiments/stride_sweep.py`` at its default scale: two gpt2-small trials (~7-14 min a
              side here)

Each job runs three times, one after the other, never at once:

plain    one process: the sweep's jobs as its plan makes them (`make_plan`: a worker's CPUs as torch threads),
         `gptcore.train.train` one after the other, no hooks (the current working tree's code)
before   the CLI of a clone of this repository at ``--before`` (default 4f0790a), ``PYTHONPATH=<clone>``
after    the CLI of the current working tree, ``PYTHONPATH=<repo>``

Each sweep runs in a fresh temporary work folder (its mlruns.db, mlartifacts/, ray_results/ go there); PYTHONPATH
wins over the editable install, for the CLI and the Ray processes it starts (inherited; checked for the CLI before
each side). Every output line is time-stamped on arrival; the spans come from lines both sides print (Ray's "Started a
local Ray instance", "sweep <id>: MLflow parent run", Tune's "Trial <name> started", the worker's "[<trial>] N steps ("
and "[<trial>] <status> after N steps in", Tune's last "Wrote the latest version of all result files", "Results of
sweep", "registered ..."), whatever Ray prefixes worker lines with. A worker line is stamped when the
driver prints it (Ray forwards worker output from its log files, a fraction of a second later). Ray's log
deduplication is off (RAY_DEDUP_LOGS=0): it would fold lines of different trials that differ only in numbers.

Per-trial overhead is (sweep wall - plain wall) / trials; walls include interpreter start and imports.

    flock /tmp/ray.lock python benchmarks/bench_orchestration.py [--quick] [--main] [--before REF|none] [--keep DIR]
    python benchmarks/bench_orchestration.py --quick --before none --use-gpu    # on a GPU machine (gpu_acceptance.sh)

``--quick``: the micro sweep with 2 trials. ``--keep DIR``: each side's time-stamped output (``t<TAB>line``) and
its MLflow store (``<job>-<side>-mlruns.db``) are written to DIR.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import ROOT, Report, emit, machine, run_side, table

GOAL_S = 5.0
MAIN_GOAL_MIN = 8
DEFAULT_BEFORE = "4f0790a"  # the commit before issue 26's change
SHARED_DATA = ROOT.parent / "shared" / "data"  # the Makefile's offline corpora, when they sit beside the checkout
MICRO_STEPS = 40
MICRO = """
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="bench_orchestration",
    corpus="tinyshakespeare",
    model="micro",
    train={{"max_steps": {steps}, "eval_every": {every}}},
    grid={{"train.seed": grid({seeds})}},
    max_concurrent=1,
)
"""
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\([^()]*pid=\d+[^()]*\)\s*")  # "(RayTrainWorker pid=123)", "(X pid=1, ip=...)"
# (event, pattern): the first line matching a pattern marks the event; per-trial events name the trial.
EVENTS = [
    ("ray", re.compile(r"Started a local Ray instance")),
    ("parent", re.compile(r"^sweep \S+: MLflow parent run")),
    ("started", re.compile(r"^Trial (?P<trial>\S+) started")),
    ("first", re.compile(r"\[(?P<trial>[^\]]+)\] \d+ steps \(")),
    ("finished", re.compile(r"\[(?P<trial>[^\]]+)\] \w+ after \d+ steps in")),
    ("completed", re.compile(r"^Trial (?P<trial>\S+) completed")),
    ("tune_end", re.compile(r"Wrote the latest version of all result files")),
    ("results", re.compile(r"^Results of sweep")),
    ("registered", re.compile(r"^(not )?registered\b")),
]


@dataclass
class Job:
    name: str
    training: str  # what a trial's training span holds
    timeout_s: float
    file: Any = None  # side -> experiment file (a callable of (code root, work folder))
    overrides: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- plain side (a subprocess)


def measure_plain(experiment_file: Path, overrides: list[str], workdir: Path) -> dict[str, Any]:
    """The sweep's trainings in this process, one after the other, without hooks: its plan's jobs (with the torch
    threads the plan gives a worker's CPUs)."""
    os.chdir(workdir)
    from gptcore.train import train
    from orchestrator.experiment import load_experiment, parse_overrides
    from orchestrator.plan import SweepOptions, make_plan

    experiment = load_experiment(experiment_file)
    trials = make_plan(experiment, SweepOptions(overrides=parse_overrides(overrides, experiment.kind))).trials
    train_s = []
    for trial in trials:
        start = time.perf_counter()
        train(trial.job)
        train_s.append(time.perf_counter() - start)
    threads = sorted({t.job.train.num_threads for t in trials})
    return {"trials": [t.name for t in trials], "train_s": train_s, "threads": threads}


# --------------------------------------------------------------------------- sweep sides


def code_env(code_root: Path) -> dict[str, str]:
    """The environment of a side: its code first on PYTHONPATH, unbuffered output, no Ray log deduplication."""
    path = os.pathsep.join(p for p in (str(code_root), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}


def imported_from(code_root: Path, workdir: Path) -> str:
    """Where ``orchestrator`` and ``gptcore`` come from under a side's environment (a check that PYTHONPATH wins)."""
    probe = "import gptcore, orchestrator; print(orchestrator.__file__); print(gptcore.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=workdir, env=code_env(code_root), capture_output=True, text=True, check=True
    ).stdout.split()
    for path in out:
        if not Path(path).resolve().is_relative_to(code_root.resolve()):
            raise SystemExit(f"{path} is not under {code_root}: PYTHONPATH did not win over the installed package")
    return str(Path(out[0]).parent.parent)


def run_cli(code_root: Path, experiment: Path, job: Job, workdir: Path, use_gpu: bool) -> dict[str, Any]:
    """``python -m orchestrator run`` in ``workdir`` with ``code_root`` first on PYTHONPATH (``--use-gpu yes`` with
    ``use_gpu``); its wall time, exit code and time-stamped output lines."""
    sets = [arg for item in job.overrides for arg in ("--set", item)]
    gpu = ["--use-gpu", "yes"] if use_gpu else []
    command = [sys.executable, "-m", "orchestrator", "run", str(experiment), *sets, *gpu]
    timeout = job.timeout_s
    start = time.perf_counter()
    proc = subprocess.Popen(
        command,
        cwd=workdir,
        env=code_env(code_root),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # a timeout ends the CLI and the local Ray it started
    )
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None
    try:
        for raw in proc.stdout:
            lines.append((time.perf_counter() - start, ANSI.sub("", raw.rstrip("\n"))))
        code = proc.wait()
    finally:
        timer.cancel()
    return {"wall_s": time.perf_counter() - start, "exit": code, "lines": lines}


def find_events(lines: list[tuple[float, str]]) -> dict[str, Any]:
    """The first time of each event; per-trial events as {trial: time}."""
    events: dict[str, Any] = {}
    for t, line in lines:
        text = RAY_PREFIX.sub("", line)
        for name, pattern in EVENTS:
            match = pattern.search(text)
            if not match:
                continue
            if "trial" in pattern.groupindex:
                events.setdefault(name, {}).setdefault(match["trial"], t)
            elif name == "tune_end":  # Tune writes its state now and then: its end is the last time
                events[name] = t
            else:
                events.setdefault(name, t)
    return events


def per_trial(events: dict[str, Any], name: str, order: list[str]) -> list[float | None]:
    """Times of a per-trial event in the trials' start order: by name where the names are Tune's, else by order."""
    found: dict[str, float] = events.get(name, {})
    if set(found) <= set(order):
        return [found.get(trial) for trial in order]
    times: list[float | None] = sorted(found.values())
    return times + [None] * (len(order) - len(times))


def spans(result: dict[str, Any]) -> dict[str, Any]:
    """The spans of one sweep (seconds; None where a line is missing) and its trials in start order."""
    ev = find_events(result["lines"])
    wall = result["wall_s"]
    order = sorted(ev.get("started", {}), key=ev["started"].get) if "started" in ev else []
    started, first, finished = (per_trial(ev, n, order) for n in ("started", "first", "finished"))

    def gap(a: float | None, b: float | None) -> float | None:
        return b - a if a is not None and b is not None else None

    last_end = finished[-1] if finished else None
    return {
        "trials": order,
        "start": ev.get("parent"),
        "ray": ev.get("ray"),
        "ray_to_parent": gap(ev.get("ray"), ev.get("parent")),
        "tune_start": gap(ev.get("parent"), started[0] if started else None),
        "trial_start": [gap(s, f) for s, f in zip(started, first, strict=True)],
        "training": [gap(f, e) for f, e in zip(first, finished, strict=True)],
        "between": [gap(e, s) for e, s in zip(finished, started[1:], strict=False)],
        "end": gap(last_end, wall),
        "end_to_tune_end": gap(last_end, ev.get("tune_end")),
        "tune_end_to_results": gap(ev.get("tune_end"), ev.get("results")),
        "results_to_exit": gap(ev.get("results"), wall),
        "registered": ev.get("registered") is not None,
        "wall": wall,
    }


# --------------------------------------------------------------------------- report


def fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.1f}"


def each(values: list[float | None]) -> str:
    """Per-trial values and their mean."""
    if not values:
        return "-"
    known = [v for v in values if v is not None]
    mean = f" (mean {sum(known) / len(known):.1f})" if len(known) > 1 else ""
    return " / ".join(fmt(v) for v in values) + mean


def spans_table(job: Job, sides: dict[str, dict[str, Any]]) -> str:
    """The issue's spans, one column per side."""
    names = list(sides)
    rows_spec = [
        ("start: imports, local Ray, MLflow tables and the parent run", lambda s: fmt(s["start"])),
        ('  of which to "Started a local Ray instance"', lambda s: fmt(s["ray"])),
        ("  of which Ray started to the parent run (data check, MLflow tables, runs)",
         lambda s: fmt(s["ray_to_parent"])),
        ('Tune start to the first trial\'s "started"', lambda s: fmt(s["tune_start"])),
        ('a trial\'s "started" to its worker\'s first line (TrainController, worker group, imports, data, model), each',
         lambda s: each(s["trial_start"])),
        (f"a trial's training ({job.training}), each", lambda s: each(s["training"])),
        ("a trial's end (its worker's last line) to the next trial's start, each", lambda s: each(s["between"])),
        ("results table, report, registering the best model: the last trial's end to exit", lambda s: fmt(s["end"])),
        ('  of which to Tune\'s end ("Wrote the latest version of all result files")',
         lambda s: fmt(s["end_to_tune_end"])),
        ('  of which to "Results of sweep" (trial statuses into MLflow, ray.shutdown, the report)',
         lambda s: fmt(s["tune_end_to_results"])),
        ('  of which "Results of sweep" to exit (registering the best model)', lambda s: fmt(s["results_to_exit"])),
        ("sweep wall (the spans add up to it)", lambda s: fmt(s["wall"])),
    ]  # fmt: skip
    rows = [[label, *(render(sides[n]) for n in names)] for label, render in rows_spec]
    return table(["span (s)", *names], rows)


def overhead(sweep_wall: float, plain_wall: float, trials: int) -> float:
    return (sweep_wall - plain_wall) / trials


def report(job: Job, plain: dict[str, Any], results: dict[str, dict[str, Any]], labels: dict[str, str]) -> bool | None:
    """Print one job's tables; returns whether the goal was met after the change (None: not measured)."""
    n = len(plain["trials"])
    measured = {side: spans(r) for side, r in results.items() if r["exit"] == 0}
    print(f"\n### {job.name}: {n} trials ({', '.join(plain['trials'])})\n")
    for side, label in labels.items():
        print(f"{side}: {label}")
    print()
    print(spans_table(job, {side: measured[side] for side in results if side in measured}))
    print()
    rows = []
    for side, r in results.items():
        if r["exit"] != 0:
            rows.append([f"sweep ({side})", f"FAILED (exit {r['exit']})", "", ""])
            continue
        per = overhead(r["wall_s"], plain["process_s"], n)
        walls = f"({r['wall_s']:.1f} - {plain['process_s']:.1f}) / {n}"
        rows.append(
            [f"sweep ({side})", f"{r['wall_s']:.1f}", f"{walls} = {per:.1f}", "met" if per <= GOAL_S else "NOT met"]
        )
    train_s = " + ".join(f"{t:.1f}" for t in plain["train_s"])
    threads = ", ".join(str(t or "default") for t in plain["threads"])
    rows.append(
        [f"plain (one process, torch threads {threads})", f"{plain['process_s']:.1f}", f"train(): {train_s}", ""]
    )
    print(table(["run", "wall s", "per-trial overhead s (sweep - plain) / trials", f"goal <= {GOAL_S:.0f} s"], rows))
    for side, r in results.items():
        if r["exit"] != 0:
            print(f"\n{side} failed; its last lines:\n" + "\n".join(line for _, line in r["lines"][-25:]))
    if "after" not in measured:
        return None
    return overhead(results["after"]["wall_s"], plain["process_s"], n) <= GOAL_S


# --------------------------------------------------------------------------- driver


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def clone_at(ref: str, dest: Path) -> str:
    """A clone of this repository at ``ref`` in ``dest`` (this checkout untouched); its description."""
    git("clone", "-q", "--no-checkout", str(ROOT), str(dest))
    git("checkout", "-q", ref, cwd=dest)
    subject = git("log", "-1", "--format=%s", cwd=dest).strip()
    return f"{git('log', '-1', '--format=%h', cwd=dest).strip()} {subject[:60]}{'…' if len(subject) > 60 else ''}"


def working_tree() -> str:
    """HEAD of this checkout and its uncommitted changes (read without taking git's index lock)."""
    head = git("log", "-1", "--format=%h").strip()
    changed = [line[3:] for line in git("--no-optional-locks", "status", "--porcelain").splitlines()]
    return f"{head} + uncommitted {', '.join(changed)}" if changed else f"{head} (no uncommitted changes)"


def write_micro(folder: Path, trials: int) -> Path:
    path = folder / "micro_sweep.py"
    seeds = ", ".join(str(s) for s in range(1, trials + 1))
    path.write_text(MICRO.format(steps=MICRO_STEPS, every=MICRO_STEPS // 2, seeds=seeds))
    return path


def run_job(job: Job, before: str, keep: Path | None, use_gpu: bool) -> tuple[bool | None, dict[str, Any]]:
    """plain, then before (unless ``before`` is "none"), then after; prints the job's tables."""
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        tmp_path = Path(tmp)
        clone = tmp_path / "before-code"
        labels = {"after": f"{working_tree()} ({ROOT})"}
        codes = {"after": ROOT}
        if before != "none":
            labels = {"before": f"{clone_at(before, clone)} (clone at {before})", **labels}
            codes = {"before": clone, **codes}
        plain_dir = tmp_path / "plain"
        plain_dir.mkdir()
        print(f"{job.name}: plain ({time.strftime('%H:%M:%S')})", flush=True)
        plain = run_side(
            __file__,
            ["--side", "plain", "--workdir", str(plain_dir), "--experiment", str(job.file(ROOT, plain_dir)),
             *(arg for item in job.overrides for arg in ("--set", item))],
            timeout=job.timeout_s,
            env={"PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        results = {}
        for side, code in codes.items():
            work = tmp_path / side
            work.mkdir()
            origin = imported_from(code, work)
            print(f"{job.name}: {side} sweep, code from {origin} ({time.strftime('%H:%M:%S')})", flush=True)
            results[side] = run_cli(code, job.file(code, work), job, work, use_gpu)
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                log = "\n".join(f"{t:.3f}\t{line}" for t, line in results[side]["lines"])
                (keep / f"{job.name.replace(' ', '_')}-{side}.log").write_text(log + "\n")
                if (work / "mlruns.db").is_file():  # to compare the sides' logged losses
                    shutil.copy(work / "mlruns.db", keep / f"{job.name.replace(' ', '_')}-{side}-mlruns.db")
        met = report(job, plain, results, labels)
    walls = {side: r["wall_s"] for side, r in results.items() if r["exit"] == 0}
    failed = [side for side, r in results.items() if r["exit"] != 0]
    return met, {"plain": plain["process_s"], "walls": walls, "trials": len(plain["trials"]), "failed": failed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the micro sweep with 2 trials instead of 4")
    parser.add_argument("--main", action="store_true", help="also the main job (experiments/stride_sweep.py, long)")
    parser.add_argument(
        "--before", default=DEFAULT_BEFORE, help=f"git ref of the before side (default {DEFAULT_BEFORE}; none: none)"
    )
    parser.add_argument("--use-gpu", action="store_true", help="the sweeps with --use-gpu yes (plain: train()'s CUDA)")
    parser.add_argument("--keep", type=Path, help="write each side's time-stamped output to this folder")
    parser.add_argument("--side", choices=["plain"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--experiment", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if SHARED_DATA.is_dir():
        os.environ.setdefault("GPTCORE_DATA_DIR", str(SHARED_DATA))
    if args.side:
        emit(measure_plain(args.experiment, args.overrides, args.workdir))
        return

    print(f"machine: {machine()}")
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n", flush=True)
    n = 2 if args.quick else 4
    every = MICRO_STEPS // 2
    jobs = [
        Job(
            "micro sweep",
            f"{MICRO_STEPS} steps, evaluations with a sample at {every} and {MICRO_STEPS}, a checkpoint",
            900.0,
            lambda _code, work: write_micro(work, n),
        )
    ]
    if args.main:
        jobs.append(
            Job(
                "main job",
                "its steps, an evaluation every 5 steps, a sample every 10, checkpoints every 50 and at the end",
                3600.0,
                lambda code, _work: code / "experiments" / "stride_sweep.py",
            )
        )
    failed = []
    for job in jobs:  # a results file per job: a run without --main keeps the main job's last figures
        name = "orchestration" if job.name == "micro sweep" else "orchestration_main"
        out = Report(f"gpu_{name}" if args.use_gpu else name, quick=args.quick)
        met, figures = run_job(job, args.before, args.keep, args.use_gpu)
        failed += [f"{job.name} {side}" for side in figures["failed"]]
        walls, plain, trials = figures["walls"], figures["plain"], figures["trials"]
        per = {side: f"{overhead(w, plain, trials):.1f}" for side, w in walls.items()}
        verdict = "not measured" if met is None else "met" if met else "NOT met"
        print(f"\nper-trial overhead: before {per.get('before', '?')} s, after {per.get('after', '?')} s")
        print(f"goal <= {GOAL_S:.0f} s per trial (after): {verdict}")
        after = walls.get("after", float("nan"))
        out.figure(
            f"orchestration overhead, {job.name} ({trials} trials): per trial, sweep vs the same trainings plainly",
            f"{per.get('after', '?')} s/trial after, {per.get('before', '?')} before ({after:.0f} s sweep vs "
            f"{plain:.0f} s plain)",
            goal=f"<= {GOAL_S:.0f} s/trial",
            met=met,
        )
        if job.name == "main job":
            out.figure(
                "the main job (stride_sweep.py, default scale), wall",
                f"{after / 60:.1f} min ({after:.0f} s)",
                goal=f"<= {MAIN_GOAL_MIN} min",
                met=after <= MAIN_GOAL_MIN * 60,
            )
        out.save()
    print(f"\nfinished {time.strftime('%H:%M:%S')}; machine: {machine()}")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
