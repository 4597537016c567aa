"""Spot reclaims and elastic trials, end to end on a local multi-node Ray cluster (tests/servers.py).

One elastic trial (``workers=(1, 2)``, a global batch of 4 windows) starts on a head and a second node of 1 CPU each,
so its two Ray Train workers train on both. After its first checkpoint the second node is drained as a spot reclaim
(``ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION``): the loop hears of it at the next step and checkpoints at
once. Then the node is killed: Ray Train restarts the worker group from that checkpoint on the one worker the head
holds; a node joins again, and Ray Train grows the group back to two workers. The trial must finish with the losses
of one uninterrupted process, with at most one step redone, and its MLflow run must record the reclaim.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.curves import assert_same_training
from tests.servers import PATIENCE_S, ray_cluster, start_node, stop, wait_while_running

pytestmark = pytest.mark.ray

EVERY = 20  # scheduled evaluations and checkpoints
DEADLINE_S = 20  # of the drain: the loop checkpoints on the notice, again 15 s before it, then holds
STEPS = 440  # the trial outlives the node's return (it grew back at step 160-260 of 320 here, by load)
EXPERIMENT = f"""
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="spot",
    corpus="the-verdict",
    model="micro",
    model_overrides={{"dropout": 0.0}},
    train={{"batch_size": 2, "global_batch_size": 4, "epochs": 50, "max_steps": {STEPS}, "eval_every": {EVERY},
           "checkpoint_every": {EVERY}, "eval_iters": 1, "sample_max_new_tokens": 0, "lr_schedule": "constant"}},
    grid={{"data.stride": grid(32)}},
    workers=(1, 2),
    elastic_resize_s=1,
    max_failures=0,  # a reclaim is no failure: it counts against Ray Train's max_preemption_failures
)
"""


@dataclass
class Reclaim:
    work: Path
    returncode: int
    output: str
    node_id: str  # the reclaimed node
    noticed_step: int  # the step of the checkpoint taken on the notice
    last_step: int  # the last checkpoint, before the deadline
    timeline: dict[str, float]


def _latest_checkpoint(work: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered for the trial (None: none yet)."""
    for snapshot in (work / "ray_results").rglob("checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError, OSError):
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
            if latest:
                return int(re.search(r"checkpoint_(\d+)", json.dumps(latest))[1])
    return None


@pytest.fixture(scope="module")
def reclaim(tmp_path_factory):
    work = tmp_path_factory.mktemp("spot")
    (work / "spot.py").write_text(EXPERIMENT)
    # Ray Train's watcher polls the drain state every 5 s by default (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S)
    with contextlib.ExitStack() as stack:
        env = stack.enter_context(pytest.MonkeyPatch.context())
        env.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")  # nodes (ray start) and driver inherit it
        # At the deadline Ray Train's elastic policy still counts the drained node, and waits this long (60 s by
        # default) for its workers before it starts on the nodes left
        env.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
        cluster = stack.enter_context(ray_cluster(work, workers=1))
        node_id = cluster.node_id("node1")
        started = time.monotonic()
        timeline: dict[str, float] = {}
        args = ["run", "spot.py", "--address", cluster.address, "--cpus-per-worker", "1"]
        with (work / "run.log").open("w") as out:
            sweep = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *args],
                cwd=work,
                env={**os.environ, **cluster.env, "GPTCORE_CACHE_DIR": str(work / "cache")},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            first = wait_while_running(lambda: _latest_checkpoint(work), sweep, "first checkpoint")
            timeline["first checkpoint"] = time.monotonic() - started
            cluster.drain_for_preemption(node_id, deadline_s=DEADLINE_S)
            deadline = time.monotonic() + DEADLINE_S
            timeline["drained"] = time.monotonic() - started
            log = work / "run.log"
            notice = re.compile(r"reclaimed: checkpoint at step (\d+)")
            noticed = int(wait_while_running(lambda: notice.search(log.read_text()), sweep, "notice")[1])
            last_line = re.compile(r"last checkpoint at step (\d+)")
            last = int(wait_while_running(lambda: last_line.search(log.read_text()), sweep, "last")[1])
            wait_while_running(lambda: (_latest_checkpoint(work) or 0) >= last, sweep, "the last checkpoint registered")
            timeline["last checkpoint"] = time.monotonic() - started
            assert first < noticed <= last
            # Ray Train restarts the group at the deadline (a preemption); the node goes after it, as a reclaim's
            # does (a node gone before its deadline is a failure to Ray, not a preemption)
            time.sleep(max(deadline - time.monotonic(), 0) + 1)
            cluster.kill_node("node1")
            timeline["killed"] = time.monotonic() - started
            wait_while_running(
                lambda: re.search(r"1 worker\(s\) on cpu, resumed", log.read_text()), sweep, "one worker"
            )
            timeline["one worker"] = time.monotonic() - started
            start_node(cluster, "node2", work)  # the node comes back (an autoscaler's replacement)
            timeline["node back"] = time.monotonic() - started
            sweep.wait(timeout=2 * PATIENCE_S)
            timeline["finished"] = time.monotonic() - started
        finally:
            stop(sweep)
    output = (work / "run.log").read_text()
    print(timeline)
    yield Reclaim(work, sweep.returncode, output, node_id, noticed, last, timeline)


