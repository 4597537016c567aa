"""Scaling-law fits to (params, tokens, loss) points, and the compute-optimal allocation they give (Chinchilla).

Hoffmann et al. 2022, section 3. Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta to every point; Approach 2
fits a parabola of loss vs log N to each FLOP budget C and a power law N_opt ∝ C^a through the parabolas' minima.
Both say how a budget C = 6 N D is best split between model size N and training tokens D. numpy and scipy only;
the ``scaling-fit`` verb (`orchestrator.scaling_fit`) reads the points from a CSV and prints the fits.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize

MIN_POINTS = 5  # the law has five parameters
MIN_SIZES = 3  # distinct model sizes a budget needs for a parabola with a minimum to mean anything
MIN_BUDGETS = 2  # budgets a power law through their minima needs
HUBER_DELTA = 1e-3  # Hoffmann et al.'s: residuals of log loss beyond it count linearly, so outliers pull less
BUDGET_RTOL = 0.05  # points whose 6 N D agree within this relative tolerance share a FLOP budget
# Hoffmann et al.'s starting points for (a, b, e, alpha, beta): the objective has several local minima
START_GRID = np.array(
    list(
        itertools.product(
            np.arange(0.0, 30.0, 5.0),  # a = log A
            np.arange(0.0, 30.0, 5.0),  # b = log B
            np.arange(-1.0, 1.5, 0.5),  # e = log E
            np.arange(0.0, 2.5, 0.5),  # alpha
            np.arange(0.0, 2.5, 0.5),  # beta
        )
    )
)
# L-BFGS runs from the grid points whose objective is lowest (the whole grid is scored at once), not from every one:
# a CPU-only fit, bootstrap included, takes seconds
FIT_STARTS = 16
BOOTSTRAP_STARTS = 2  # a resample's grid points L-BFGS may also run from (_bootstrap)
PARAMETERS = ("E", "A", "B", "alpha", "beta")


class ScalingFitError(ValueError):
    """The points cannot give a scaling law; the message says why and what to add or fix."""


@dataclass
class Points:
    """Runs of a ladder: parameters N, training tokens D, final loss, and optionally the FLOP budget each belongs to."""

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray | None = None

    def __post_init__(self) -> None:
        columns = {"params": self.params, "tokens": self.tokens, "loss": self.loss}
        if self.flops is not None:
            columns["flops"] = self.flops
        for name, values in columns.items():
            values = np.asarray(values, dtype=float)
            if values.ndim != 1 or len(values) != len(columns["params"]):
                raise ScalingFitError(f"{name}: one value per point needed ({len(columns['params'])} points)")
            if not np.all(np.isfinite(values) & (values > 0)):
                raise ScalingFitError(f"every {name} value must be a positive number")
            setattr(self, name, values)

    def __len__(self) -> int:
        return len(self.params)


# --------------------------------------------------------------------------- Approach 3: the parametric law


@dataclass(frozen=True)
class Allocation:
    """The compute-optimal model size and token count for a FLOP budget, and the loss the law predicts there."""

    flops: float
    params: float
    tokens: float
    loss: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap intervals for its parameters and exponents."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    intervals: dict[str, tuple[float, float]]  # parameter, "a" or "b" -> (low, high) percentiles of the resamples
    level: float  # the intervals' coverage, e.g. 0.9 for the 5th and 95th percentiles
    resamples: int  # bootstrap refits the intervals come from
    points: int

    @property
    def a(self) -> float:
        """N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def loss(self, params: float, tokens: float) -> float:
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def allocation(self, flops: float) -> Allocation:
        """Hoffmann et al.'s eq. 4: the N and D = C / (6 N) that minimise the law's loss at C FLOPs."""
        if not flops > 0:
            raise ScalingFitError(f"a FLOP budget must be a positive number, not {flops}")
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        params, tokens = g * (flops / 6) ** self.a, (flops / 6) ** self.b / g
        return Allocation(flops=flops, params=params, tokens=tokens, loss=self.loss(params, tokens))

    def to_dict(self) -> dict:
        values = {name: getattr(self, name) for name in (*PARAMETERS, "a", "b")}
        intervals = {name: list(bounds) for name, bounds in self.intervals.items()}
        return {
            **values,
            "intervals": intervals,
            "level": self.level,
            "resamples": self.resamples,
            "points": self.points,
        }


