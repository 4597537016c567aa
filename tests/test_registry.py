"""The Model Registry's ``best`` alias, without Ray: sweeps recorded in a real MLflow SQLite store as a sweep records
them, each registered with `register_best`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.entities import Metric

from gptcore.checkpoint_format import CheckpointParts, TrainState
from gptcore.checkpoint_whole import take_snapshot, write_snapshot
from gptcore.train import build_model
from orchestrator.registry import register_best
from orchestrator.tracking import SweepTracker

from .conftest import tiny_job

NAME = "registry_study"


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A SQLite tracking store in ``tmp_path`` (artifacts beside it) and a checkpoint of the micro model."""
    monkeypatch.chdir(tmp_path)
    job = tiny_job()
    model, _ = build_model(job, torch.device("cpu"))
    checkpoint = write_snapshot(take_snapshot(CheckpointParts(model, job, TrainState())), tmp_path / "checkpoint")
    return f"sqlite:///{tmp_path / 'mlruns.db'}", checkpoint


def record_sweep(tracking_uri: str, sweep_id: str, checkpoint: Path, val_loss: float) -> None:
    """A finished sweep of one finished trial whose best validation loss is ``val_loss``."""
    tracker = SweepTracker(tracking_uri, NAME, artifact_root=str(Path.cwd() / "artifacts"))
    parent = tracker.parent_run(sweep_id, params={}, tags={"orchestrator.kind": "train"})
    run = tracker.child_run(parent, sweep_id, "000_trial", params={}, tags={"best_checkpoint": str(checkpoint)})
    tracker.client.log_batch(run, metrics=[Metric("val_loss", val_loss, 0, 2)])
    tracker.finish(run, "finished")
    tracker.finish(parent, "finished")


def test_best_follows_the_lowest_validation_loss_across_sweeps(store):
    tracking_uri, checkpoint = store
    outcomes = []
    for sweep_id, val_loss in (("first", 5.0), ("better", 3.0), ("worse", 4.0)):
        record_sweep(tracking_uri, sweep_id, checkpoint, val_loss)
        outcomes.append(register_best(tracking_uri, NAME, sweep_id))
    assert [o["version"] for o in outcomes] == ["1", "2", "3"]
    assert [o["best_version"] for o in outcomes] == ["1", "2", "2"]  # 5.0, then 3.0 beats it, 4.0 does not
    assert [o["alias_moved"] for o in outcomes] == [True, True, False]
