"""Helpers of the fault tests (tests/test_faults.py, test_interrupted.py, test_tracking_outage.py): a small
experiment written to a work folder, and the MLflow runs and checkpoints it leaves."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from gptcore.checkpoint import load_model
from gptcore.sampling import generate_text

REPO = Path(__file__).resolve().parents[1]
# A small model, 2 layers of width `d_model` (64: ~55 ms of CPU a step here, 3.3 M parameters, most of them the
# embedding; 128: ~110 ms, 6.9 M): slow enough to be hit mid-way, fast enough for the suite (a step's cost, and a
# checkpoint's size, grow with the width: 256 took ~265 ms and wrote 174 MB checkpoints).
EXPERIMENT = """
from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="faults",
    corpus="the-verdict",
    model="micro",
    model_overrides={{"d_model": {d_model}, "n_heads": 4, "n_layers": 2}},
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
    d_model: int = 64,
) -> Path:
    """``faults.py``: evaluations and checkpoints every ``every`` steps (and a sample of ``sample_tokens`` tokens); a
    wider model (``d_model``) where a trial must stay mid-way longer."""
    path = work / "faults.py"
    text = EXPERIMENT.format(
        steps=steps,
        every=every,
        grid=grid,
        concurrent=concurrent,
        max_failures=max_failures,
        sample_tokens=sample_tokens,
        d_model=d_model,
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
