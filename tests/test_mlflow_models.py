"""MLflow as its users expect (issue 16), against real MLflow, from ONE tiny sweep of the studies (full_grid narrowed
to one micro trial: `tests.studies.MODELS`):
source tags and config.json on its runs, the experiment's description, the best model registered as a pyfunc whose
greedy text is ``orchestrator sample``'s, a worse sweep that does not move ``best``, ``mlflow models serve`` answering
a REST call, system metrics on the trial run, and ``register``'s bad input."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from tests.servers import BIN, _serve, free_port
from tests.studies import MODELS, lane_folder

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_FILE = REPO / "experiments" / f"{MODELS}.py"
NAME = MODELS
PROMPT, NEW_TOKENS = "Every effort moves you", 8


@pytest.fixture(scope="module")
def sweep(studies):
    """The studies' one-trial sweep `tests.studies.MODELS` (its lane's work folder, SQLite store and artifacts);
    (work, uri, client, output)."""
    work, outcomes = studies
    rc, output = outcomes[MODELS]
    assert rc == 0, output[-4000:]
    folder = lane_folder(work, MODELS)
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    return folder, uri, MlflowClient(uri), output


def _runs(client: MlflowClient, role: str) -> list:
    """The real sweep's runs (not those of the sweeps recorded by hand)."""
    exp = client.get_experiment_by_name(NAME)
    query = f"tags.`orchestrator.role` = '{role}' and tags.`orchestrator.sweep_id` LIKE '{NAME}-%'"
    return client.search_runs([exp.experiment_id], query)


