"""A scaling ladder's report: both scaling-law fits of its trials, as scaling.json, scaling.txt and two plots.

A sweep is a ladder when every finished trial has a ``train.flops_budget`` grid value. Each such trial is one point:
N = params_total, D = tokens_seen, loss = final val loss, and its budget C. The fits are `orchestrator.scaling_law`'s;
a fit the points cannot give is reported with its reason, and the rest of the report is still written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from orchestrator.results import TrialResult
from orchestrator.scaling_fit import describe
from orchestrator.scaling_law import (
    Allocation,
    IsoFlopFit,
    ParametricFit,
    Points,
    ScalingFitError,
    fit_isoflop,
    fit_parametric,
)

BUDGET_AXIS = "train.flops_budget"  # the grid axis that makes a sweep a ladder (result.params holds grid values)
METRIC_PREFIX = "scaling."  # the parent run's metrics of the Approach-3 law: scaling.E, scaling.alpha, ...
FILES = ("scaling.json", "scaling.txt", "loss_vs_params.png", "frontier.png")


@dataclass
class ScalingReport:
    """What a ladder's report wrote: its files, each fit or the reason it could not be made."""

    folder: Path
    trials: list[TrialResult]  # the finished trials that gave a point
    points: Points
    parametric: ParametricFit | None
    isoflop: IsoFlopFit | None
    why_not: dict[str, str] = field(default_factory=dict)  # "parametric" / "isoflop" -> why that fit was not made
    predict: Allocation | None = None  # the law's allocation for a FLOP budget the user named
    files: tuple[str, ...] = FILES

    def metrics(self) -> dict[str, float]:
        """The fitted law's parameters and allocation exponents, as the parent run logs them; empty without a fit."""
        if self.parametric is None:
            return {}
        names = ("E", "A", "B", "alpha", "beta", "a", "b")
        return {METRIC_PREFIX + name: float(getattr(self.parametric, name)) for name in names}


def is_ladder(results: list[TrialResult]) -> bool:
    """Whether the sweep is a scaling ladder: it has finished trials and every one has a FLOP budget grid value."""
    finished = [r for r in results if r.status == "finished"]
    return bool(finished) and all(BUDGET_AXIS in r.params for r in finished)


def scaling_report(
    results: list[TrialResult], folder: Path, predict_flops: float | None = None
) -> ScalingReport | None:
    """Fit the ladder's points both ways and write `FILES` to ``folder``; None (and no files) for another sweep.
    ``predict_flops``: also the compute-optimal N, D and the loss the fitted law predicts for that budget."""
    if not is_ladder(results):
        return None
    finished = [r for r in results if r.status == "finished"]
    trials = [r for r in finished if _point(r) is not None]
    points = Points(*np.array([_point(r) for r in trials], dtype=float).reshape(-1, 4).T)
    report = ScalingReport(folder, trials, points, *_fits(points))
    if predict_flops is not None and report.parametric:
        report.predict = report.parametric.allocation(predict_flops)
    left_out = [r.name for r in finished if _point(r) is None]
    (folder / "scaling.json").write_text(json.dumps(_as_json(report), indent=2) + "\n")
    (folder / "scaling.txt").write_text(_as_text(report, left_out) + "\n")
    plot_loss_vs_params(report, folder / "loss_vs_params.png")
    plot_frontier(report, folder / "frontier.png")
    return report


def _point(result: TrialResult) -> tuple[float, float, float, float] | None:
    """(N, D, loss, C) of a finished trial; None when one of them is missing or not a positive number."""
    try:
        budget = float(result.params[BUDGET_AXIS])
    except ValueError:
        return None
    values = (result.params_total, result.tokens_seen, result.final_val_loss, budget)
    return values if all(math.isfinite(v) and v > 0 for v in values) else None


def _fits(points: Points) -> tuple[ParametricFit | None, IsoFlopFit | None, dict[str, str]]:
    """Both approaches' fits to the points, None for each one that cannot be made, and why not."""
    fits: dict[str, ParametricFit | IsoFlopFit | None] = {}
    why_not = {}
    for name, fit in (("parametric", fit_parametric), ("isoflop", fit_isoflop)):
        try:
            fits[name] = fit(points)
        except ScalingFitError as exc:
            fits[name], why_not[name] = None, str(exc)
    return fits["parametric"], fits["isoflop"], why_not


