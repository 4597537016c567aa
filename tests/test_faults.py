"""Faults injected for real: killed Ray Train workers, a diverging trial, a trial that keeps failing, and processes
killed while writing a checkpoint. Sweeps run through the CLI in a subprocess (`tests.faults`). The interrupted driver
and the lost MLflow server: tests/test_interrupted.py, test_tracking_outage.py."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptcore.checkpoint import load_checkpoint
from tests.faults import REPO, TOKENS_PER_STEP, assert_generates, children, steps_of, write_experiment
from tests.servers import PATIENCE_S, Cli, psutil

ray_test = pytest.mark.ray


# --------------------------------------------------------------------------- checkpoint writes (no Ray)

SAVER = """
import os, signal, sys, torch
import gptcore.checkpoint_whole as whole
import gptcore.files as files
from gptcore.checkpoint_format import TrainState
from gptcore.checkpoint_whole import save_checkpoint
from gptcore.config import JobConfig
from gptcore.model import GPT

target, stage = sys.argv[1], sys.argv[2]
job = JobConfig.from_dict({"model": {"preset": "micro", "d_model": 256, "n_heads": 4, "n_layers": 2}})
model = GPT(job.model)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def killing_save_file(tensors, path):  # half the model file, then the process dies
    with open(path, "wb") as f:
        f.write(b"x" * 1000)
    die()


def killing(function):
    def wrapper(*args):
        result = function(*args) if stage == "after-swap" else None
        die()
        return result
    return wrapper


for step in (1, 2):
    if step == 2:  # the second save dies at the stage named
        if stage == "mid-file":
            whole.save_file = killing_save_file
        elif stage == "before-swap":
            files.replace_dir = killing(files.replace_dir)
        else:  # the new folder swapped in, the old one not yet removed
            files.exchange = killing(files.exchange)
    with torch.no_grad():
        model.tok_emb.weight.fill_(step)
    save_checkpoint(target, model=model, config=job, state=TrainState(step=step))
