"""The dry run's time and cost of each trial and of the sweep, and each trial's memory against a cluster's node types;
a trial that fits none of them, or a bad prices file, refused before anything runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gptcore.accounting import training_flops
from orchestrator.cli import main
from orchestrator.experiment import expand_trials, load_experiment

from .conftest import REPO
from .servers import ray_cluster

STRIDE_SWEEP = REPO / "experiments" / "stride_sweep.py"
GPT2_XL = REPO / "experiments" / "gpt2_xl_fsdp.py"
A10G, A100 = 70e12, 312e12  # gptcore.hardware's peaks of cluster.yaml's GPUs
PRICES = {"ray.head.default": (0.384, 0.15), "ray.worker.g5": (1.006, 0.45), "ray.worker.p4d": (32.77, 12.0)}


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A working directory with the repo's cluster.yaml and prices.yaml, as the repo root has them."""
    for name in ("cluster.yaml", "prices.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dry_run(capsys, path: Path, *args: str) -> list[str]:
    assert main(["run", str(path), "--dry-run", *args]) == 0
    return capsys.readouterr().out.splitlines()


def estimate_table(lines: list[str]) -> dict[str, dict[str, str]]:
    """The estimate table (the second one, after the "cost:" or "here:" lines) by trial and column, cut at the
    header's column starts (cells hold spaces)."""
    start = max(i for i, line in enumerate(lines) if line.startswith("trial "))
    header = lines[start]
    names = re.split(r"\s{2,}", header.strip())
    starts = [header.index(name) for name in names]
    rows = {}
    for line in lines[start + 1 :]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        rows[cells[0]] = dict(zip(names, cells, strict=True))
    return rows


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def dollars(usd: float, bound: str = "") -> str:
    return f"{bound}${usd:,.2f}" if usd >= 1 else f"{bound}${usd:.2g}"


def test_the_main_jobs_plan_prices_each_trial_on_the_cheapest_node_type_that_fits(capsys, work):
    """stride_sweep on cluster.yaml's node types: each trial fits one A10G (g5) and an A100 (p4d), not the CPU head;
    its time is its FLOPs over peak x MFU, its cost that time on the cheapest type (one g5 node), and the sweep's
    their sums. --peak-flops stands in for this machine's calibration (and the GPUs' datasheet peak)."""
    lines = dry_run(capsys, STRIDE_SWEEP, "--peak-flops", "1e12", "--mfu", "0.5")
    assert "memory per worker (on a GPU) vs the node types of cluster.yaml:" in lines
    for node_type in [
        "  ray.head.default (8 CPU, RAM unknown): holds no worker (2 CPU, 1 GPU each)",
        "  ray.worker.g5 (4 CPU, 1x A10G 24 GB, RAM unknown): every trial fits",
        "  ray.worker.p4d (96 CPU, 8x A100 40 GB, RAM unknown): every trial fits",
    ]:
        assert node_type in lines
    assert "time: training FLOPs / (GPUs x peak FLOP/s x MFU), MFU 50 % (given (--mfu))" in lines
    assert "peak: 1e+12 FLOP/s per device (--peak-flops)" in lines
    rows = estimate_table(lines)
    config = expand_trials(load_experiment(STRIDE_SWEEP), {})[0].job.model
    total = {"time": 0.0, "on-demand": 0.0, "spot": 0.0}
    for trial, tokens in [("000_stride=256", 46_080), ("001_stride=128", 87_040)]:  # as test_accounting counts them
        seconds = training_flops(config, tokens) / (1e12 * 0.5)
        on_demand, spot = (seconds / 3600 * price for price in PRICES["ray.worker.g5"])
        assert rows[trial] == {
            "trial": trial,
            "here": minutes(seconds),
            "node type": "ray.worker.g5",
            "nodes": "1",
            "time": minutes(seconds),
            "on-demand": dollars(on_demand),
            "spot": dollars(spot),
        }
        total = {
            "time": total["time"] + seconds,
            "on-demand": total["on-demand"] + on_demand,
            "spot": total["spot"] + spot,
        }
    sweep = rows["sweep (sum)"]
    assert [sweep["here"], sweep["time"], sweep["on-demand"], sweep["spot"]] == [
        minutes(total["time"]),
        minutes(total["time"]),
        dollars(total["on-demand"]),
        dollars(total["spot"]),
    ]


def test_the_fsdp_jobs_plan_takes_the_mfu_its_finished_trials_measured(capsys, work):
    """gpt2_xl_fsdp: 8 GPU workers, cheapest on one p4d (eight g5 nodes at an A10G's peak cost more); the MFU is the
    median of what its finished trials logged in MLflow (a failed trial's is not taken), said as measured; its length
    is at most train.max_steps (FineWeb is not here), and so are its time and cost."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    experiment_id = client.create_experiment("gpt2_xl_fsdp")
    client.create_run(experiment_id, tags={"orchestrator.role": "sweep"})
    for status, mfu in [("finished", 0.30), ("finished", 0.40), ("failed", 0.90)]:
        run = client.create_run(
            experiment_id,
            tags={"orchestrator.role": "trial", "orchestrator.status": status, "device": "NVIDIA H100 80GB HBM3"},
        )
        client.log_metric(run.info.run_id, "mfu", mfu, step=10)
    lines = dry_run(capsys, GPT2_XL)
    assert (
        "time: training FLOPs / (GPUs x peak FLOP/s x MFU), MFU 35 % (measured: the median of 2 finished trial(s) "
        "of gpt2_xl_fsdp in MLflow, on NVIDIA H100 80GB HBM3)" in lines
    )
    job = expand_trials(load_experiment(GPT2_XL), {})[0].job
    tokens = 19_073 * 8 * 8 * 8 * 1024  # max_steps x workers x batch x accumulation x context
    seconds = training_flops(job.model, tokens) / (8 * A100 * 0.35)
    (row,) = [r for name, r in estimate_table(lines).items() if name != "sweep (sum)"]
    assert row["here"] == "unknown" and "here: unknown, this machine has no GPU for trials that need one" in lines
    assert [row["node type"], row["nodes"], row["time"]] == ["ray.worker.p4d", "1", f"<= {seconds / 86400:.1f} days"]
    assert row["on-demand"] == dollars(seconds / 3600 * PRICES["ray.worker.p4d"][0], "<= ")
    assert row["spot"] == dollars(seconds / 3600 * PRICES["ray.worker.p4d"][1], "<= ")


def test_a_trial_that_fits_no_node_type_is_named_with_the_fix(capsys, work):
    """Without activation checkpointing, batch 32 of gpt2-xl needs more than an A100's 40 GB per worker."""
    lines = dry_run(capsys, GPT2_XL, "--set", "train.activation_checkpointing=false", "--set", "train.batch_size=32")
    assert "  ray.worker.g5 (4 CPU, 1x A10G 24 GB, RAM unknown): 0 of 1 trial(s) fit" in lines
    assert "  ray.worker.p4d (96 CPU, 8x A100 40 GB, RAM unknown): 0 of 1 trial(s) fit" in lines
    (misfit,) = [line for line in lines if line.startswith("  fits no node type: ")]
    assert "000_lr=0.0006 needs " in misfit and "set train.activation_checkpointing=true" in misfit
    assert estimate_table(lines)["000_lr=0.0006"]["node type"] == "fits none"


def test_this_machine_is_calibrated_once_per_model_and_its_time_follows_the_tokens(capsys, tmp_path, monkeypatch):
    """On a CPU (no cluster.yaml here: no node types) a trial's time here is unknown, or with --calibrate comes from
    a few real steps of its model, timed once for two trials that differ only in their stride: the time grows with
    the tokens they train on, at the one speed measured."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "strides.py"
    path.write_text(
        "from orchestrator import Experiment, grid\n"
        'EXPERIMENT = Experiment(name="strides", corpus="the-verdict", model="micro", use_gpu=False,\n'
        '    train={"batch_size": 2, "epochs": 1}, grid={"data.stride": grid(64, 32)})\n'
    )
    assert "here: unknown, a CPU has no peak FLOP/s; --calibrate times 2 real training steps" in "\n".join(
        dry_run(capsys, path)
    )
    lines = dry_run(capsys, path, "--calibrate")
    assert any(
        line.startswith("here: this machine's CPU, 1 of 2 real training steps of each model timed (1 model(s)")
        for line in lines
    )
    rows = estimate_table(lines)
    assert list(rows["000_stride=64"]) == ["trial", "here"]  # no node types, no cost

    def seconds(cell: str) -> float:
        value, unit = cell.split()
        return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]

    model_tokens = {}
    for trial in ("000_stride=64", "001_stride=32"):
        row = next(line for line in lines if line.startswith(trial) and "epoch(s)" in line).split()
        model_tokens[trial] = float(row[row.index("epoch(s)") + 2].rstrip("k")) * 1e3
    ratio = seconds(rows["001_stride=32"]["here"]) / seconds(rows["000_stride=64"]["here"])
    assert ratio == pytest.approx(model_tokens["001_stride=32"] / model_tokens["000_stride=64"], rel=0.1)
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlruns.db").exists()


@pytest.mark.parametrize(
    ("prices", "message"),
    [
        ("ray.worker.g6: {on_demand: 1.0}", "unknown node type 'ray.worker.g6'; price the node types of the cluster: "),
        ("ray.worker.g5: {on_demand: -1.0}", "ray.worker.g5.on_demand = -1.0 is not a price; give USD per node-hour"),
        ("ray.worker.g5: {reserved: 0.5}", "ray.worker.g5: expected {on_demand: USD, spot: USD} per node-hour"),
        ("ray.worker.g5: [on_demand: 1.0", "not a readable YAML file"),
        ("- 1.0", "expected a mapping of node type to prices"),
    ],
)
def test_a_bad_prices_file_is_one_line_and_exit_2(capsys, work, prices, message):
    (work / "prices.yaml").write_text(prices + "\n")
    assert main(["run", str(GPT2_XL), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {work / 'prices.yaml'}: ") and message in err and err.count("\n") == 1, err
    assert not (work / "ray_results").exists() and not (work / "mlruns.db").exists()


@pytest.mark.ray
def test_a_trial_that_fits_no_node_of_the_cluster_is_refused_before_anything_is_written(tmp_path):
    """--address: the running cluster's nodes (here one head of 1 CPU) are the node types; a CPU trial whose worker
    needs more than a node's RAM (Ray's memory resource) is named by the dry run and refused by the run, before a
    run is recorded or a file is written. (The CLI in its own process, as a driver joining a token-auth cluster is:
    Ray keeps the first token a process used.)"""
    wide = ["--set", "model.d_model=1000000", "--set", "model.n_heads=1", "--cpus-per-worker", "1"]
    with ray_cluster(tmp_path, workers=0) as cluster:

        def cli(*args: str) -> subprocess.CompletedProcess:
            argv = [sys.executable, "-m", "orchestrator", "run", str(STRIDE_SWEEP), "--address", cluster.address]
            env = {**os.environ, **cluster.env}
            return subprocess.run([*argv, *wide, *args], cwd=tmp_path, env=env, capture_output=True, text=True)

        planned, refused = cli("--dry-run"), cli()
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert f"memory per worker (in RAM) vs the node types of the Ray cluster at {cluster.address}:" in lines
    (node,) = [line for line in lines if line.startswith("  node ")]  # the head, named by its address
    assert "(1 CPU, " in node and node.endswith("GiB RAM): 0 of 2 trial(s) fit")
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]  # after Ray's own lines
    assert refused.returncode == 2 and refused.stderr.endswith(error + "\n")
    assert error.startswith("error: trial 000_stride=256 needs ")
    assert f"more than any node type of the Ray cluster at {cluster.address} has (node " in error
    assert "(1 CPU, " in error and "lower train.batch_size" in error
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlruns.db").exists()