def _run(reclaim: Reclaim):
    client = MlflowClient(f"sqlite:///{reclaim.work / 'mlruns.db'}")
    exp = client.get_experiment_by_name("spot")
    (child,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'trial'")
    return client, child


def test_reclaimed_elastic_trial_checkpoints_shrinks_grows_back_and_finishes(reclaim):
    assert reclaim.returncode == 0, reclaim.output[-5000:]
    starts = re.findall(r"(\d) worker\(s\) on cpu(?:, resumed from step (\d+))?", reclaim.output)
    # both nodes; then the head alone, from the last checkpoint before the deadline; then two again, a node back
    assert starts[:2] == [("2", ""), ("1", str(reclaim.last_step))], (starts, reclaim.output[-5000:])
    assert len(starts) == 3 and starts[2][0] == "2" and int(starts[2][1]) >= reclaim.last_step, starts
    assert f"node {reclaim.node_id} is being reclaimed: checkpoint at step {reclaim.noticed_step}" in reclaim.output
    # the results table says the trial is elastic, and the reclaim it lived through
    table = reclaim.output[reclaim.output.index("Results of sweep") :].splitlines()
    assert re.search(r"status\s+workers\s.*\spreemptions\s+best checkpoint$", table[1]), table
    assert re.search(r"finished\s+1-2 elastic\s.*\s1\s+\S+checkpoint_\d{7}$", table[3]), table


def test_the_reclaim_is_recorded_in_mlflow(reclaim):
    client, child = _run(reclaim)
    assert child.data.tags["preemptions"] == "1"
    events = json.loads(
        Path(client.download_artifacts(child.info.run_id, "preemptions.json", str(reclaim.work))).read_text()
    )
    (event,) = events
    assert event["node_id"] == reclaim.node_id and re.fullmatch(r"[\d.]+", event["node_ip"])
    assert event["ranks"] in ([0], [1])  # the one rank the reclaimed node held (Ray places the ranks)
    assert event["notice_step"] == reclaim.noticed_step
    assert event["step_saved"] == event["resumed_from_step"] == reclaim.last_step
    assert event["world_size"] == 1
    assert 0 <= event["steps_redone"] <= 1, event  # the loop held after its last checkpoint
    assert 0 < event["seconds_to_resume"] < event["seconds_notice_to_resume"]
    (redone,) = client.get_metric_history(child.info.run_id, "preemption_steps_redone")
    assert redone.step == reclaim.last_step and redone.value == event["steps_redone"]


def test_the_trial_trains_as_one_uninterrupted_process(reclaim):
    """2 workers, then 1 (accumulating 2 micro-batches), then 2 again, each from a checkpoint: the losses of one
    process on the same global batch of 4 windows, all the way."""
    import torch

    from gptcore.config import JobConfig
    from gptcore.hooks import Hooks
    from gptcore.train import train

    client, child = _run(reclaim)
    config = json.loads(
        Path(client.download_artifacts(child.info.run_id, "config.json", str(reclaim.work))).read_text()
    )
    losses: dict[int, float] = {}

    class Losses(Hooks):
        def on_step(self, ctx, state, metrics):
            losses[state.step] = metrics["loss"]

    threads = torch.get_num_threads()
    try:
        train(JobConfig.from_dict(config), Losses(), device="cpu", data_dir=None)
    finally:
        torch.set_num_threads(threads)
    logged = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "loss")}
    assert len(set(losses.values())) > STEPS // 2  # the losses move: not a comparison of constants
    assert_same_training(logged, losses)