"""


@pytest.mark.parametrize(("stage", "step"), [("mid-file", 1), ("before-swap", 1), ("after-swap", 2)])
def test_checkpoint_survives_a_writer_killed_mid_save(tmp_path, stage, step):
    """SIGKILL a process at a given point of its second save: the folder loads, whole, as the first or second save."""
    target = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", SAVER, str(target), stage], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpt = load_checkpoint(target)
    assert ckpt.state.step == step
    assert float(ckpt.model_state["tok_emb.weight"][0, 0]) == step  # weights match the metadata
    assert_generates(str(target))


# --------------------------------------------------------------------------- a killed worker and a diverging trial


@pytest.fixture(scope="module")
def killed_worker_sweep(tmp_path_factory):
    """One failure survived per trial (``max_failures=1``), one trial at a time. Trial 000 has the process training
    it (its trial actor: one worker) SIGKILLed once its step-40 checkpoint is in storage, and resumes; trial 001 (lr
    1e6) diverges; trial 002 loses its process after its step-40 checkpoint and again after its next one once
    resumed, one failure too many: it fails, and so does the sweep."""
    work = tmp_path_factory.mktemp("killed_worker")
    grid = '{"train.lr": grid(4e-4, 1e6, 3e-4)}'
    write_experiment(work, steps=120, every=20, grid=grid, concurrent=1, max_failures=1, d_model=128)
    cli = Cli(["run", "faults.py"], work)
    try:
        victim = kill_trial(cli, work, "000_lr=0.0004", checkpoint_step=40)
        resumed = int(cli.wait_for(r"\[000_lr=0.0004\] .*resumed from step (\d+)").group(1))
        kill_trial(cli, work, "002_lr=0.0003", checkpoint_step=40)
        kill_trial(cli, work, "002_lr=0.0003", checkpoint_step=checkpointed_step(work, "002_lr=0.0003") + 20)
        rc = cli.finish()
    finally:
        if cli.proc.poll() is None:
            cli.kill_tree()
    assert victim.pid != int(cli.wait_for(r"\(\w+ pid=(\d+)\)\S*\s+\[000_lr=0.0004\] .*resumed from").group(1))
    return work, rc, cli.output(), resumed, MlflowClient(f"sqlite:///{work / 'mlruns.db'}")


def kill_trial(cli: Cli, work: Path, trial: str, *, checkpoint_step: int) -> psutil.Process:
    """SIGKILL the process training ``trial`` (the one trial actor of the sweep, which runs one trial at a time)
    once a checkpoint of it at ``checkpoint_step`` or later is in the sweep's storage. Not on the trial's console
    lines: they reach the driver seconds late on a busy machine (trial 002 was once killed at step 100 on its
    step-40 line)."""
    deadline = time.monotonic() + PATIENCE_S
    while checkpointed_step(work, trial) < checkpoint_step:
        assert time.monotonic() < deadline and cli.proc.poll() is None, f"{trial}: no step-{checkpoint_step} checkpoint"
        time.sleep(0.05)
    actors = [
        p for p in psutil.Process(cli.proc.pid).children(recursive=True) if "ray::ImplicitFunc" in " ".join(p.cmdline())
    ]
    assert len(actors) == 1, [" ".join(p.cmdline()) for p in actors]
    actors[0].send_signal(signal.SIGKILL)
    return actors[0]


def checkpointed_step(work: Path, trial: str) -> int:
    """The step of the trial's latest checkpoint in the sweep's storage, either layout (0: none yet)."""
    steps = [0]
    for meta in (work / "ray_results").glob(f"faults-*/{trial}/**/checkpoint_*/meta.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):  # still being copied in
            steps.append(json.loads(meta.read_text())["state"]["step"])
    return max(steps)


@ray_test
def test_killed_worker_resumes_from_its_checkpoint(killed_worker_sweep):
    _, rc, out, resumed, client = killed_worker_sweep
    assert rc == 1, out[-4000:]  # trial 002 failed
    # the latest checkpoint Ray had registered when the worker died (step 40's may still be on its way)
    assert resumed in (20, 40, 60, 80), resumed
    run = children(client)["000_lr=0.0004"]
    assert run.data.tags["resumed_from_step"] == str(resumed)
    assert run.data.tags["orchestrator.status"] == "finished" and run.info.status == "FINISHED"
    # every step logged exactly once, none lost around the crash
    assert steps_of(client, run.info.run_id) == list(range(1, 121))
    tokens = client.get_metric_history(run.info.run_id, "tokens_seen")
    assert sorted((m.step, m.value) for m in tokens) == [(s, s * TOKENS_PER_STEP) for s in range(1, 121)]
    assert steps_of(client, run.info.run_id, "val_loss") == list(range(20, 121, 20))
    best = run.data.tags["best_checkpoint"]
    assert load_checkpoint(best).state.step % 20 == 0
    assert_generates(best)


@ray_test
def test_killed_worker_continues_with_the_losses_of_an_uninterrupted_run(killed_worker_sweep):
    """The same trial trained in one process without a fault: every step's loss equals the Ray run's, the resumed
    steps included (dropout on: each rank's RNG state and the data position come back from the checkpoint); and the
    best checkpoint is the evaluation with the lowest validation loss."""
    import json

    import torch

    from gptcore.config import JobConfig
    from gptcore.hooks import Hooks
    from gptcore.train import train

    work, _, _, resumed, client = killed_worker_sweep
    (sweep,) = (work / "ray_results").glob("faults-*")
    spec = json.loads((sweep / "sweep.json").read_text())["trials"]["000_lr=0.0004"]
    job = JobConfig.from_dict(spec["config"])
    assert job.model.dropout > 0 and job.train.num_threads == 1

    losses: list[float] = []

    class Losses(Hooks):
        def on_step(self, ctx, state, metrics):
            losses.append(metrics["loss"])

    threads = torch.get_num_threads()
    try:
        train(job, Losses(), data_dir=spec["dataset"], device="cpu")
    finally:
        torch.set_num_threads(threads)
    run = children(client)["000_lr=0.0004"]
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert [logged[s] for s in range(1, 121)] == pytest.approx(losses, abs=1e-6, rel=0), resumed
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
    assert load_checkpoint(run.data.tags["best_checkpoint"]).state.step == min(val, key=val.get)


@ray_test
def test_diverging_trial_stops_early_and_the_others_finish(killed_worker_sweep):
    _, _, out, _, client = killed_worker_sweep
    assert "diverged" in results_row(out, "001_lr=1e+06")
    run = children(client)["001_lr=1e+06"]
    assert run.data.tags["orchestrator.status"] == "diverged"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) < 120 and not math.isfinite(max(losses, key=lambda m: m.step).value)


def results_row(out: str, trial: str) -> list[str]:
    """The words of ``trial``'s row in the results table the CLI printed."""
    table = out[out.index("Results of sweep") :]
    return next(line.split() for line in table.splitlines() if line.split()[1:2] == [trial])


@ray_test
def test_a_trial_that_keeps_failing_fails_the_sweep_and_the_report_shows_it(killed_worker_sweep):
    """Trial 002 lost its worker twice with max_failures=1: Tune gave up on it. The sweep exits 1; the results table,
    the MLflow runs and the report artifact say failed; the trials that finished or diverged keep their status."""
    work, rc, out, _, client = killed_worker_sweep
    assert rc == 1, out[-4000:]
    assert "failed" in results_row(out, "002_lr=0.0003") and "finished" in results_row(out, "000_lr=0.0004")
    run = children(client)["002_lr=0.0003"]
    assert run.data.tags["orchestrator.status"] == "failed" and run.info.status == "FAILED"
    assert re.search(r"\[002_lr=0.0003\] .*resumed from step [2468]0", out)  # it did resume once, then died again
    exp = client.get_experiment_by_name("faults")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'sweep'")
    assert parent.data.tags["orchestrator.status"] == "failed" and parent.info.status == "FAILED"
    report = Path(client.download_artifacts(parent.info.run_id, "report/results.md", str(work / "dl"))).read_text()
    row = next(line for line in report.splitlines() if "| 002_lr=0.0003 |" in line)
    assert "failed" in row