def _as_json(report: ScalingReport) -> dict:
    """Each fit's ``to_dict()`` or the reason it was not made, and the points they were fitted to."""
    points = report.points
    rows = zip(report.trials, points.params, points.tokens, points.loss, points.flops, strict=True)
    return {
        "parametric": report.parametric.to_dict() if report.parametric else report.why_not["parametric"],
        "isoflop": report.isoflop.to_dict() if report.isoflop else report.why_not["isoflop"],
        **({"predict": report.predict.to_dict()} if report.predict else {}),
        "points": [{"trial": r.name, "params": n, "tokens": d, "loss": loss, "flops": c} for r, n, d, loss, c in rows],
    }


def _as_text(report: ScalingReport, left_out: list[str]) -> str:
    """The fits in words, as the ``scaling-fit`` verb prints them, after a line on the points."""
    budgets = len(np.unique(report.points.flops))
    lines = [f"Scaling ladder: {len(report.points)} points (finished trials), {budgets} FLOP budgets"]
    if left_out:
        lines.append(f"  left out (no params_total, tokens_seen or final val loss): {', '.join(left_out)}")
    fit = report.parametric or report.why_not["parametric"]
    return "\n".join([*lines, describe(fit, report.isoflop, report.why_not.get("isoflop", ""), report.predict)])


# --------------------------------------------------------------------------- plots


def plot_loss_vs_params(report: ScalingReport, path: Path) -> Path:
    """Final val loss against N (log x), one series per budget, each budget's parabola minimum marked (Approach 2)."""
    points = report.points
    minima = {budget.flops: budget for budget in report.isoflop.budgets} if report.isoflop else {}
    fig, ax = plt.subplots(figsize=(8, 5))
    for flops in np.unique(points.flops):
        members = np.flatnonzero(points.flops == flops)
        members = members[np.argsort(points.params[members])]
        (line,) = ax.plot(points.params[members], points.loss[members], marker="o", label=f"C = {flops:.3g} FLOPs")
        if budget := minima.get(float(flops)):
            ax.scatter([budget.params], [budget.loss], marker="*", s=160, color=line.get_color(), zorder=3)
    ax.set(xscale="log", xlabel="parameters N (log scale)", ylabel="final validation loss")
    ax.set_title("loss vs model size per FLOP budget" + ("; ★ = parabola minimum" if minima else ""))
    ax.grid(alpha=0.3)
    if len(points):
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_frontier(report: ScalingReport, path: Path) -> Path:
    """N_opt against C on log-log axes: Approach 2's per-budget minima and both approaches' fitted N_opt(C)."""
    budgets = np.unique(report.points.flops)
    if report.predict:  # the line reaches the budget asked about
        budgets = np.append(budgets, report.predict.flops)
    span = np.geomspace(budgets.min() / 2, budgets.max() * 2, 50) if len(budgets) else np.array([])
    fig, ax = plt.subplots(figsize=(8, 5))
    if report.isoflop:
        fitted = report.isoflop.budgets
        log_c, log_n = np.log([b.flops for b in fitted]), np.log([b.params for b in fitted])
        intercept = float(np.mean(log_n - report.isoflop.a * log_c))  # the least-squares line's, for its slope a
        ax.scatter(np.exp(log_c), np.exp(log_n), color="C0", zorder=3, label="Approach 2: parabola minima")
        line = np.exp(intercept + report.isoflop.a * np.log(span))
        ax.plot(span, line, color="C0", label=f"Approach 2: N_opt ∝ C^{report.isoflop.a:.3f}")
    if report.parametric:
        line = [report.parametric.allocation(float(c)).params for c in span]
        ax.plot(span, line, "--", color="C1", label=f"Approach 3: N_opt ∝ C^{report.parametric.a:.3f}")
    if report.predict:
        p = report.predict
        label = f"C = {p.flops:.3g}: N = {p.params:.3g}, D = {p.tokens:.3g}, loss {p.loss:.3f}"
        ax.scatter([p.flops], [p.params], marker="*", s=200, color="C3", zorder=4, label=label)
    ax.set(xscale="log", yscale="log", xlabel="FLOP budget C", ylabel="compute-optimal parameters N_opt")
    ax.set_title("compute-optimal model size" + ("" if report.isoflop or report.parametric else ": no fit"))
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
