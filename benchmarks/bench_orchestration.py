"""Orchestration overhead: a 2-trial tiny sweep through ``python -m orchestrator run`` vs the same trainings plainly.

sweep         ``python -m orchestrator run experiments/stride_sweep.py --set model.preset=tiny
              --set train.epochs=1`` in a fresh temporary folder (its mlruns.db, mlartifacts/, ray_results/
              go there), a local Ray started by the CLI; every output line is time-stamped on arrival
plain         one process: the same `JobConfig`s (`expand_trials`), `gptcore.train.train` one after the other
plain+mlflow  the same plus the sweep's MLflow logging (`SweepTracker` runs + the workers' `MlflowLogging` hook)

Each runs in its own process; walls include interpreter start and imports. Per-trial overhead is
(sweep wall - plain wall) / 2. The sweep's time line (Ray start, MLflow runs, trial and training
start and end, report) comes from the CLI's own output.

    python benchmarks/bench_orchestration.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, emit, machine, run_side, summary, table

EXPERIMENT = ROOT / "experiments" / "stride_sweep.py"
OVERRIDES = ["model.preset=tiny", "train.epochs=1"]
QUICK_OVERRIDES = ["train.max_steps=3"]
GOAL_S = 5.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# (event, pattern): the first line matching a pattern marks the event; {trial} events are per trial.
EVENTS = [
    ("ray started", re.compile(r"Started a local Ray instance")),
    ("sweep ready (MLflow parent + child runs)", re.compile(r"^sweep \S+: MLflow parent run")),
    ("{trial}: Tune trial started", re.compile(r"^Trial (?P<trial>\S+) started")),
    ("{trial}: training started", re.compile(r"\[(?P<trial>[^\]]+)\] \d+ steps \(")),
    ("{trial}: training finished", re.compile(r"\[(?P<trial>[^\]]+)\] \w+ after \d+ steps in")),
    ("{trial}: Tune trial completed", re.compile(r"^Trial (?P<trial>\S+) completed")),
    ("report printed", re.compile(r"^Results of sweep")),
]


# --------------------------------------------------------------------------- sides


def run_sweep(overrides: list[str], workdir: Path) -> dict[str, Any]:
    """Run the CLI in ``workdir``; returns its wall time, exit code and the time of each event."""
    sets = [arg for item in overrides for arg in ("--set", item)]
    command = [sys.executable, "-m", "orchestrator", "run", str(EXPERIMENT), *sets]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )
    events: dict[str, float] = {}
    lines: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        now = time.perf_counter() - start
        line = ANSI.sub("", raw.rstrip("\n"))
        lines.append(line)
        text = re.sub(r"^\(\w+ pid=\d+\)\s*", "", line)  # Ray's prefix on worker output
        for name, pattern in EVENTS:
            match = pattern.search(text)
            if match:
                events.setdefault(name.format(**match.groupdict()), now)
    code = proc.wait()
    return {"wall_s": time.perf_counter() - start, "exit": code, "events": events, "tail": lines[-15:]}


def measure_plain(overrides: list[str], mlflow: bool, workdir: Path) -> dict[str, Any]:
    """The sweep's trainings in this process (optionally logging to MLflow as the workers do)."""
    from gptcore.hooks import Hooks
    from gptcore.train import train
    from orchestrator.experiment import expand_trials, load_experiment, parse_overrides

    experiment = load_experiment(EXPERIMENT)
    trials = expand_trials(experiment, parse_overrides(overrides, experiment.kind))
    setup = time.perf_counter()
    hooks: list[Hooks] = [Hooks() for _ in trials]
    tracker = parent = None
    if mlflow:
        from orchestrator.hooks import MlflowLogging
        from orchestrator.tracking import SweepTracker, default_artifact_root, resolve_tracking_uri

        uri = resolve_tracking_uri(None, workdir)
        tracker = SweepTracker(uri, experiment.name, artifact_root=default_artifact_root(workdir))
        parent = tracker.parent_run("bench", params={"trials": len(trials)}, tags={})
        runs = [tracker.child_run(parent, "bench", t.name, params=t.job.flat(), tags={}) for t in trials]
        hooks = [MlflowLogging(uri, run_id) for run_id in runs]
    setup_s = time.perf_counter() - setup
    train_s = []
    for trial, hook in zip(trials, hooks, strict=True):
        start = time.perf_counter()
        train(trial.job, hook)
        train_s.append(time.perf_counter() - start)
    if tracker is not None and parent is not None:
        tracker.finish(parent, "finished")
    return {"trials": [t.name for t in trials], "setup_s": setup_s, "train_s": train_s}


