"""An interrupted driver: Ctrl-C (SIGINT) during a sweep, then SIGKILL of the driver and its local Ray; each time
``--resume`` trains only what was left, from its checkpoints."""

from __future__ import annotations

import re
import signal

import pytest
from mlflow import MlflowClient

from tests.faults import children, steps_of, write_experiment
from tests.servers import Cli

ray_test = pytest.mark.ray


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    """Two trials one at a time: SIGINT during trial 001, --resume, SIGKILL (driver and its Ray) during trial 001
    again, --resume again to the end. Returns the work folder, each run's (exit code, output), and the MLflow client."""
    work = tmp_path_factory.mktemp("interrupted")
    # d_model 128: steps slow enough that trial 001, past "step 20/60", is still training while the driver handles
    # SIGINT
    write_experiment(work, steps=60, every=20, grid='{"train.lr": grid(4e-4, 3e-4)}', concurrent=1, d_model=128)
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
