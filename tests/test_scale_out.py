"""Scale out, end to end: one sweep on a two-node Ray cluster, checkpoints in S3, metrics on an MLflow server.

All real processes on 127.0.0.1 (tests/servers.py): moto's S3 server, ``mlflow server``, and a Ray head plus a
second node joined with ``ray start --address``, 1 CPU each, token authentication. The sweep's single trial has 2
Ray Train workers of 1 CPU, so they must run on different nodes and train together (gloo DDP). Once Ray has
registered the first checkpoint in the bucket, the worker on the second node is SIGKILLed: Ray Train restarts the
worker group, which resumes from that checkpoint, read back from S3. Then the same study on one worker, which trains
in its Tune trial actor, to the same bucket and server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow import MlflowClient

from tests.curves import assert_same_training
from tests.servers import (
    PATIENCE_S,
    S3_ENV,
    RayCluster,
    enter_concurrently,
    mlflow_server,
    moto_s3,
    psutil,
    ray_cluster,
    stop,
)

pytestmark = pytest.mark.ray

BUCKET = "gpt-checkpoints"
BATCH, CONTEXT, WORKERS = 4, 32, 2
STEPS = 54  # 3 epochs of 18 steps: 144 train windows of the-verdict / (batch 4 x 2 workers)

EXPERIMENT = """
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="scale_out",
    corpus="the-verdict",
    model="micro",
    model_overrides={"dropout": 0.0},  # the ranks' losses are then those of one process on their joint batch
    train={"batch_size": 4, "epochs": 3, "eval_every": 9, "eval_iters": 1, "sample_max_new_tokens": 4},
    grid={"data.stride": grid(32)},
)
"""
# The same study on one worker: trained in its Tune trial actor, no Ray Train (`trains_in_trial_actor`)
IN_ACTOR_EXPERIMENT = EXPERIMENT.replace('"scale_out"', '"scale_out_in_actor"').replace('"epochs": 3', '"epochs": 1')


@dataclass
class ScaleOut:
    work: Path
    returncode: int
    stdout: str
    stderr: str
    tracking_uri: str
    endpoint: str
    worker_nodes: list[str]  # the node of each Ray Train worker, seen when one was killed
    killed_node: str
    actors: set[str]  # the kinds of Ray actor alive then (ray::TrainController, ...)
    in_actor: subprocess.CompletedProcess  # then a one-worker sweep of the same study, to the same bucket and server


def _registered_checkpoint(fs: pafs.FileSystem) -> bool:
    """True once Ray Train has registered a checkpoint of the trial (its snapshot file lists one)."""
    files = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps", recursive=True, allow_not_found=True))
    for info in files:
        if info.base_name == "checkpoint_manager_snapshot.json":  # ray.train.v2 CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
            with fs.open_input_stream(info.path) as f:
                if json.loads(f.read()).get("latest_checkpoint_result"):
                    return True
    return False


def kill_worker_after_first_checkpoint(cluster: RayCluster, sweep: subprocess.Popen, timeout: float = PATIENCE_S):
    """SIGKILL the Ray Train worker on node1 once a checkpoint is in the bucket; returns (workers' nodes, killed,
    the kinds of actor then alive)."""
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and sweep.poll() is None:
        if _registered_checkpoint(fs):
            actors = _actor_kinds(cluster)
            workers = cluster.processes("ray::RayTrainWorker")
            nodes = sorted(cluster.node_of(p.pid) or "?" for p in workers)
            victim = next(p for p in workers if cluster.node_of(p.pid) == "node1")
            victim.send_signal(signal.SIGKILL)
            return nodes, "node1", actors
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint in s3://{BUCKET}/sweeps before the sweep ended (exit {sweep.poll()})")


def _actor_kinds(cluster: RayCluster) -> set[str]:
    kinds = set()
    for proc in cluster.processes("ray::"):
        with contextlib.suppress(psutil.Error):
            kinds.add(re.search(r"ray::\w+", " ".join(proc.cmdline()))[0])
    return kinds


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory):
    work = tmp_path_factory.mktemp("scale_out")
    (work / "scale_out.py").write_text(EXPERIMENT)
    with contextlib.ExitStack() as stack:
        endpoint, tracking_uri, cluster = enter_concurrently(
            stack, moto_s3(work, BUCKET), mlflow_server(work), ray_cluster(work, workers=1)
        )
        env = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():  # the driver and this test use S3
            env.setenv(key, value)
        args = ["run", "scale_out.py", "--address", cluster.address, "--storage", f"s3://{BUCKET}/sweeps"]
        args += ["--tracking-uri", tracking_uri, "--workers", str(WORKERS), "--cpus-per-worker", "1"]
        with (work / "run.out").open("w") as out, (work / "run.err").open("w") as err:
            sweep = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *args],
                cwd=work,
                # the cluster's token (the driver joins it too); a cache of its own: the workers fetch the dataset
                env={**os.environ, **cluster.env, "GPTCORE_CACHE_DIR": str(work / "cache")},
                stdout=out,
                stderr=err,
            )
        try:
            worker_nodes, killed, actors = kill_worker_after_first_checkpoint(cluster, sweep)
            sweep.wait(timeout=2 * PATIENCE_S)
        finally:
            stop(sweep)
        stdout, stderr = (work / "run.out").read_text(), (work / "run.err").read_text()
        if sweep.returncode != 0:
            print(stdout[-5000:], stderr[-5000:])
        (work / "scale_out_in_actor.py").write_text(IN_ACTOR_EXPERIMENT)
        args = ["run", "scale_out_in_actor.py", "--address", cluster.address, "--storage", f"s3://{BUCKET}/sweeps"]
        in_actor = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args, "--tracking-uri", tracking_uri, "--cpus-per-worker", "1"],
            cwd=work,
            env={**os.environ, **cluster.env, "GPTCORE_CACHE_DIR": str(work / "cache")},
            capture_output=True,
            text=True,
            timeout=2 * PATIENCE_S,
        )
        yield ScaleOut(
            work, sweep.returncode, stdout, stderr, tracking_uri, endpoint, worker_nodes, killed, actors, in_actor
        )


def runs(result: ScaleOut, experiment: str = "scale_out"):
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    (parent,) = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'sweep'")
    (child,) = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return client, parent, child


def test_sweep_finishes_on_two_nodes_after_a_worker_is_killed(scale_out):
    assert scale_out.returncode == 0, scale_out.stderr[-3000:]
    assert scale_out.worker_nodes == ["head", "node1"]  # one Ray Train worker per node
    # a trial starts Ray Train's actors but no Ray Data `DatasetManager` (`orchestrator.ray_trainer.ShardTrainer`)
    assert {"ray::TrainController", "ray::RayTrainWorker"} <= scale_out.actors, scale_out.actors
    assert "ray::DatasetManager" not in scale_out.actors, scale_out.actors
    assert "Connected to Ray cluster" in scale_out.stderr
    assert f"{STEPS} steps (18/epoch), 144 train / 16 val windows, 2 worker(s) on cpu" in scale_out.stdout
    assert "resumed from step 18" in scale_out.stdout
    # the dataset, prepared into the bucket before the trial, fetched once (the workers share this machine's cache)
    assert (scale_out.stdout + scale_out.stderr).count(f"from s3://{BUCKET}/sweeps/datasets/") == 1
    assert "Results of sweep scale_out-" in scale_out.stdout


def test_ddp_trial_resumed_from_the_s3_checkpoint_logged_over_http(scale_out):
    client, parent, child = runs(scale_out)
    assert parent.info.status == child.info.status == "FINISHED"
    tags = child.data.tags
    assert tags["orchestrator.status"] == "finished" and tags["world_size"] == "2"
    assert tags["resumed_from_step"] == "18"  # the first checkpoint, the one in the bucket when the worker died
    assert tags["best_checkpoint"].startswith(f"s3://{BUCKET}/sweeps/scale_out-")
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == list(range(1, STEPS + 1))
    (tokens,) = [m for m in client.get_metric_history(child.info.run_id, "tokens_seen") if m.step == STEPS]
    assert tokens.value == STEPS * BATCH * CONTEXT * WORKERS  # both ranks' batches, every step
    val_steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
    assert val_steps == list(range(9, STEPS + 1, 9))


def test_two_ray_train_workers_train_as_one_process_on_their_joint_batch(scale_out):
    """Gradients are synchronised across the Ray Train workers: the trial's 2 workers x batch 4 (one killed and the
    group resumed on the way) log the losses and validation curve of one process training on batch 8, but for the
    rounding of sums taken in another order (`tests.curves`)."""
    import torch

    from gptcore.config import JobConfig
    from gptcore.hooks import Hooks
    from gptcore.train import train

    client, _, child = runs(scale_out)
    downloaded = client.download_artifacts(child.info.run_id, "config.json", str(scale_out.work))
    config = json.loads(Path(downloaded).read_text())
    config["train"]["batch_size"] = BATCH * WORKERS
    curves: dict[str, dict[int, float]] = {"loss": {}, "val_loss": {}}

    class Curves(Hooks):
        def on_step(self, ctx, state, metrics):
            curves["loss"][state.step] = metrics["loss"]

        def on_eval(self, ctx, state, metrics, sample, save):
            curves["val_loss"][state.step] = metrics["val_loss"]

    threads = torch.get_num_threads()
    try:
        train(JobConfig.from_dict(config), Curves(), device="cpu")
    finally:
        torch.set_num_threads(threads)
    for key, single in curves.items():
        logged = {m.step: m.value for m in client.get_metric_history(child.info.run_id, key)}
        assert len(set(single.values())) == len(single), key  # the losses move: not a comparison of constants
        assert_same_training(logged, single)


def test_artifacts_go_through_the_tracking_server(scale_out):
    client, parent, child = runs(scale_out)
    sample = client.download_artifacts(child.info.run_id, f"samples/step_{STEPS:06d}.txt", str(scale_out.work / "dl"))
    assert Path(sample).read_text().startswith("Every effort moves you")
    assert "report/results.md" in [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    stored = [p.name for p in (scale_out.work / "art").rglob("*") if p.is_file()]  # the server's own folder
    assert f"step_{STEPS:06d}.txt" in stored and "loss_curve.png" in stored


def test_sweep_state_and_checkpoints_live_in_the_bucket(scale_out):
    from orchestrator.resume import find_sweep
    from orchestrator.storage import read_json

    storage = f"s3://{BUCKET}/sweeps"
    sweep_id = find_sweep(storage, "scale_out", "latest")
    saved = read_json(f"{storage}/{sweep_id}/sweep.json")
    assert saved["settings"]["storage"] == storage and saved["settings"]["tracking_uri"] == scale_out.tracking_uri
    fs, _ = pafs.FileSystem.from_uri(storage)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps/{sweep_id}", recursive=True))]
    assert any(p.endswith("/tuner.pkl") for p in files)  # Tune's experiment state
    assert any("/000_stride=32/train/checkpoint_" in p and p.endswith("/model.safetensors") for p in files), files
    assert not (scale_out.work / "ray_results").exists()


def test_sample_loads_the_best_checkpoint_from_s3(scale_out):
    _, _, child = runs(scale_out)
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "sample", child.data.tags["best_checkpoint"], "--max-new-tokens", "5"],
        cwd=scale_out.work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("Every effort moves you")


def test_storage_uri_with_endpoint_in_the_query(scale_out, monkeypatch, tmp_path):
    """``s3://bucket/path?endpoint_override=HOST:PORT&scheme=http`` works without AWS_ENDPOINT_URL."""
    from orchestrator.resume import find_sweep
    from orchestrator.storage import join, local_copy, read_json, storage_uri, write_json

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    _, _, child = runs(scale_out)
    query = f"?endpoint_override={scale_out.endpoint.removeprefix('http://')}&scheme=http"
    storage = f"s3://{BUCKET}/other{query}"
    write_json(join(storage, "scale_out-1", "sweep.json"), {"settings": {"n": 1}})
    assert find_sweep(storage, "scale_out", "latest") == "scale_out-1"
    assert read_json(join(storage, "scale_out-1", "sweep.json")) == {"settings": {"n": 1}}
    best = child.data.tags["best_checkpoint"].removeprefix("s3://")
    assert storage_uri(storage, best) == f"s3://{best}{query}"
    local = local_copy(storage_uri(storage, best), tmp_path)
    assert (local / "model.safetensors").is_file()