def _sample(work: Path, checkpoint: str) -> str:
    args = [sys.executable, "-m", "orchestrator", "sample", checkpoint, "--prompt", PROMPT]
    proc = subprocess.run(
        [*args, "--max-new-tokens", str(NEW_TOKENS)], cwd=work, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.rstrip("\n")


def test_runs_follow_mlflow_conventions(sweep):
    """Parent and child runs carry MLflow's source tags; the experiment's description is the experiment file's
    docstring; the parent's description summarises the grid; each trial has its resolved config as config.json."""
    _, _, client, _ = sweep
    exp = client.get_experiment_by_name(NAME)
    assert exp.tags["mlflow.note.content"] == ast.get_docstring(ast.parse(EXPERIMENT_FILE.read_text()))
    (parent,) = _runs(client, "sweep")
    (child,) = _runs(client, "trial")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    for run in (parent, child):
        tags = run.data.tags
        assert tags["mlflow.source.name"] == str(EXPERIMENT_FILE)
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.git.commit"] == commit
    note = parent.data.tags["mlflow.note.content"]
    assert "1 trial(s) of full_grid over data.stride in 64, 32; model.pos_emb in " in note and "data.stride=32" in note
    config = json.loads(Path(client.download_artifacts(child.info.run_id, "config.json", str(sweep[0]))).read_text())
    assert config["model"]["n_layers"] == int(child.data.params["model.n_layers"])
    assert config["data"]["stride"] == 32 and config["train"]["max_steps"] == 4


def test_best_model_predicts_like_sample(sweep):
    """The sweep registered its best checkpoint as version 1 with alias best, linked to the trial's run; the pyfunc
    loaded from models:/full_grid@best generates, greedily, the text `orchestrator sample` prints."""
    import mlflow
    import pandas as pd

    work, uri, client, output = sweep
    assert f"registered {NAME} version 1" in output, output[-2000:]
    (child,) = _runs(client, "trial")
    version = client.get_model_version_by_alias(NAME, "best")
    assert str(version.version) == "1" and version.run_id == child.info.run_id
    assert float(version.tags["val_loss"]) == min(
        m.value for m in client.get_metric_history(child.info.run_id, "val_loss")
    )
    expected = _sample(work, child.data.tags["best_checkpoint"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@best")
    assert model.predict([PROMPT], params={"max_new_tokens": NEW_TOKENS}) == [expected]
    frame = pd.DataFrame({"prompt": [PROMPT, "I had"]})
    texts = model.predict(frame, params={"max_new_tokens": NEW_TOKENS, "temperature": 0.8, "top_k": 5})
    assert texts[0].startswith(PROMPT) and texts[1].startswith("I had")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@best", dst_path=str(work / "model")))
    assert sorted(p.name for p in (local / "artifacts" / "checkpoint").iterdir()) == ["meta.json", "model.safetensors"]
    assert not list(local.rglob("*.pkl"))  # weights as safetensors, no optimizer state, nothing pickled


def _fake_sweep(client: MlflowClient, sweep_id: str, *, checkpoint: str, val_loss: float, status: str) -> None:
    """A sweep recorded by hand (parent run, one trial) for `register` to read, as a real sweep records it."""
    from orchestrator.tracking import SweepTracker

    tracker = SweepTracker(client._tracking_client.tracking_uri, NAME)
    parent = tracker.parent_run(sweep_id, params={}, tags={"orchestrator.kind": "train"})
    run = tracker.child_run(parent, sweep_id, "000_by_hand", params={}, tags={"best_checkpoint": checkpoint})
    tracker.client.log_batch(run, metrics=[Metric("val_loss", val_loss, 0, 2)])
    tracker.finish(run, status)
    tracker.finish(parent, "finished")


def _register(work: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "orchestrator", "register", NAME, *args]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)


def test_worse_sweep_does_not_move_best(sweep):
    """A later, worse sweep adds a version (with its val_loss tag) but best stays on the lowest validation loss."""
    work, _, client, _ = sweep
    (child,) = _runs(client, "trial")
    copy = shutil.copytree(child.data.tags["best_checkpoint"], work / "worse-checkpoint")
    _fake_sweep(client, "worse", checkpoint=str(copy), val_loss=99.0, status="finished")
    proc = _register(work, "--sweep", "worse")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "version 2" in proc.stdout and "alias best stays on version 1" in proc.stdout
    assert client.get_model_version(NAME, "2").tags["val_loss"] == "99.0"
    assert str(client.get_model_version_by_alias(NAME, "best").version) == "1"


def test_register_refuses_bad_input(sweep):
    """No finished trial, a checkpoint gone from storage, a file store: one error line, exit 2, nothing registered."""
    work, _, client, _ = sweep
    before = len(client.search_model_versions(f"name = '{NAME}'"))
    _fake_sweep(client, "failed", checkpoint=str(work / "nowhere"), val_loss=1.0, status="failed")
    _fake_sweep(client, "gone", checkpoint=str(work / "gone-checkpoint"), val_loss=0.5, status="finished")
    cases = {
        ("--sweep", "failed"): "no finished trial",
        ("--sweep", "gone"): "is gone or unreadable",
        ("--tracking-uri", f"file://{work}/fs"): f"file://{work}/fs has no Model Registry",
    }
    for args, message in cases.items():
        proc = _register(work, *args)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert len(client.search_model_versions(f"name = '{NAME}'")) == before
    assert str(client.get_model_version_by_alias(NAME, "best").version) == "1"


def test_mlflow_models_serve_answers_rest(sweep):
    """`mlflow models serve -m models:/full_grid@best --env-manager local` on 127.0.0.1 answers an invocations
    call with the generated text."""
    work, uri, client, _ = sweep
    (child,) = _runs(client, "trial")
    port = free_port()
    command = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@best", "--env-manager", "local"]
    command += ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    env = {  # as with the venv activated: its uvicorn on PATH; this checkout's orchestrator importable
        "MLFLOW_TRACKING_URI": uri,
        "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with _serve(command, port, work / "serve.log", env=env, timeout=300):
        body = json.dumps({"inputs": [PROMPT], "params": {"max_new_tokens": NEW_TOKENS}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            answer = json.loads(response.read())
    assert answer == {"predictions": [_sample(work, child.data.tags["best_checkpoint"])]}


def test_system_metrics_on_trial_run(sweep):
    """The trial's run has MLflow's system metrics (CPU, memory) from the rank-0 worker."""
    _, _, client, _ = sweep
    (child,) = _runs(client, "trial")
    metrics = child.data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
