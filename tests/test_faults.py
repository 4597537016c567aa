"""Faults injected for real: killed Ray Train workers, diverging trials, interrupted drivers, a lost MLflow
server and processes killed while writing a checkpoint. Sweeps run through the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptcore.checkpoint import load_checkpoint, load_model
from gptcore.sampling import generate_text
from tests.servers import Cli, psutil

REPO = Path(__file__).resolve().parents[1]
ray_test = pytest.mark.ray

# A small model that trains ~20 steps/s here: slow enough to be hit mid-way, fast enough for the suite.
EXPERIMENT = """
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="faults",
    corpus="the-verdict",
    model="micro",
    model_overrides={{"d_model": 256, "n_heads": 4, "n_layers": 2}},
    train={{"batch_size": 2, "epochs": 50, "max_steps": {steps}, "eval_every": {every}, "checkpoint_every": {every},
           "eval_iters": 1, "sample_max_new_tokens": {sample_tokens}, "lr_schedule": "constant"}},
    grid={grid},
    max_concurrent={concurrent},
    max_failures={max_failures},
)
"""
TOKENS_PER_STEP = 2 * 32  # batch_size x context_length of the micro preset


def write_experiment(
    work: Path,
    *,
    steps: int,
    every: int,
    grid: str,
    concurrent: int | None = None,
    max_failures: int = 2,
    sample_tokens: int = 0,
) -> Path:
    """``faults.py``: evaluations and checkpoints every ``every`` steps (and a sample of ``sample_tokens`` tokens)."""
    path = work / "faults.py"
    text = EXPERIMENT.format(
        steps=steps,
        every=every,
        grid=grid,
        concurrent=concurrent,
        max_failures=max_failures,
        sample_tokens=sample_tokens,
    )
    path.write_text(text)
    return path


def children(client: MlflowClient, experiment: str = "faults") -> dict[str, object]:
    """The sweep's child runs by trial name (asserting one parent run)."""
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'sweep'")
    assert len(parents) == 1, [p.info.run_name for p in parents]
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    names = [k.data.tags["orchestrator.trial"] for k in kids]
    assert len(names) == len(set(names)), f"duplicated child runs: {sorted(names)}"
    return {k.data.tags["orchestrator.trial"]: k for k in kids}


