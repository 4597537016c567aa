"""Scaling-law fits (`orchestrator.scaling_law`) and the ``scaling-fit`` verb: laws recovered from points generated
by a known one, budgets without a minimum refused, bad CSVs refused in one line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from orchestrator.cli import main
from orchestrator.scaling_law import Points, ScalingFitError, fit_isoflop, fit_parametric

# Hoffmann et al. 2022's fitted law (their Approach 3)
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
TRUE_A = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])  # N_opt ∝ C^a
TRUE_B = CHINCHILLA["alpha"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])  # D_opt ∝ C^b
# Hoffmann et al.'s eq. 4: N_opt(C) = G (C / 6)^a
TRUE_G = (CHINCHILLA["alpha"] * CHINCHILLA["A"] / (CHINCHILLA["beta"] * CHINCHILLA["B"])) ** (1 / 0.62)
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def chinchilla(params: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    law = CHINCHILLA
    return law["E"] + law["A"] / params ** law["alpha"] + law["B"] / tokens ** law["beta"]


def noisy(loss: np.ndarray, noise: float, seed: int = 0) -> np.ndarray:
    """``loss`` times log-normal noise of relative size ``noise``."""
    return loss * np.exp(np.random.default_rng(seed).normal(0, noise, loss.shape))


@pytest.fixture(scope="module")
def grid_points() -> Points:
    """5 model sizes x 5 token counts, 1 % noise."""
    params, tokens = (m.ravel() for m in np.meshgrid(np.geomspace(1e7, 1e9, 5), np.geomspace(1e8, 1e11, 5)))
    return Points(params, tokens, noisy(chinchilla(params, tokens), 0.01))


@pytest.fixture(scope="module")
def grid_fit(grid_points):
    return fit_parametric(grid_points)


def isoflop_points(budgets=BUDGETS, noise: float = 0.001) -> Points:
    """7 model sizes per budget around the law's N_opt(C), each trained on D = C / (6 N) tokens (whole tokens)."""
    params, tokens = [], []
    for flops in budgets:
        sizes = np.round(TRUE_G * (flops / 6) ** TRUE_A * np.geomspace(1 / 4, 4, 7))
        params += list(sizes)
        tokens += list(np.round(flops / (6 * sizes)))
    params, tokens = np.array(params), np.array(tokens)
    return Points(params, tokens, noisy(chinchilla(params, tokens), noise))


def test_parametric_fit_recovers_a_known_law_within_its_intervals(grid_fit):
    for name, true in CHINCHILLA.items():
        low, high = grid_fit.intervals[name]
        assert low <= true <= high, (name, true, grid_fit.intervals[name], getattr(grid_fit, name))
    assert grid_fit.points == 25 and grid_fit.resamples > 50


def test_parametric_allocation_exponents_are_close_to_the_laws(grid_fit):
    assert grid_fit.a == pytest.approx(TRUE_A, abs=0.03) and grid_fit.b == pytest.approx(TRUE_B, abs=0.03)
    assert grid_fit.a + grid_fit.b == pytest.approx(1)
    low, high = grid_fit.intervals["a"]
    assert low <= TRUE_A <= high


def test_allocation_spends_the_budget_where_the_fitted_law_is_lowest(grid_fit):
    best = grid_fit.allocation(1e21)
    assert 6 * best.params * best.tokens == pytest.approx(1e21)
    assert best.loss == pytest.approx(grid_fit.loss(best.params, best.tokens))
    for factor in (0.8, 1.25):  # the same budget split otherwise costs loss
        params = best.params * factor
        assert grid_fit.loss(params, 1e21 / (6 * params)) > best.loss


def test_isoflop_recovers_the_allocation_exponents():
    fit = fit_isoflop(isoflop_points())
    assert [budget.flops for budget in fit.budgets] == pytest.approx(BUDGETS, rel=0.01)  # grouped by 6 N D
    assert fit.a == pytest.approx(TRUE_A, abs=0.02) and fit.b == pytest.approx(TRUE_B, abs=0.02)
    assert fit.refused == ()


def test_isoflop_groups_points_by_their_flops_column():
    points = isoflop_points()
    fit = fit_isoflop(Points(points.params, points.tokens, points.loss, flops=np.repeat(BUDGETS, 7)))
    assert [budget.flops for budget in fit.budgets] == list(BUDGETS) and all(b.points == 7 for b in fit.budgets)


