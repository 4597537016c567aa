"""The ``scaling-fit`` verb: a CSV of runs (params, tokens, loss) in, their scaling-law fits out as text or JSON.

The fits themselves are `orchestrator.scaling_law`'s; this module reads and checks the CSV and writes the answer.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np

from orchestrator.scaling_law import (
    Allocation,
    IsoFlopFit,
    ParametricFit,
    Points,
    ScalingFitError,
    fit_isoflop,
    fit_parametric,
)

COLUMNS = ("params", "tokens", "loss")
FLOPS = "flops"  # optional: the FLOP budget each run belongs to (Approach 2), else 6 N D
HEADER = "its first line must name the columns params,tokens,loss (and optionally flops)"


def scaling_fit(path: str, *, as_json: bool = False, predict_flops: float | None = None) -> str:
    """What ``python -m orchestrator scaling-fit`` prints for the CSV at ``path``."""
    if predict_flops is not None and not (math.isfinite(predict_flops) and predict_flops > 0):
        raise ScalingFitError(f"--predict-flops {predict_flops} is not a positive FLOP count; pass e.g. 1e21")
    points = read_points(path)
    fit = fit_parametric(points)
    try:
        isoflop, why_not = fit_isoflop(points), ""
    except ScalingFitError as exc:
        isoflop, why_not = None, str(exc)
    predict = fit.allocation(predict_flops) if predict_flops is not None else None
    if as_json:
        answer = {**fit.to_dict(), "isoflop": isoflop.to_dict() if isoflop else None}
        return json.dumps(answer | ({"predict": predict.to_dict()} if predict else {}))
    return describe(fit, isoflop, why_not, predict)


def read_points(path: str) -> Points:
    """The runs of the CSV at ``path``; a ScalingFitError naming the file, line and column of anything wrong."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as exc:
        raise ScalingFitError(f"cannot read {path}: {exc.strerror}; pass a CSV file of runs, {HEADER}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ScalingFitError(f"{path} is not a CSV text file ({exc}); {HEADER}") from exc
    if not rows:
        raise ScalingFitError(f"{path} is empty; {HEADER}")
    header = [name.strip() for name in rows[0]]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        raise ScalingFitError(f"{path} has no {' or '.join(missing)} column (it has {', '.join(header)}); {HEADER}")
    names = [*COLUMNS, FLOPS] if FLOPS in header else list(COLUMNS)
    values: dict[str, list[float]] = {name: [] for name in names}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        for name in names:
            values[name].append(_positive(row, header.index(name), f"{path} line {line}: {name}"))
    return Points(*(np.array(values[name]) for name in names))


def _positive(row: list[str], column: int, where: str) -> float:
    cell = row[column].strip() if column < len(row) else ""
    try:
        value = float(cell)
    except ValueError:
        raise ScalingFitError(f"{where} is {cell!r}, not a number; every value must be a positive number") from None
    if not (math.isfinite(value) and value > 0):
        raise ScalingFitError(f"{where} is {cell}, not a positive number; every value must be a positive number")
    return value


def describe(fit: ParametricFit | str, isoflop: IsoFlopFit | None, why_not: str, predict: Allocation | None) -> str:
    """The fits as text: the law with its intervals, the allocation exponents, the prediction, Approach 2. A fit
    that could not be made is given as the reason why (``fit``, ``why_not``)."""
    if isinstance(fit, str):
        lines = [f"Approach 3 (parametric): not fitted: {fit}"]
    else:
        lines = _describe_parametric(fit, predict)
    if isoflop:
        lines.append(
            f"Approach 2 (iso-FLOP profiles, {len(isoflop.budgets)} budgets): N_opt ∝ C^{isoflop.a:.3f}, "
            f"D_opt ∝ C^{isoflop.b:.3f}"
        )
        lines += [f"  refused {reason}" for reason in isoflop.refused]
    else:
        lines.append(f"Approach 2 (iso-FLOP profiles): not fitted: {why_not}")
    return "\n".join(lines)


def _describe_parametric(fit: ParametricFit, predict: Allocation | None) -> list[str]:
    percent = f"{100 * fit.level:g} %"
    lines = [
        f"Approach 3 (parametric, {fit.points} runs; {percent} bootstrap intervals from {fit.resamples} resamples):",
        "  L(N, D) = E + A / N^alpha + B / D^beta",
        *(f"  {name:<5} = {getattr(fit, name):<10.4g} [{_interval(fit, name)}]" for name in ("E", "A", "B")),
        *(f"  {name:<5} = {getattr(fit, name):<10.4f} [{_interval(fit, name)}]" for name in ("alpha", "beta")),
        f"  compute-optimal for C = 6 N D: N_opt ∝ C^{fit.a:.3f} [{_interval(fit, 'a')}], "
        f"D_opt ∝ C^{fit.b:.3f} [{_interval(fit, 'b')}]",
    ]
    if predict:
        lines.append(
            f"  at C = {predict.flops:.3g} FLOPs: N_opt = {predict.params:.3g} params, "
            f"D_opt = {predict.tokens:.3g} tokens, predicted loss {predict.loss:.4f}"
        )
    return lines


def _interval(fit: ParametricFit, name: str) -> str:
    low, high = fit.intervals[name]
    return f"{low:.4g}, {high:.4g}"
