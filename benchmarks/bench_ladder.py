"""Per-trial overhead of a ladder of many small trials (issue 25): the scaling ladder's wall time against the sum of its
trials' training time, and the dry run's time estimate of each trial against that training time.

Runs, in a fresh temporary work folder, ``python -m orchestrator run experiments/scaling_ladder.py --dry-run
--calibrate`` (its estimate on this machine: 2 real steps of each model timed, `orchestrator.estimate`) and then the
ladder itself, timing the CLI process from start to exit. Each trial's training time is the ``wall_time_s`` its
worker logged in MLflow (the training loop from its first step to its last, evaluation included:
`gptcore.train.train`). Overhead = ladder wall - sum of training; it holds Ray's start, each trial's start (process,
imports, data, model) and end (report, MLflow), and the report and registry at the end.

    flock /tmp/ray.lock timeout 600 python benchmarks/bench_ladder.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Report, machine, table

LADDER = ROOT / "experiments" / "scaling_ladder.py"
SHARED_DATA = ROOT.parent / "shared" / "data"


def cli(work: Path, *args: str) -> tuple[str, float]:
    """``python -m orchestrator`` in ``work`` with this checkout's code; its output and wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if SHARED_DATA.is_dir():
        env.setdefault("GPTCORE_DATA_DIR", str(SHARED_DATA))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=work, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"orchestrator {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout, wall


def estimated_here(dry_run: str) -> dict[str, str]:
    """The dry run's "here" column by trial (the estimate table: the last one, cut at its header's column starts)."""
    lines = dry_run.splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("trial ") and " here " in f"{line} ")
    header = lines[start]
    here = header.index("here")
    after = [header.index(n) for n in header.split("  ") if n.strip() and header.index(n) > here]
    end = after[0] if after else None
    return {line.split("  ")[0].strip(): line[here:end].strip() for line in lines[start + 1 :]}


def training_times(work: Path) -> dict[str, float]:
    """Each trial's logged ``wall_time_s`` in the work folder's MLflow store, by trial name."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("scaling_ladder")
    runs = client.search_runs([experiment.experiment_id], "tags.`orchestrator.role` = 'trial'", max_results=1000)
    return {r.data.tags["orchestrator.trial"]: r.data.metrics["wall_time_s"] for r in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="copy the work folder (mlruns.db, outputs) here")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    print(f"commit: {commit.stdout.strip()}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    with tempfile.TemporaryDirectory(prefix="bench-ladder-") as tmp:
        work = Path(tmp)
        dry_run, dry_wall = cli(work, "run", str(LADDER), "--dry-run", "--calibrate")
        estimates = estimated_here(dry_run)
        _, wall = cli(work, "run", str(LADDER))
        trained = training_times(work)
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
    rows = [[name, estimates.get(name, "?"), f"{seconds:.1f}"] for name, seconds in sorted(trained.items())]
    total = sum(trained.values())
    rows.append(["**sum**", estimates.get("sweep (sum)", "?"), f"{total:.1f}"])
    print(table(["trial", "dry-run estimate here", "training s (MLflow wall_time_s)"], rows))
    overhead = wall - total
    print(
        f"\nladder wall {wall:.1f} s (CLI start to exit) vs sum of training {total:.1f} s: overhead {overhead:.1f} s, "
        f"{overhead / len(trained):.1f} s per trial ({len(trained)} trials); the dry run took {dry_wall:.1f} s"
    )
    out = Report("ladder")
    out.figure(
        "scaling ladder (experiments/scaling_ladder.py, 12 trials): per-trial overhead, wall vs sum of training",
        f"{overhead / len(trained):.1f} s/trial ({wall:.0f} s wall, {total:.0f} s training)",
        goal="<= 5 s/trial (issue 26's goal)",
        met=overhead / len(trained) <= 5.0,
    )
    out.save()


if __name__ == "__main__":
    main()