def profile(flops: float, losses: list[float]) -> Points:
    sizes = np.array([1e7, 2e7, 4e7])
    return Points(sizes, flops / (6 * sizes), np.array(losses))


def join(*points: Points) -> Points:
    return Points(*(np.concatenate([getattr(p, name) for p in points]) for name in ("params", "tokens", "loss")))


@pytest.mark.parametrize(
    ("losses", "reason"),
    [([3.0, 3.2, 3.0], "opens downward"), ([3.6, 3.2, 3.0], "lies outside its model sizes 1e+07..4e+07")],
)
def test_isoflop_refuses_a_budget_without_a_minimum_inside_its_sizes(losses, reason):
    good = isoflop_points(BUDGETS[1:3])
    fit = fit_isoflop(join(good, profile(1e17, losses)))
    assert len(fit.budgets) == 2 and len(fit.refused) == 1
    assert fit.refused[0].startswith("budget 1e+17 FLOPs") and reason in fit.refused[0]
    with pytest.raises(ScalingFitError, match=f"there are 1 .*{re.escape(reason)}"):
        fit_isoflop(join(isoflop_points(BUDGETS[:1]), profile(1e17, losses)))


def test_parametric_fit_refuses_fewer_than_five_points():
    params = np.array([1e7, 1e8, 1e9, 1e7])
    tokens = np.array([1e9, 1e9, 1e10, 1e10])
    with pytest.raises(ScalingFitError, match=r"needs at least 5 points .* there are 4"):
        fit_parametric(Points(params, tokens, chinchilla(params, tokens)))


def write_csv(path, points: Points) -> str:
    runs = zip(points.params, points.tokens, points.loss, strict=True)
    path.write_text("params,tokens,loss\n" + "".join(f"{n:.0f},{d:.0f},{loss:.6f}\n" for n, d, loss in runs))
    return str(path)


def test_cli_prints_one_json_object_with_both_fits_and_the_prediction(tmp_path, capsys):
    csv = write_csv(tmp_path / "runs.csv", isoflop_points())
    assert main(["scaling-fit", csv, "--json", "--predict-flops", "1e22"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert {"E", "A", "B", "alpha", "beta", "a", "b", "intervals", "isoflop", "predict"} <= set(answer)
    assert all(isinstance(answer[name], float) for name in ("E", "A", "B", "alpha", "beta", "a", "b"))
    assert set(answer["intervals"]) == {"E", "A", "B", "alpha", "beta", "a", "b"}
    assert answer["isoflop"]["a"] == pytest.approx(TRUE_A, abs=0.02)
    predict = answer["predict"]
    assert 6 * predict["params"] * predict["tokens"] == pytest.approx(1e22) and predict["flops"] == 1e22


def test_cli_prints_the_law_and_why_approach_2_is_not_fitted(tmp_path, capsys, grid_points):
    csv = write_csv(tmp_path / "runs.csv", grid_points)
    assert main(["scaling-fit", csv]) == 0
    out = capsys.readouterr().out
    assert "L(N, D) = E + A / N^alpha + B / D^beta" in out and "N_opt ∝ C^" in out
    assert "Approach 2 (iso-FLOP profiles): not fitted: the iso-FLOP fit needs 2 FLOP budgets" in out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("params,tokens\n1e7,1e9\n", "has no loss column (it has params, tokens)"),
        ("params,tokens,loss\n1e7,1e9,-3.0\n", "line 2: loss is -3.0, not a positive number"),
        ("params,tokens,loss\n1e7,lots,3.0\n", "line 2: tokens is 'lots', not a number"),
        (
            "params,tokens,loss\n1e7,1e9,3.0\n1e8,1e9,2.9\n",
            "needs at least 5 points (params, tokens, loss), there are 2;",
        ),
        ("", "is empty"),
    ],
)
def test_cli_refuses_a_bad_csv_in_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "runs.csv"
    path.write_text(text)
    assert main(["scaling-fit", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err, captured.err


def test_cli_refuses_a_missing_csv(tmp_path, capsys):
    assert main(["scaling-fit", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err and "No such file or directory" in err
