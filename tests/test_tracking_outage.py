"""The MLflow tracking server: unreachable before a sweep starts (refused at once), and lost in the middle of one
(training goes on, what was logged meanwhile arrives afterwards)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from tests.faults import children, write_experiment
from tests.servers import Cli

ray_test = pytest.mark.ray
EVALUATION = r"\[000_lr=0.0004\] step \d+/200"  # the progress line of an evaluation (every 50 steps, with a sample)


def test_unreachable_tracking_server_fails_before_anything_starts(tmp_path):
    from tests.servers import free_port

    write_experiment(tmp_path, steps=4, every=2, grid='{"train.lr": grid(4e-4)}')
    uri = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "faults.py", "--tracking-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip().splitlines()
    assert len(message) == 1 and uri in message[0] and "unreachable" in message[0].lower(), proc.stderr
    assert not (tmp_path / "ray_results").exists()  # no sweep state, no Ray


@ray_test
def test_tracking_server_lost_mid_run(tmp_path):
    """The MLflow server dies a second into training and comes back 10-20 s later: training steps go on meanwhile
    (measured by the time stamps of the logged losses), and every metric and sample text logged during the outage
    arrives afterwards; the run's ``tracking_gap`` tag says how long the store was gone and how much came late."""
    from tests.servers import free_port, mlflow_server

    # d_model 128: 200 steps take ~22 s, an outage of ~8 s a second in falls well inside them
    write_experiment(tmp_path, steps=200, every=50, grid='{"train.lr": grid(4e-4)}', sample_tokens=4, d_model=128)
    port, server_dir = free_port(), tmp_path / "server"
    server_dir.mkdir()
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(mlflow_server(server_dir, port))
        cli = Cli(["run", "faults.py", "--tracking-uri", uri], tmp_path)
        try:
            cli.wait_for(r"\[000_lr=0.0004\] 200 steps")
            time.sleep(1.0)
            evaluations = len(re.findall(EVALUATION, cli.output()))
            stack.close()  # the server is gone
            down = time.time()
            cli.wait_for(r"tracking store unreachable")
            time.sleep(5)
            # and stays gone until an evaluation (its sample text) has been written meanwhile, however slow the machine:
            # two more progress lines, as a worker's lines reach the driver late (the first may be of an evaluation
            # made before the server went down; evaluations are ~5 s apart)
            cli.wait_for(rf"(?s)(?:{EVALUATION}.*?){{{evaluations + 2}}}")
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


def test_an_evaluation_does_not_wait_for_a_store_found_down():
    """At each evaluation the worker flushes its MLflow queue (`RunLogger.flush(unless_outage=True)`): with the store
    down, it returns as soon as the outage is found, not after its 10 s timeout; what is queued stays queued."""
    from orchestrator.tracking import RunLogger
    from tests.servers import free_port

    logger = RunLogger(f"http://127.0.0.1:{free_port()}", "0" * 32, flush_every=0.1)
    try:
        logger.log_metrics({"loss": 1.0}, step=1)
        start = time.monotonic()
        assert logger.flush(timeout=20, unless_outage=True) is False
        assert time.monotonic() - start < 5 and logger.outage
        assert logger.flush(timeout=0.5) is False  # the queue is kept
    finally:
        logger.close(timeout=0.1)


def test_the_end_of_a_sweep_waits_for_a_tracking_server_that_comes_back(tmp_path, capsys):
    """What a sweep's driver (and a trial's end) does before recording results: wait while the server is down."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.tracking import wait_until_reachable
    from tests.servers import free_port, mlflow_server

    port = free_port()
    with ThreadPoolExecutor(1) as pool:
        waited = pool.submit(wait_until_reachable, f"http://127.0.0.1:{port}", 300)
        time.sleep(3)
        assert not waited.done()  # nothing answers yet
        with mlflow_server(tmp_path, port):
            waited.result(timeout=300)  # returns (without an error) once the server answers
    out = capsys.readouterr().out
    assert f"tracking server http://127.0.0.1:{port} unreachable; waiting for it" in out and "is back" in out


def test_a_tracking_server_that_stays_down_ends_the_wait_with_one_clear_error():
    from orchestrator.tracking import TrackingError, wait_until_reachable
    from tests.servers import free_port

    with pytest.raises(TrackingError, match=r"has not answered for 1 s .* --resume"):
        wait_until_reachable(f"http://127.0.0.1:{free_port()}", patience_s=1)