def test_a_trial_in_its_actor_keeps_its_checkpoints_in_the_bucket(scale_out, tmp_path):
    """A one-worker trial on the cluster trains in its Tune trial actor: Tune copies its checkpoints into the bucket,
    and the best one, named by its URI in the trial's MLflow run, loads and generates."""
    from gptcore.checkpoint import load_model
    from gptcore.sampling import generate_text
    from orchestrator.resume import find_sweep
    from orchestrator.storage import local_copy

    proc = scale_out.in_actor
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "36 steps (36/epoch), 144 train / 16 val windows, 1 worker(s) on cpu" in proc.stdout
    client, parent, child = runs(scale_out, "scale_out_in_actor")
    assert parent.info.status == child.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == list(range(1, 37))
    storage = f"s3://{BUCKET}/sweeps"
    sweep_id = find_sweep(storage, "scale_out_in_actor", "latest")
    best = child.data.tags["best_checkpoint"]
    assert best.startswith(f"{storage}/{sweep_id}/000_stride=32/checkpoint_"), best
    fs, _ = pafs.FileSystem.from_uri(storage)
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/sweeps/{sweep_id}", recursive=True))]
    assert f"{best.removeprefix('s3://')}/model.safetensors" in files
    model, _ = load_model(local_copy(best, tmp_path))
    assert generate_text(model, "Every effort moves you", 4)[0].startswith("Every effort moves you")
