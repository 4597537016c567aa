"""Run every benchmark script, each in its own process; print the figures against the goals; rewrite the summary.

    python benchmarks/run_all.py [--quick] [--only train generate ...]

Each script's own output is passed through as it comes, and each writes ``benchmarks/results/<bench>.json``; then
``summary.py`` rewrites BENCHMARKS.md's summary table from every results file there (this run's and earlier ones').
GPU benchmarks say "unmeasured (no GPU)" on a machine without one. The orchestration benchmark runs its micro sweep;
the main job (``bench_orchestration.py --main``, ~30 min on 2 cores) is run by hand. Exits non-zero only when a
script fails; a goal not met is a figure to report, not an error.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SUMMARY, machine, parse_lines, table

HERE = Path(__file__).resolve().parent
CPU_SCRIPTS = ["train", "generate", "data", "system_metrics", "fsdp", "orchestration", "ladder", "preemption"]
SCRIPTS = [*CPU_SCRIPTS, "gpu_main", "gpu_mfu", "gpu_fsdp", "gpu_data"]  # without a GPU: "unmeasured"


def run_script(name: str, quick: bool) -> tuple[int, float, str]:
    """Run ``bench_<name>.py``, echoing its output; returns (exit code, seconds, output)."""
    command = [sys.executable, "-u", str(HERE / f"bench_{name}.py"), *(["--quick"] if quick else [])]
    print(f"\n=== {' '.join(Path(c).name if c.endswith('.py') else c for c in command[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    return proc.wait(), time.perf_counter() - start, "".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, default=SCRIPTS)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    rows, failed = [], []
    for name in args.only:
        code, seconds, output = run_script(name, args.quick)
        results = parse_lines(output, SUMMARY)
        if code != 0 or not results:
            failed.append(name)
            rows.append([name, f"FAILED (exit {code})", "", "", f"{seconds:.0f}"])
            continue
        for r in results:
            met = {True: "yes", False: "NO", None: "n/a"}[r["met"]]
            rows.append([r["bench"], r["figure"], r["goal"], met, f"{seconds:.0f}"])
    print(f"\n=== summary{' (--quick)' if args.quick else ''}\n")
    print(table(["benchmark", "figure", "goal", "met", "script s"], rows))
    subprocess.run([sys.executable, str(HERE / "summary.py")], check=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
