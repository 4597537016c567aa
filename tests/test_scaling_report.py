"""A scaling ladder's report fits its trials both ways and plots them; a fit the trials cannot give is said plainly.

The trials follow a known law, L = E + A / N^alpha + B / D^beta with D = C / (6 N), over 4 model sizes x 3 FLOP
budgets like experiments/scaling_ladder.py; the report must find the law again.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.results import TrialResult
from orchestrator.scaling_report import scaling_report

LAW = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
SIZES = (2e6, 5e6, 1.2e7, 3e7)  # around N_opt of every budget, so each budget's loss has a minimum inside them
BUDGETS = (1e15, 3e15, 1e16)
PREDICT_FLOPS = 3e17  # a budget the user names, beyond the ladder's
FILES = ("scaling.json", "scaling.txt", "loss_vs_params.png", "frontier.png")


def law_loss(params: float, tokens: float) -> float:
    return LAW["E"] + LAW["A"] / params ** LAW["alpha"] + LAW["B"] / tokens ** LAW["beta"]


def ladder(sizes=SIZES, budgets=BUDGETS, noise: float = 1e-3) -> list[TrialResult]:
    """Finished trials of the ladder, as `orchestrator.results` reads them from MLflow (grid values as strings)."""
    rng = np.random.default_rng(0)
    results = []
    for flops in budgets:
        for params in sizes:
            tokens = flops / (6 * params)
            grid = {"model.d_model": str(int(params)), "train.flops_budget": str(flops)}
            results.append(
                TrialResult(
                    name=f"N={params:.3g}_C={flops:.3g}",
                    run_id=f"{params}-{flops}",
                    status="finished",
                    params=grid,
                    final_val_loss=law_loss(params, tokens) * (1 + noise * rng.standard_normal()),
                    tokens_seen=tokens,
                    params_total=params,
                )
            )
    return results


def test_a_ladder_report_finds_the_law_and_plots_it(tmp_path):
    """Both fits find the law; asked for a budget beyond the ladder's (``report --predict-flops``), the report gives
    the fitted law's compute-optimal N, D and loss there, near the true law's, in its files and on the frontier."""
    report = scaling_report(ladder(), tmp_path, predict_flops=PREDICT_FLOPS)

    fits = json.loads((tmp_path / "scaling.json").read_text())
    law = fits["parametric"]
    assert law["E"] == pytest.approx(LAW["E"], rel=0.1)
    assert law["alpha"] == pytest.approx(LAW["alpha"], abs=0.05)
    assert law["beta"] == pytest.approx(LAW["beta"], abs=0.05)
    exponent = LAW["beta"] / (LAW["alpha"] + LAW["beta"])  # N_opt ∝ C^a
    assert law["a"] == pytest.approx(exponent, abs=0.05)
    assert fits["isoflop"]["a"] == pytest.approx(exponent, abs=0.05)
    assert len(fits["isoflop"]["budgets"]) == len(BUDGETS) and len(fits["points"]) == len(SIZES) * len(BUDGETS)
    text = (tmp_path / "scaling.txt").read_text()
    assert "Approach 3 (parametric, 12 runs" in text and "Approach 2 (iso-FLOP profiles, 3 budgets)" in text
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0
    assert report.files == FILES
    assert set(report.metrics()) == {f"scaling.{k}" for k in ("E", "A", "B", "alpha", "beta", "a", "b")}
    assert report.metrics()["scaling.alpha"] == law["alpha"]
    predict = fits["predict"]
    assert predict == report.parametric.allocation(PREDICT_FLOPS).to_dict()
    g = (LAW["alpha"] * LAW["A"] / (LAW["beta"] * LAW["B"])) ** (1 / (LAW["alpha"] + LAW["beta"]))
    true_params = g * (PREDICT_FLOPS / 6) ** exponent  # Hoffmann et al.'s eq. 4 on the true law
    assert predict["params"] == pytest.approx(true_params, rel=0.5)  # 30x beyond the largest budget
    assert predict["loss"] == pytest.approx(law_loss(true_params, PREDICT_FLOPS / (6 * true_params)), rel=0.02)
    assert f"at C = {PREDICT_FLOPS:.3g} FLOPs: N_opt = {predict['params']:.3g} params" in text


def test_a_sweep_without_flop_budgets_has_no_scaling_report(tmp_path):
    results = ladder()
    for r in results:
        del r.params["train.flops_budget"]
    assert scaling_report(results, tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_a_fit_that_cannot_be_made_is_said_and_the_rest_is_written(tmp_path):
    """Three trials cannot give a five-parameter law nor two budgets' parabolas: both fits say why, the plots are
    still drawn, and a failed trial (no loss) does not make the sweep less of a ladder."""
    failed = TrialResult(name="failed", run_id="x", status="failed", params={})
    report = scaling_report([*ladder(sizes=SIZES[:3], budgets=BUDGETS[:1]), failed], tmp_path)

    assert report.parametric is None and report.isoflop is None and report.metrics() == {}
    text = (tmp_path / "scaling.txt").read_text()
    assert "Approach 3 (parametric): not fitted: the parametric fit needs at least 5 points" in text
    assert "Approach 2 (iso-FLOP profiles): not fitted: the iso-FLOP fit needs 2 FLOP budgets" in text
    fits = json.loads((tmp_path / "scaling.json").read_text())
    assert fits["parametric"].startswith("the parametric fit needs at least 5 points")
    assert fits["isoflop"].startswith("the iso-FLOP fit needs 2 FLOP budgets")
    for name in FILES:
        assert (tmp_path / name).stat().st_size > 0


def test_the_sweep_report_logs_a_ladders_fit_to_its_parent_run(tmp_path):
    """write_report reads params_total from each trial's run, saves and logs the scaling files under "report", and
    logs the law's parameters as the parent run's scaling.* metrics."""
    from mlflow.entities import Metric

    from orchestrator.report import write_report
    from orchestrator.tracking import SweepTracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = SweepTracker(uri, "ladder")
    parent = tracker.parent_run("sweep1", params={}, tags={})
    for trial in ladder():
        grid = {f"grid.{k}": v for k, v in trial.params.items()}
        run_id = tracker.child_run(parent, "sweep1", trial.name, params=grid, tags={})
        values = {
            "val_loss": trial.final_val_loss,
            "tokens_seen": trial.tokens_seen,
            "params_total": trial.params_total,
        }
        tracker.client.log_batch(run_id, metrics=[Metric(k, v, 0, 10) for k, v in values.items()])
        tracker.finish(run_id, "finished")

    report = write_report(uri, "ladder", out_dir=tmp_path / "report")

    assert all((tmp_path / "report" / name).exists() for name in FILES)
    logged = {a.path for a in tracker.client.list_artifacts(parent, "report")}
    assert {f"report/{name}" for name in FILES} <= logged
    metrics = tracker.client.get_run(parent).data.metrics
    assert metrics["scaling.alpha"] == pytest.approx(report["scaling"].parametric.alpha)
    assert {f"scaling.{k}" for k in ("E", "A", "B", "alpha", "beta", "a", "b")} <= set(metrics)


def test_predict_flops_needs_a_ladder_and_a_positive_budget(tmp_path, capsys):
    """``report --predict-flops`` on a sweep that is no ladder, or with a budget that is no positive number: one
    error line each, exit 2."""
    from mlflow.entities import Metric

    from orchestrator.cli import main
    from orchestrator.tracking import SweepTracker

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = SweepTracker(uri, "grid")
    parent = tracker.parent_run("sweep1", params={}, tags={})
    run_id = tracker.child_run(parent, "sweep1", "000_lr=0.001", params={"grid.train.lr": "0.001"}, tags={})
    tracker.client.log_batch(run_id, metrics=[Metric("val_loss", 5.0, 0, 10)])
    tracker.finish(run_id, "finished")
    capsys.readouterr()  # MLflow's lines on creating its tables
    refusals = (("-1", "--predict-flops -1.0 is not a positive FLOP count"), ("1e21", "not a scaling ladder"))
    for value, needle in refusals:
        assert main(["report", "grid", "--tracking-uri", uri, "--predict-flops", value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: ") and needle in err, err
