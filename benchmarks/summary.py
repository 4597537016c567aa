"""Write BENCHMARKS.md's summary table from the results files: every figure beside its reference, goal and source.

Each benchmark script writes ``benchmarks/results/<bench>.json`` (`common.Report`: commit, date, machine, load
average, figures). This rewrites the part of BENCHMARKS.md between the two markers below from whatever results
files exist, so that runs made at different times (a CPU run here, a GPU run on a lent machine) combine; a benchmark
with no results file is listed as not measured. The text outside the markers is not touched.

    python benchmarks/summary.py [--results benchmarks/results] [--doc BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- summary: written by benchmarks/summary.py from benchmarks/results/*.json; edits here are overwritten -->"
END = "<!-- end of the generated summary -->"
#: Every results file a script writes, in the table's order: (script and arguments, whether it needs a GPU).
BENCHES: dict[str, tuple[str, bool]] = {
    "train": ("bench_train.py", False),
    "generate": ("bench_generate.py", False),
    "data": ("bench_data.py", False),
    "system_metrics": ("bench_system_metrics.py", False),
    "fsdp": ("bench_fsdp.py", False),
    "orchestration": ("bench_orchestration.py", False),
    "orchestration_main": ("bench_orchestration.py --main", False),
    "ladder": ("bench_ladder.py", False),
    "preemption": ("bench_preemption.py", False),
    "gpu_main": ("bench_gpu_main.py", True),
    "gpu_orchestration": ("bench_orchestration.py --use-gpu", True),
    "gpu_mfu": ("bench_gpu_mfu.py", True),
    "gpu_fsdp": ("bench_gpu_fsdp.py", True),
    "gpu_data": ("bench_gpu_data.py", True),
}


def load(results: Path) -> dict[str, dict[str, Any]]:
    """Every results file under ``results``, by benchmark name."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(results.glob("*.json"))}


def rows(records: dict[str, dict[str, Any]]) -> list[list[str]]:
    """One row per figure: figure, measured, like-for-like, goal, met, source (script, date, commit, CPU, load)."""
    out = []
    for name in [*BENCHES, *sorted(set(records) - set(BENCHES))]:
        script, gpu = BENCHES.get(name, (f"bench_{name}.py", False))
        record = records.get(name)
        if record is None:
            why = "unmeasured (no GPU)" if gpu else "not measured in these results"
            out.append([f"`{script}`", why, "", "", "—", "no results file"])
            continue
        quick = " (quick)" if record["quick"] else ""
        when = f"{record['date']}, `{record['commit']}`, {record['cpu']}, load {record['load_average'][0]:.1f}"
        source = f"`{record['command']}`{quick}, {when}"
        for f in record["figures"]:
            met = {True: "yes", False: "**no**", None: "—"}[f["met"]]
            unmeasured = f["measured"].startswith("unmeasured")
            where = f"`{script}` on {record['cpu']}, {record['date']}" if unmeasured else source
            out.append([f["figure"], f["measured"], f["like_for_like"], f["goal"], met, where])
    return out


def markdown(table: list[list[str]]) -> str:
    header = ["figure", "measured (vs reference)", "like-for-like", "goal", "met", "script, date, commit, CPU"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in table]
    return "\n".join(lines)


def machines(records: dict[str, dict[str, Any]]) -> str:
    """The machines the figures come from, each once."""
    seen = sorted({r["machine"].split(", load average")[0] for r in records.values()})
    return "\n".join(f"- {m}" for m in seen)


def rewrite(doc: Path, records: dict[str, dict[str, Any]]) -> None:
    """Replace what is between the markers of ``doc`` with the table; refuse a document without both markers."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{doc}: no summary markers; put these two lines where the summary goes:\n{BEGIN}\n{END}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = f"{markdown(rows(records))}\n\nMachines of these figures:\n\n{machines(records)}"
    doc.write_text(f"{head}{BEGIN}\n{body}\n{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--doc", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    records = load(args.results)
    rewrite(args.doc, records)
    print(f"{args.doc}: summary of {len(records)} results file(s) written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
