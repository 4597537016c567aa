"""The main job's command on a GPU, through Ray Train, Tune and MLflow, then checked in MLflow.

    python -m orchestrator run experiments/stride_sweep.py --use-gpu yes --set model.context_length=1024
        --set data.val_fraction=0.25

in a fresh work folder (its mlruns.db, ray_results/): the seed's stride study at context 1024 (the-verdict's default
10 % validation split holds no 1024-token window; 25 % holds one). Then, from its MLflow store: every trial's run
finished, logged ``mfu`` (between 0 and 1: the GPU has a datasheet peak in `gptcore.hardware`) and GPU system
metrics (``system/gpu_*``, MLflow's monitor with nvidia-ml-py). The sweep's wall time, the trials' median MFU and
the checks go to ``benchmarks/results/gpu_main.json``. Without CUDA the figure is unmeasured; ``--dry-run`` runs the
CLI's own ``--dry-run`` (the plan at context 1024: trials, steps, memory) on any machine.

    python benchmarks/bench_gpu_main.py [--dry-run] [--timeout 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Report, machine

COMMAND = [
    "-m",
    "orchestrator",
    "run",
    str(ROOT / "experiments" / "stride_sweep.py"),
    "--use-gpu",
    "yes",
    *("--set", "model.context_length=1024", "--set", "data.val_fraction=0.25"),
]
FIGURE = "the main job on one GPU (stride_sweep.py at context 1024, --use-gpu yes): Ray Train, Tune, MLflow"


def check_mlflow(tracking_uri: str) -> dict[str, object]:
    """The trial runs of the sweep in ``tracking_uri``: statuses, the last ``mfu`` of each, GPU metric names."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("stride_sweep")
    if experiment is None:
        raise SystemExit(f"{tracking_uri}: no experiment stride_sweep")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]
    return {
        "trials": len(runs),
        "statuses": sorted(r.info.status for r in runs),
        "mfu": [r.data.metrics.get("mfu") for r in runs],
        "gpu_metrics": sorted({k for r in runs for k in r.data.metrics if k.startswith("system/gpu")}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the CLI's --dry-run of the same command (any machine)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the sweep may take")
    parser.add_argument("--quick", action="store_true", help="the same run (run_all.py passes it to every script)")
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    print("$ python " + " ".join(COMMAND), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-main-") as work:
        if args.dry_run:
            return subprocess.run([sys.executable, *COMMAND, "--dry-run"], cwd=work, timeout=300).returncode
        import torch

        out = Report("gpu_main", quick=args.quick)
        if not torch.cuda.is_available():
            print("no CUDA device: unmeasured on this machine")
            out.unmeasured(FIGURE, "no GPU", "finished, MFU and GPU metrics in MLflow")
            out.save()
            return 0
        start = time.perf_counter()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        code = subprocess.run([sys.executable, *COMMAND], cwd=work, env=env, timeout=args.timeout).returncode
        wall = time.perf_counter() - start
        found = check_mlflow(f"sqlite:///{Path(work) / 'mlruns.db'}")
    print(f"exit {code} after {wall:.0f} s; MLflow: {found}")
    mfus = [m for m in found["mfu"] if m is not None]
    checks = {
        "the sweep exited 0": code == 0,
        "2 trial runs, FINISHED": found["statuses"] == ["FINISHED", "FINISHED"],
        "every trial logged mfu in (0, 1)": len(mfus) == found["trials"] and all(0 < m < 1 for m in mfus),
        "GPU system metrics logged": bool(found["gpu_metrics"]),
    }
    for check, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    mfu = f"MFU {statistics.median(mfus):.1%} (median of trials, batch 2)" if mfus else "no MFU logged"
    out.figure(
        FIGURE,
        f"{wall:.0f} s wall, {mfu}; {len(found['gpu_metrics'])} GPU metrics",
        goal="finished, MFU and GPU metrics in MLflow",
        met=all(checks.values()),
    )
    out.save()
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