# --------------------------------------------------------------------------- report


def timeline(events: dict[str, float], wall: float) -> list[list[str]]:
    """Event rows in time order with the time since the previous event."""
    rows, last = [], 0.0
    for name, t in [*sorted(events.items(), key=lambda kv: kv[1]), ("process exited", wall)]:
        rows.append([f"{t:.1f}", f"+{t - last:.1f}", name])
        last = t
    return rows


def phases(events: dict[str, float], trials: list[str]) -> list[list[str]]:
    """Durations of the sweep's phases (per trial where it applies)."""

    def span(a: str, b: str) -> str:
        return f"{events[b] - events[a]:.1f}" if a in events and b in events else "?"

    rows = [
        ["CLI start, imports, ray.init", f"{events.get('ray started', float('nan')):.1f}"],
        ["MLflow store + parent/child runs", span("ray started", "sweep ready (MLflow parent + child runs)")],
    ]
    for trial in trials:
        rows += [
            [f"{trial}: Tune trial -> training start (actors, imports, data, model)",
             span(f"{trial}: Tune trial started", f"{trial}: training started")],
            [f"{trial}: training (incl. its evals, samples, checkpoints, MLflow)",
             span(f"{trial}: training started", f"{trial}: training finished")],
            [f"{trial}: training end -> Tune trial completed",
             span(f"{trial}: training finished", f"{trial}: Tune trial completed")],
        ]  # fmt: skip
    last_done = max((t for n, t in events.items() if n.endswith("Tune trial completed")), default=float("nan"))
    rows.append(
        ["last trial completed -> report printed", f"{events.get('report printed', float('nan')) - last_done:.1f}"]
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="also --set train.max_steps=3")
    parser.add_argument("--side", choices=["plain", "plain+mlflow"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    overrides = OVERRIDES + (QUICK_OVERRIDES if args.quick else [])
    if args.side:
        emit(measure_plain(overrides, args.side == "plain+mlflow", args.workdir))
        return

    print(f"machine: {machine()}")
    print(f"sweep: python -m orchestrator run {EXPERIMENT.relative_to(ROOT)} --set {' --set '.join(overrides)}\n")
    quick = ["--quick"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="bench-orch-") as tmp:
        sweep = run_sweep(overrides, Path(tmp))
        if sweep["exit"] != 0:
            raise SystemExit("the sweep failed:\n" + "\n".join(sweep["tail"]))
        plain = run_side(__file__, ["--side", "plain", "--workdir", tmp, *quick])
        logged = run_side(__file__, ["--side", "plain+mlflow", "--workdir", tmp, *quick])
    trials = plain["trials"]
    n = len(trials)
    print(
        table(
            ["t (s)", "since previous", "sweep event (from the CLI's output)"],
            timeline(sweep["events"], sweep["wall_s"]),
        )
    )
    print()
    print(table(["sweep phase", "seconds"], phases(sweep["events"], trials)))
    print()
    rows = [["sweep (Ray Tune + Ray Train + MLflow)", f"{sweep['wall_s']:.1f}", "", ""]]
    for name, r in (("plain (one process)", plain), ("plain + MLflow logging", logged)):
        rows.append([name, f"{r['process_s']:.1f}", f"{sum(r['train_s']):.1f}", f"{r['setup_s']:.1f}"])
    print(table(["run", "process wall s", "train() s (both)", "hooks setup s (imports, MLflow runs)"], rows))
    overhead = (sweep["wall_s"] - plain["process_s"]) / n
    mlflow = (logged["process_s"] - plain["process_s"]) / n
    walls = f"({sweep['wall_s']:.1f} - {plain['process_s']:.1f}) / {n}"
    print(f"\nper-trial overhead of the sweep: {walls} = {overhead:.1f} s")
    print(f"of which MLflow (setup + logging, in-process): {mlflow:.1f} s per trial")
    print(f"goal <= {GOAL_S:.0f} s per trial: {'met' if overhead <= GOAL_S else 'NOT met'}")
    summary(
        "orchestration",
        f"{overhead:.1f} s/trial overhead ({sweep['wall_s']:.0f} s sweep vs {plain['process_s']:.0f} s plain)",
        f"<= {GOAL_S:.0f} s/trial",
        overhead <= GOAL_S,
    )


if __name__ == "__main__":
    main()
