"""End to end through real Ray Train / Ray Tune and a real MLflow store (SQLite in a temp dir)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from gptcore.checkpoint import load_model
from gptcore.sampling import generate_text

pytestmark = pytest.mark.ray

EXPERIMENT = """
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="tiny_sweep",
    corpus="the-verdict",
    model="micro",
    train={"batch_size": 4, "max_steps": 8, "eval_every": 4, "eval_iters": 2, "sample_max_new_tokens": 8,
           "checkpoint_every": 4},
    grid={"data.stride": grid(32, 16)},
)
"""


def run_cli(args: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        print(proc.stdout[-5000:], proc.stderr[-5000:])
    return proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("sweep")
    (work / "tiny_sweep.py").write_text(EXPERIMENT)
    proc = run_cli(["run", "tiny_sweep.py"], work)
    client = MlflowClient(f"sqlite:///{work / 'mlruns.db'}")
    return work, proc, client


def children(client: MlflowClient):
    exp = client.get_experiment_by_name("tiny_sweep")
    parents = client.search_runs([exp.experiment_id], "tags.`orchestrator.role` = 'sweep'")
    assert len(parents) == 1
    kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return parents[0], sorted(kids, key=lambda r: r.info.run_name)


def test_sweep_exits_cleanly_with_a_results_table(sweep):
    _, proc, _ = sweep
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Results of sweep tiny_sweep-" in proc.stdout
    assert "000_stride=32" in proc.stdout and "001_stride=16" in proc.stdout


def test_two_tune_trials_terminated(sweep):
    from ray.tune import ExperimentAnalysis

    work, _, _ = sweep
    (sweep_dir,) = (work / "ray_results").iterdir()
    analysis = ExperimentAnalysis(str(sweep_dir))
    assert sorted(t.status for t in analysis.trials) == ["TERMINATED", "TERMINATED"]
    assert json.loads((sweep_dir / "sweep.json").read_text())["settings"]["tracking_uri"].startswith("sqlite:////")


def test_parent_with_two_child_runs_params_and_metrics(sweep):
    _, _, client = sweep
    parent, kids = children(client)
    assert parent.info.status == "FINISHED" and parent.data.tags["orchestrator.status"] == "finished"
    assert [k.info.run_name for k in kids] == ["000_stride=32", "001_stride=16"]
    for kid, stride in zip(kids, ("32", "16"), strict=True):
        assert kid.info.status == "FINISHED" and kid.data.tags["orchestrator.status"] == "finished"
        params = kid.data.params
        assert params["data.stride"] == stride and params["grid.data.stride"] == stride
        assert params["model.d_model"] == "32" and params["train.lr"] == "0.0004"
        for tag in ("seed", "experiment_file", "host", "ray_trial_id", "best_checkpoint"):
            assert kid.data.tags.get(tag), tag
        steps = [m.step for m in client.get_metric_history(kid.info.run_id, "loss")]
        assert steps == list(range(1, 9))  # every step, once
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "val_loss")] == [4, 8]
        for key in ("lr", "tokens_seen", "tokens_per_sec", "val_perplexity", "train_loss"):
            assert client.get_metric_history(kid.info.run_id, key), key


def test_samples_and_curve_are_artifacts(sweep):
    _, _, client = sweep
    _, kids = children(client)
    for kid in kids:
        samples = [a.path for a in client.list_artifacts(kid.info.run_id, "samples")]
        assert samples == ["samples/step_000004.txt", "samples/step_000008.txt"]
        text = Path(client.download_artifacts(kid.info.run_id, samples[-1])).read_text()
        assert text.startswith("Every effort moves you")
        assert "loss_curve.png" in [a.path for a in client.list_artifacts(kid.info.run_id)]
    parent, _ = children(client)
    assert {"report/results.md", "report/val_loss_vs_tokens.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")
    }


def test_ray_checkpoints_load_into_gptcore_and_generate(sweep):
    work, _, client = sweep
    _, kids = children(client)
    for kid in kids:
        best = Path(kid.data.tags["best_checkpoint"])
        assert best.is_dir() and str(best).startswith(str(work / "ray_results"))
        model, ckpt = load_model(best)
        assert ckpt.state.step in (4, 8) and ckpt.config.model.d_model == 32
        assert generate_text(model, "Every effort moves you", 5)[0].startswith("Every effort moves you")
    proc = run_cli(["sample", kids[0].data.tags["best_checkpoint"], "--max-new-tokens", "5"], work, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("Every effort moves you")


def test_report_verb_reads_mlflow(sweep):
    work, _, _ = sweep
    proc = run_cli(["report", "tiny_sweep.py", "--out", "report"], work, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (work / "report" / "results.md").read_text().count("| 000_stride=32 |") == 1
    assert (work / "report" / "train_vs_val.png").stat().st_size > 1000


def test_export_verb_writes_a_transformers_folder(sweep):
    import torch
    from transformers import GPT2LMHeadModel

    work, _, client = sweep
    _, kids = children(client)
    checkpoint = kids[0].data.tags["best_checkpoint"]
    proc = run_cli(["export", checkpoint, "hf_model"], work, timeout=120)
    assert proc.returncode == 0, proc.stderr
    hf = GPT2LMHeadModel.from_pretrained(work / "hf_model").eval()
    model, _ = load_model(checkpoint)
    tokens = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens), atol=1e-5)