def fit_parametric(points: Points, *, resamples: int = 100, level: float = 0.9, seed: int = 0) -> ParametricFit:
    """Approach 3 as Hoffmann et al. fitted it: log L = LSE(a - alpha log N, b - beta log D, e) with A = exp(a),
    B = exp(b), E = exp(e), a Huber loss on the log residuals, L-BFGS from a grid of starts; intervals from refits
    to ``resamples`` resamples of the points (drawn with replacement, seeded)."""
    if len(points) < MIN_POINTS:
        raise ScalingFitError(
            f"the parametric fit needs at least {MIN_POINTS} points (params, tokens, loss), there are {len(points)}; "
            "add runs of more model sizes and token counts"
        )
    data = np.log(points.params), np.log(points.tokens), np.log(points.loss)
    best, _, message = _best_fit(data, _lowest_starts(data, FIT_STARTS)[0])
    if best is None:
        raise ScalingFitError(
            f"the parametric fit did not converge from any of its {FIT_STARTS} starting points (L-BFGS: {message}); "
            "check that loss falls as params and tokens grow"
        )
    law = dict(zip(PARAMETERS, _natural(best), strict=True))
    if not (law["alpha"] > 0 and law["beta"] > 0):
        raise ScalingFitError(
            f"the fitted law has alpha = {law['alpha']:.3g} and beta = {law['beta']:.3g}: loss does not fall with "
            "both model size and tokens, so no budget has a best split; check the points or add runs that vary both"
        )
    samples = _bootstrap(data, best, resamples, np.random.default_rng(seed))
    intervals = _intervals(samples, level)
    return ParametricFit(**law, intervals=intervals, level=level, resamples=len(samples), points=len(points))


def _natural(theta: np.ndarray) -> tuple[float, float, float, float, float]:
    """(E, A, B, alpha, beta) from the fitted (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = (float(v) for v in theta)
    return float(np.exp(e)), float(np.exp(a)), float(np.exp(b)), alpha, beta


def _log_law(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """log L at every point for parameters ``theta`` = (a, b, e, alpha, beta) of shape (..., 5), shape
    (..., points), and the share of L of each of its three terms (the log-sum-exp's gradient)."""
    a, b, e, alpha, beta = np.moveaxis(theta, -1, 0)[..., None]
    terms = (a - alpha * log_n, b - beta * log_d, e)
    top = np.maximum(np.maximum(terms[0], terms[1]), e)
    weights = [np.exp(term - top) for term in terms]
    total = weights[0] + weights[1] + weights[2]
    return top + np.log(total), [weight / total for weight in weights]


def _huber(residuals: np.ndarray) -> np.ndarray:
    """Hoffmann et al.'s Huber loss divided by delta²: the same minimiser, at a scale where L-BFGS's stopping
    tolerances (absolute for an objective below 1) do not stop it on the first plateau."""
    size = np.abs(residuals) / HUBER_DELTA
    return np.where(size <= 1, 0.5 * size**2, size - 0.5)


def _objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray
) -> tuple[float, np.ndarray]:
    """The summed Huber loss of the log residuals and its gradient in (a, b, e, alpha, beta)."""
    predicted, shares = _log_law(theta, log_n, log_d)
    residuals = predicted - log_loss
    slope = np.clip(residuals / HUBER_DELTA, -1, 1) / HUBER_DELTA  # the derivative of _huber
    n_term, d_term, e_term = (slope * share for share in shares)
    gradient = np.array([n_term.sum(), d_term.sum(), e_term.sum(), -n_term @ log_n, -d_term @ log_d])
    return float(_huber(residuals).sum()), gradient