def steps_of(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_generates(checkpoint: str) -> None:
    model, _ = load_model(checkpoint)
    assert generate_text(model, "Every effort moves you", 4)[0].startswith("Every effort moves you")


# --------------------------------------------------------------------------- checkpoint writes (no Ray)

SAVER = """
import os, signal, sys, torch
import gptcore.checkpoint as checkpoint
from gptcore.checkpoint import TrainState, save_checkpoint
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
            checkpoint.save_file = killing_save_file
        elif stage == "before-swap":
            checkpoint._replace_dir = killing(checkpoint._replace_dir)
        else:  # the new folder swapped in, the old one not yet removed
            checkpoint._exchange = killing(checkpoint._exchange)
    with torch.no_grad():
        model.tok_emb.weight.fill_(step)
    save_checkpoint(target, model=model, config=job, state=TrainState(step=step))
"""


@pytest.mark.parametrize(("stage", "step"), [("mid-file", 1), ("before-swap", 1), ("after-swap", 2)])
def test_checkpoint_survives_a_writer_killed_mid_save(tmp_path, stage, step):
    """SIGKILL a process at a given point of its second save: the folder loads, whole, as the first or second save."""
    target = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", SAVER, str(target), stage], cwd=REPO, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    ckpt = load_checkpoint(target)
    assert ckpt.state.step == step
    assert float(ckpt.model_state["tok_emb.weight"][0, 0]) == step  # weights match the metadata
    assert_generates(str(target))


# --------------------------------------------------------------------------- a killed worker and a diverging trial


@pytest.fixture(scope="module")
def killed_worker_sweep(tmp_path_factory):
    """One failure survived per trial (``max_failures=1``). Trial 000 has its Ray Train worker SIGKILLed after its
    step-40 checkpoint and resumes; trial 001 (lr 1e6) diverges; trial 002 loses its worker at step 40 and again
    once resumed, one failure too many: it fails, and so does the sweep."""
    work = tmp_path_factory.mktemp("killed_worker")
    write_experiment(work, steps=120, every=20, grid='{"train.lr": grid(4e-4, 1e6, 3e-4)}', max_failures=1)
    cli = Cli(["run", "faults.py"], work)
    worker = r"RayTrainWorker pid=(\d+)\)\S*\s+"
    try:
        victim = kill_worker(cli, cli.wait_for(worker + r"\[000_lr=0.0004\] step 40/120"))
        resumed = int(cli.wait_for(r"\[000_lr=0.0004\] .*resumed from step (\d+)").group(1))
        assert victim.pid != int(cli.wait_for(worker + r"\[000_lr=0.0004\] .*resumed from step").group(1))
        kill_worker(cli, cli.wait_for(worker + r"\[002_lr=0.0003\] step 40/120"))
        kill_worker(cli, cli.wait_for(worker + r"\[002_lr=0.0003\] .*resumed from step"))
        rc = cli.finish()
    finally:
        if cli.proc.poll() is None:
            cli.kill_tree()
    return work, rc, cli.output(), resumed, MlflowClient(f"sqlite:///{work / 'mlruns.db'}")


def kill_worker(cli: Cli, match: re.Match) -> psutil.Process:
    """SIGKILL the Ray Train worker whose pid ``match`` captured (a process the CLI started)."""
    victim = psutil.Process(int(match.group(1)))
    assert "RayTrainWorker" in " ".join(victim.cmdline())
    assert victim in psutil.Process(cli.proc.pid).children(recursive=True)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    return victim


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
    from gptcore.train import Hooks, train

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
    assert re.search(r"\[002_lr=0.0003\] .*resumed from step [24]0", out)  # it did resume once, then died again
    exp = client.get_experiment_by_name("faults")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'sweep'")
    assert parent.data.tags["orchestrator.status"] == "failed" and parent.info.status == "FAILED"
    report = Path(client.download_artifacts(parent.info.run_id, "report/results.md", str(work / "dl"))).read_text()
    row = next(line for line in report.splitlines() if "| 002_lr=0.0003 |" in line)
    assert "failed" in row


# --------------------------------------------------------------------------- an interrupted driver


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    """Two trials one at a time: SIGINT during trial 001, --resume, SIGKILL (driver and its Ray) during trial 001
    again, --resume again to the end. Returns the work folder, each run's (exit code, output), and the MLflow client."""
    work = tmp_path_factory.mktemp("interrupted")
    write_experiment(work, steps=60, every=20, grid='{"train.lr": grid(4e-4, 3e-4)}', concurrent=1)
    first = Cli(["run", "faults.py"], work)
    try:
        first.wait_for(r"\[000_lr=0.0004\] finished after 60 steps")
        first.wait_for(r"\[001_lr=0.0003\] step 20/60")
        first.proc.send_signal(signal.SIGINT)
        first_rc = first.finish()
    finally:
        if first.proc.poll() is None:
            first.kill_tree()
    second = Cli(["run", "faults.py", "--resume"], work)
    try:
        second.wait_for(r"\[001_lr=0.0003\] step 40/60")  # a checkpoint (step 20 or 40) is registered by now
        second.kill_tree()  # SIGKILL: no chance to save anything
    finally:
        if second.proc.poll() is None:
            second.kill_tree()
    third = Cli(["run", "faults.py", "--resume"], work)
    third_rc = third.finish()
    runs = [(first_rc, first.output()), (second.proc.returncode, second.output()), (third_rc, third.output())]
    return work, runs, MlflowClient(f"sqlite:///{work / 'mlruns.db'}")


@ray_test
def test_sigint_stops_the_sweep_and_says_how_to_resume(interrupted_sweep):
    _, runs, _ = interrupted_sweep
    rc, out = runs[0]
    assert rc == 130, out[-4000:]
    assert "The sweep was interrupted; finish it with: python -m orchestrator run faults.py --resume" in out


@ray_test
def test_resume_after_sigint_and_sigkill_trains_only_unfinished_trials(interrupted_sweep):
    _, runs, client = interrupted_sweep
    (_, first), (_, second), (rc, third) = runs
    assert rc == 0, third[-4000:]
    # trial 000 finished in the first run and is never trained again
    assert "[000_lr=0.0004] finished" in first
    assert "[000_lr=0.0004]" not in second + third
    kids = children(client)  # one child run per trial: reused on --resume, not duplicated
    assert sorted(kids) == ["000_lr=0.0004", "001_lr=0.0003"]
    for name, run in kids.items():
        assert run.data.tags["orchestrator.status"] == "finished", name
        assert run.info.status == "FINISHED", name
        assert steps_of(client, run.info.run_id) == list(range(1, 61)), name  # every step once
    assert re.search(r"\[001_lr=0.0003\] .*resumed from step [24]0", third)  # from its checkpoint, not from scratch
    assert "Results of sweep faults-" in third


# --------------------------------------------------------------------------- the MLflow server


def test_unreachable_tracking_server_fails_before_anything_starts(tmp_path):
    from tests.servers import free_port

    write_experiment(tmp_path, steps=4, every=2, grid='{"train.lr": grid(4e-4)}')
    uri = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "faults.py", "--tracking-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and uri in message[0] and "unreachable" in message[0].lower(), proc.stderr
    assert not (tmp_path / "ray_results").exists()  # no sweep state, no Ray


@ray_test
def test_tracking_server_lost_mid_run(tmp_path):
    """The MLflow server dies a second into training and comes back ~8 s later: training steps go on meanwhile
    (measured by the time stamps of the logged losses), and every metric and sample text logged during the outage
    arrives afterwards; the run's ``tracking_gap`` tag says how long the store was gone and how much came late."""
    from tests.servers import free_port, mlflow_server

    write_experiment(tmp_path, steps=200, every=50, grid='{"train.lr": grid(4e-4)}', sample_tokens=4)
    port, server_dir = free_port(), tmp_path / "server"
    server_dir.mkdir()
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(mlflow_server(server_dir, port))
        cli = Cli(["run", "faults.py", "--tracking-uri", uri], tmp_path)
        try:
            cli.wait_for(r"\[000_lr=0.0004\] 200 steps")
            time.sleep(1.0)
            stack.close()  # the server is gone
            down = time.time()
            cli.wait_for(r"tracking store unreachable", timeout=60)
            time.sleep(5)
            up = time.time()
            stack.enter_context(mlflow_server(server_dir, port))  # back, same store
            rc = cli.finish()
        finally:
            if cli.proc.poll() is None:
                cli.kill_tree()
        out = cli.output()
        assert rc == 0, out[-4000:]
        client = MlflowClient(uri)
        run = children(client)["000_lr=0.0004"]
        assert run.data.tags["orchestrator.status"] == "finished"
        losses = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in losses) == list(range(1, 201))  # buffered during the outage, none lost
        during = sorted(m.step for m in losses if down * 1000 <= m.timestamp <= up * 1000)
        assert len(during) >= 10, f"{len(during)} steps while the server was down: {during}"
        samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert samples == [f"samples/step_{step:06d}.txt" for step in (50, 100, 150, 200)]
        assert {50, 100, 150, 200} & set(during), during  # some of them were written while the server was gone
        gap = re.match(
            r"tracking store unreachable for (\d+)s from \S+; (\d+) buffered batches delivered late, none lost",
            run.data.tags["tracking_gap"],
        )
        assert gap and int(gap.group(1)) >= 5 and int(gap.group(2)) >= 1, run.data.tags["tracking_gap"]
