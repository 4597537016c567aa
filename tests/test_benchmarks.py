"""The benchmark tooling: the summary written from results files, and the GPU acceptance script's dry run."""

import json
import os
import subprocess
import sys

from .conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def result(bench, figure, measured, met, quick=False):
    """A results file as `benchmarks/common.Report` writes it."""
    return {
        "bench": bench,
        "command": f"python benchmarks/bench_{bench}.py",
        "quick": quick,
        "commit": "abc1234",
        "date": "2026-12-02 10:00 UTC",
        "cpu": "Some CPU",
        "machine": "Some CPU, 2 cores, load average 1.0 1.0 1.0",
        "load_average": [1.0, 1.0, 1.0],
        "figures": [{"figure": figure, "measured": measured, "ratio": 2.0, "like_for_like": "1.5x fp32 vs fp32",
                     "goal": ">= 3x", "met": met}],
    }  # fmt: skip


def summarize(results, doc):
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / "summary.py"), "--results", str(results), "--doc", str(doc)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_summary_is_written_from_every_results_file_between_its_markers(tmp_path):
    """Results of separate runs combine; a GPU benchmark without results reads unmeasured; hand-written text stays."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from summary import BEGIN, END
    finally:
        sys.path.remove(str(BENCHMARKS))
    results = tmp_path / "results"
    results.mkdir()
    (results / "train.json").write_text(json.dumps(result("train", "training vs reference", "2.00x", False)))
    (results / "generate.json").write_text(json.dumps(result("generate", "generation", "12.0x", True, quick=True)))
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(f"# Benchmarks\n\n{BEGIN}\nan old table\n{END}\n\n## Preemption (hand-written)\n\ntext\n")
    assert summarize(results, doc).returncode == 0
    text = doc.read_text()
    assert "an old table" not in text
    assert text.endswith(f"{END}\n\n## Preemption (hand-written)\n\ntext\n")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert (
        "| 2.00x | 1.5x fp32 vs fp32 | >= 3x | **no** | `python benchmarks/bench_train.py`, 2026-12-02"
        in (rows["training vs reference"])
    )
    assert "| yes | `python benchmarks/bench_generate.py` (quick)" in rows["generation"]
    assert "unmeasured (no GPU)" in rows["`bench_gpu_mfu.py`"]
    assert "not measured in these results" in rows["`bench_data.py`"]

    doc.write_text("# Benchmarks without markers\n")
    refused = summarize(results, doc)
    assert refused.returncode != 0 and "no summary markers" in refused.stderr
    assert doc.read_text() == "# Benchmarks without markers\n"


def test_the_gpu_acceptance_dry_run_prints_its_commands_and_checks_the_main_jobs_plan():
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_acceptance.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for command in [
        "benchmarks/bench_gpu_main.py --timeout 300",
        "benchmarks/bench_orchestration.py --quick --before none --use-gpu",
        "benchmarks/bench_gpu_mfu.py --quick",
        "benchmarks/bench_gpu_fsdp.py --parallel fsdp --preset gpt2-xl",
        "stride_sweep.py --use-gpu yes --set model.context_length=1024",
    ]:
        assert command in out
    trials = ("000_stride=256", "001_stride=128")
    plan = [line.split() for line in out.splitlines() if line.startswith(trials) and " ctx " in line]  # the model table
    assert [row[2:5] for row in plan] == [["12x768", "ctx", "1024"]] * 2  # both trials planned at context 1024
