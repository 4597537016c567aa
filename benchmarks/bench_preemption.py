"""Spot reclaims: the steps a trial redoes, and the time it loses, with Ray's drain notice and without it.

One run, on a local two-node Ray cluster (`tests.servers`: a head and a second node of 1 CPU each, `ray start`, token
auth): the same two-worker spot trial twice. Each time, once the trial has passed its first scheduled checkpoint by
half the checkpoint interval (where an unannounced loss lands on average), the second node is

- **with the notice**: drained for preemption (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, a 30 s
  deadline), as cluster.yaml's spot nodes do on EC2's notice, then killed after the deadline;
- **without it**: killed at once (an instance lost with no notice, or a spot node with no drain).

A node joins again at once (the autoscaler's replacement) and the trial finishes. Printed side by side: the steps
redone (the last step logged before the loss, minus the step resumed from), the seconds from the notice (or the
loss) to training again, from the loss to training again, and to passing the step reached before the loss. Also
the cost of one `ray.train.get_preemption_info()` on two workers (a barrier the loop enters every step).

    python benchmarks/bench_preemption.py [--every 40] [--steps 400]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, Report, emit, machine, table

sys.path.insert(0, str(ROOT))
from tests.servers import RayCluster, ray_cluster, start_node, stop, wait_while_running

DEADLINE_S = 30  # the drain's (AWS gives 120 s; cluster.yaml drains 110 s ahead): the loop trains 15 s of it

EXPERIMENT = """
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="{name}",
    corpus="the-verdict",
    model="micro",
    model_overrides={{"dropout": 0.0}},
    train={{"batch_size": 2, "epochs": 50, "max_steps": {steps}, "eval_every": {every}, "checkpoint_every": {every},
           "eval_iters": 1, "sample_max_new_tokens": 0, "lr_schedule": "constant"}},
    grid={{"data.stride": grid(32)}},
    workers=2,
    spot=True,
    max_failures=2,
)
"""


def loss_history(work: Path, name: str) -> list[tuple[int, float]]:
    """(step, seconds since the epoch) of every logged training loss of experiment ``name``'s one trial."""
    from mlflow import MlflowClient

    log = work / f"{name}.log"
    if "worker(s) on cpu" not in log.read_text():  # the driver has made the store's tables (no migration race)
        return []
    with contextlib.suppress(Exception):
        client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'trial'")
        if runs:
            return sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(runs[0].info.run_id, "loss"))
    return []