def _lowest_starts(data: tuple[np.ndarray, ...], count: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` points of the start grid with the lowest objective, best first, and their objective."""
    log_n, log_d, log_loss = data
    predicted, _ = _log_law(START_GRID, log_n, log_d)
    scores = _huber(predicted - log_loss).sum(axis=-1)
    lowest = np.argsort(scores, kind="stable")[:count]
    return START_GRID[lowest], scores[lowest]


def _best_fit(data: tuple[np.ndarray, ...], starts: np.ndarray) -> tuple[np.ndarray | None, float, str]:
    """The lowest minimum L-BFGS converges to from ``starts`` and its objective (None and inf if it converges from
    none), and the last failure's message."""
    best, best_loss, message = None, np.inf, ""
    with np.errstate(over="ignore", invalid="ignore"):
        for start in starts:
            result = minimize(_objective, start, args=data, jac=True, method="L-BFGS-B")
            if result.success and np.all(np.isfinite(result.x)) and result.fun < best_loss:
                best, best_loss = result.x, float(result.fun)
            elif not result.success:
                message = str(result.message)
    return best, best_loss, message


def _bootstrap(data: tuple[np.ndarray, ...], best: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Refits to ``resamples`` resamples of the points; one (E, A, B, alpha, beta) row per refit that converged.

    A refit starts from the fit on all the points. A resample can move the optimum to another basin, so the
    resample's lowest grid points whose objective is already below that refit's minimum are starts too."""
    count = len(data[0])
    samples = []
    for _ in range(resamples):
        chosen = rng.integers(0, count, count)
        resample = tuple(column[chosen] for column in data)
        refit, loss, _ = _best_fit(resample, best[None])
        starts, scores = _lowest_starts(resample, BOOTSTRAP_STARTS)
        if np.any(scores < loss):
            other, other_loss, _ = _best_fit(resample, starts[scores < loss])
            refit = other if other_loss < loss else refit
        if refit is not None:
            samples.append(_natural(refit))
    if len(samples) < resamples / 2:
        raise ScalingFitError(
            f"the bootstrap refits converged on only {len(samples)} of {resamples} resamples: the points do not pin "
            "the law down; add runs that spread over more model sizes and token counts"
        )
    return np.array(samples).reshape(-1, len(PARAMETERS))


def _intervals(samples: np.ndarray, level: float) -> dict[str, tuple[float, float]]:
    """Percentile intervals of each parameter and of the allocation exponents a and b over the bootstrap refits."""
    alpha, beta = samples[:, 3], samples[:, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        columns = [*samples.T, beta / (alpha + beta), alpha / (alpha + beta)]
    tails = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    intervals = {}
    for name, values in zip((*PARAMETERS, "a", "b"), columns, strict=True):
        low, high = np.percentile(values[np.isfinite(values)], tails)
        intervals[name] = (float(low), float(high))
    return intervals


# --------------------------------------------------------------------------- Approach 2: iso-FLOP profiles


@dataclass(frozen=True)
class Budget:
    """One FLOP budget's profile: its points and the minimum of the parabola of loss vs log N through them."""

    flops: float
    points: int
    params: float  # N_opt: where the parabola is lowest
    tokens: float  # D_opt = C / (6 N_opt)
    loss: float  # the parabola's minimum


@dataclass(frozen=True)
class IsoFlopFit:
    """N_opt ∝ C^a and D_opt ∝ C^b through the minima of the budgets' profiles."""

    a: float
    b: float
    budgets: tuple[Budget, ...]
    refused: tuple[str, ...]  # budgets with enough sizes whose profile has no minimum inside its N range, and why

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "budgets": [asdict(b) for b in self.budgets], "refused": list(self.refused)}


def fit_isoflop(points: Points, *, rtol: float = BUDGET_RTOL) -> IsoFlopFit:
    """Approach 2: points grouped by FLOP budget (their ``flops``, else 6 N D within ``rtol``); each budget with
    at least 3 model sizes gives N_opt(C), the minimum of a parabola of loss vs log N; then log N_opt = a log C + k
    and log D_opt = b log C + k' across the budgets."""
    groups = _budgets(points, rtol)
    profiles = [_profile(flops, points.params[members], points.loss[members]) for flops, members in groups]
    fitted = [p for p in profiles if isinstance(p, Budget)]
    refused = tuple(p for p in profiles if isinstance(p, str))
    if len(fitted) < MIN_BUDGETS:
        few = sum(p is None for p in profiles)
        why = "; ".join([f"{few} of {len(groups)} budgets have fewer than {MIN_SIZES} model sizes", *refused])
        raise ScalingFitError(
            f"the iso-FLOP fit needs {MIN_BUDGETS} FLOP budgets whose loss has a minimum over log N, there are "
            f"{len(fitted)} ({why}); train {MIN_SIZES} or more model sizes, with D = C / (6 N), at each of "
            f"{MIN_BUDGETS} or more budgets"
        )
    log_c = np.log([budget.flops for budget in fitted])
    a = np.polyfit(log_c, np.log([budget.params for budget in fitted]), 1)[0]
    b = np.polyfit(log_c, np.log([budget.tokens for budget in fitted]), 1)[0]
    return IsoFlopFit(a=float(a), b=float(b), budgets=tuple(fitted), refused=refused)


def _budgets(points: Points, rtol: float) -> list[tuple[float, np.ndarray]]:
    """(C, indices of its points) per FLOP budget, smallest first: the given ``flops`` as they are, else runs of
    6 N D (sorted) that stay within ``rtol`` of the run's first, at their geometric mean."""
    if points.flops is not None:
        return [(float(c), np.flatnonzero(points.flops == c)) for c in np.unique(points.flops)]
    flops = 6 * points.params * points.tokens
    order = np.argsort(flops, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and flops[i] <= flops[groups[-1][0]] * (1 + rtol):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
    return [(float(np.exp(np.log(flops[g]).mean())), np.array(g)) for g in groups]


def _profile(flops: float, params: np.ndarray, loss: np.ndarray) -> Budget | str | None:
    """The budget's minimum; else None for too few model sizes, or a sentence naming the budget and its fault."""
    if len(np.unique(params)) < MIN_SIZES:
        return None
    log_n = np.log(params)
    centre = log_n.mean()  # a better-conditioned fit
    curve, slope, level = np.polyfit(log_n - centre, loss, 2)
    if curve <= 0:
        return f"budget {flops:.3g} FLOPs: its parabola of loss vs log N opens downward (no minimum)"
    vertex = centre - slope / (2 * curve)
    if not log_n.min() <= vertex <= log_n.max():
        return (
            f"budget {flops:.3g} FLOPs: its parabola's minimum, N = {np.exp(vertex):.3g}, lies outside its model "
            f"sizes {params.min():.3g}..{params.max():.3g}"
        )
    n_opt = float(np.exp(vertex))
    return Budget(flops, len(params), n_opt, flops / (6 * n_opt), float(level - slope**2 / (4 * curve)))
