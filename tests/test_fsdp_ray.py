"""FSDP through Ray Train: a trial of 2 workers with ``train.parallel=fsdp`` run by ``python -m orchestrator run``,
one worker SIGKILLed mid-trial, the group resumed from the sharded checkpoint. Helpers from `tests.test_faults`."""

from __future__ import annotations

import signal
import time

import pytest
from mlflow import MlflowClient

from gptcore.checkpoint import read_meta
from tests.servers import psutil
from tests.test_faults import TOKENS_PER_STEP, Cli, assert_generates, children, steps_of

pytestmark = pytest.mark.ray

STEPS, EVERY = 60, 10
EXPERIMENT = f"""
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="faults",
    corpus="the-verdict",
    model="micro",
    model_overrides={{"d_model": 64, "n_heads": 4, "n_layers": 2, "pad_vocab_multiple": 64}},
    train={{"batch_size": 1, "epochs": 50, "max_steps": {STEPS}, "eval_every": {EVERY}, "checkpoint_every": {EVERY},
           "eval_iters": 1, "sample_max_new_tokens": 2, "lr_schedule": "constant", "parallel": "fsdp"}},
    grid={{"train.lr": grid(1e-3)}},
    workers=2,
)
"""
TRIAL = "000_lr=0.001"


@pytest.fixture(scope="module")
def killed_fsdp_worker(tmp_path_factory):
    """The trial's rank-1 worker (the one that does not print) is SIGKILLed once rank 0 has printed step 30."""
    work = tmp_path_factory.mktemp("fsdp_ray")
    (work / "faults.py").write_text(EXPERIMENT)
    cli = Cli(["run", "faults.py", "--cpus-per-worker", "1"], work)
    try:
        match = cli.wait_for(rf"RayTrainWorker pid=(\d+)\)\S*\s+\[{TRIAL}\] step 30/{STEPS}")
        rank0 = int(match.group(1))
        workers = [
            p
            for p in psutil.Process(cli.proc.pid).children(recursive=True)
            if "RayTrainWorker" in " ".join(p.cmdline()) and p.pid != rank0
        ]
        assert len(workers) == 1, workers
        time.sleep(0.3)
        workers[0].send_signal(signal.SIGKILL)
        resumed = int(cli.wait_for(rf"\[{TRIAL}\] .*resumed from step (\d+)").group(1))
        rc = cli.finish()
    finally:
        if cli.proc.poll() is None:
            cli.kill_tree()
    return work, rc, cli.output(), resumed, MlflowClient(f"sqlite:///{work / 'mlruns.db'}")


def test_a_killed_fsdp_worker_resumes_from_the_sharded_checkpoint(killed_fsdp_worker):
    _, rc, out, resumed, client = killed_fsdp_worker
    assert rc == 0, out[-4000:]
    assert resumed in (10, 20, 30), resumed
    assert f"2 worker(s) on cpu, resumed from step {resumed}" in out
    run = children(client)[TRIAL]
    assert run.data.tags["orchestrator.status"] == "finished" and run.info.status == "FINISHED"
    assert run.data.params["train.parallel"] == "fsdp"
    assert steps_of(client, run.info.run_id) == list(range(1, STEPS + 1))  # every step once
    tokens = client.get_metric_history(run.info.run_id, "tokens_seen")
    per_step = TOKENS_PER_STEP  # 2 workers x batch 1 x context 32
    assert sorted((m.step, m.value) for m in tokens) == [(s, s * per_step) for s in range(1, STEPS + 1)]
    # the checkpoints are sharded: both ranks' shards and rank 0's metadata in one folder
    best = run.data.tags["best_checkpoint"]
    meta = read_meta(best)
    assert meta["layout"] == "sharded" and meta["world_size"] == 2 and meta["state"]["step"] % EVERY == 0
    assert len([name for name in meta["files"] if name.startswith("shards/")]) == 2
    assert_generates(best)