def reclaim(cluster: RayCluster, work: Path, name: str, notice: bool, steps: int, every: int, nodes: tuple[str, str]):
    """Run the trial; lose node ``nodes[0]`` half an interval after the first checkpoint (drained first if
    ``notice``), and join ``nodes[1]`` in its place."""
    victim, joins = nodes
    (work / f"{name}.py").write_text(EXPERIMENT.format(name=name, steps=steps, every=every))
    args = [sys.executable, "-m", "orchestrator", "run", f"{name}.py", "--address", cluster.address]
    log = work / f"{name}.log"
    env = {**os.environ, **cluster.env, "GPTCORE_CACHE_DIR": str(work / "cache"), "PYTHONPATH": str(ROOT)}
    node_id = cluster.node_id(victim)
    with log.open("w") as out:
        sweep = subprocess.Popen(args, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        lost_at = every + every // 2
        wait_while_running(lambda: any(s >= lost_at for s, _ in loss_history(work, name)), sweep, f"step {lost_at}")
        noticed = time.time()
        if notice:  # the node goes at the drain's deadline, as a reclaimed spot node does
            cluster.drain_for_preemption(node_id, deadline_s=DEADLINE_S)
            wait_while_running(lambda: "last checkpoint at step" in log.read_text(), sweep, "the last checkpoint")
            time.sleep(max(noticed + DEADLINE_S + 1 - time.time(), 0))
        last_before = max(s for s, _ in loss_history(work, name))
        cluster.kill_node(victim)
        lost = time.time()
        start_node(cluster, joins, work)
        sweep.wait(timeout=900)
    finally:
        stop(sweep)
    output = log.read_text()
    history = loss_history(work, name)
    resumed = [int(s) for s in re.findall(r"resumed from step (\d+)", output)]
    if sweep.returncode != 0 or not resumed:
        raise RuntimeError(f"{name}: the sweep exited {sweep.returncode}, resumed from {resumed}:\n{output[-3000:]}")
    last_logged = max(s for s, t in history if t <= lost)  # what MLflow got before the node went
    passed = min(t for s, t in history if s > last_logged)  # the first step beyond it, after the restart
    row = {
        "notice": notice,
        "steps_redone": last_logged - resumed[0],
        "last_step_before": max(last_before, last_logged),
        "resumed_from": resumed[0],
        "seconds_lost_to_passing": round(passed - lost, 1),
    }
    if notice:
        events = _events(work)
        row.update(
            seconds_notice_to_resume=events[0]["seconds_notice_to_resume"],
            seconds_loss_to_resume=events[0]["seconds_to_resume"],
            notice_to_kill_s=round(lost - noticed, 1),
        )
    return row


def _events(work: Path) -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("notice")]
    (run,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'trial'")
    return json.loads(Path(client.download_artifacts(run.info.run_id, "preemptions.json", str(work))).read_text())


def barrier_cost(cluster: RayCluster, work: Path, calls: int = 300) -> float:
    """Milliseconds per `ray.train.get_preemption_info()` on two workers (one per node), median of ``calls``."""
    code = f"""
import json, statistics, time, ray, ray.train
from ray.train.torch import TorchTrainer
ray.init(address={cluster.address!r}, logging_level="ERROR")
def loop(config):
    times = []
    for _ in range({calls}):
        t = time.perf_counter(); ray.train.get_preemption_info(); times.append(time.perf_counter() - t)
    if ray.train.get_context().get_world_rank() == 0:
        print("BARRIER_MS", json.dumps(1000 * statistics.median(times)), flush=True)
TorchTrainer(loop, scaling_config=ray.train.ScalingConfig(num_workers=2),
             run_config=ray.train.RunConfig(storage_path={str(work / "barrier")!r})).fit()
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **cluster.env}, capture_output=True, text=True, timeout=600
    )
    found = re.search(r"BARRIER_MS (\S+)", out.stdout + out.stderr)
    if not found:
        raise RuntimeError((out.stdout + out.stderr)[-3000:])
    return float(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=40, help="steps between scheduled checkpoints")
    parser.add_argument("--steps", type=int, default=400, help="steps of each trial")
    args = parser.parse_args()
    print(machine(), flush=True)
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"  # Ray's default is 5 s: see the README
    with tempfile.TemporaryDirectory(prefix="bench-preemption-") as tmp, ray_cluster(Path(tmp), workers=1) as cluster:
        work = Path(tmp)
        cost = barrier_cost(cluster, work)
        rows = [
            reclaim(cluster, work, "notice", True, args.steps, args.every, ("node1", "node2")),
            reclaim(cluster, work, "no_notice", False, args.steps, args.every, ("node2", "node3")),
        ]
    print(f"\nget_preemption_info() on 2 workers (2 nodes): {cost:.2f} ms a call (median of 300)\n")
    headers = ["reclaim", "steps redone", "resumed from", "s notice -> training", "s loss -> passing the lost step"]
    print(
        table(
            headers,
            [
                [
                    "with the notice" if r["notice"] else "without (node lost)",
                    r["steps_redone"],
                    r["resumed_from"],
                    r.get("seconds_notice_to_resume", "-"),
                    r["seconds_lost_to_passing"],
                ]
                for r in rows
            ],
        )
    )
    emit({"barrier_ms": cost, "rows": rows})
    with_notice, without = rows
    out = Report("preemption")
    out.figure(
        "spot reclaim on a local 2-node Ray: steps redone with the drain notice vs without",
        f"{with_notice['steps_redone']} vs {without['steps_redone']} steps redone per reclaim (checkpoint every "
        f"{args.every}); {with_notice['seconds_notice_to_resume']} s notice to training; "
        f"get_preemption_info() {cost:.1f} ms a call",
        goal="<= 1 step redone",
        met=with_notice["steps_redone"] <= 1,
    )
    out.save()


if __name__ == "__main__":
    main()
