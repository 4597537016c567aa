"""Comparing the loss curves of two trainings that are the same by construction but for the order of float sums.

Two ranks on half batches and one process on the whole batch, FSDP and DDP, a run resumed on another worker count:
the same weights see the same tokens, but their sums (the batch mean, an all-reduce, a matmul split differently)
round differently. The first step's losses then differ in their last bits only. Every later step adds the drift of
an update computed from gradients that differ in their last bits (AdamW's early updates are close to sign(g), so a
gradient near zero can flip), so the gap grows with the step, as a random walk: a fixed tolerance over a long
curve passes or fails by chance. A real difference (another batch, a gradient that is not averaged, a wrong resume
position) moves a step by 1e-3 or more within a step or two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Allowed gap between the two curves per step of training, from step 1: a 10.8 loss in fp32 is 1e-6 to the ulp;
# measured gaps (2 Ray Train workers x batch 4 against one process on batch 8, 54 steps) stay under 5e-6 x step.
DRIFT_PER_STEP = 2e-5

Curve = Sequence[float] | Mapping[int, float]


def by_step(curve: Curve, first_step: int = 1) -> dict[int, float]:
    """``{step: loss}``; a list is read as the losses of consecutive steps from ``first_step``."""
    if isinstance(curve, Mapping):
        return dict(curve)
    return {first_step + i: loss for i, loss in enumerate(curve)}


def assert_same_training(a: Curve, b: Curve, *, first_step: int = 1, per_step: float = DRIFT_PER_STEP) -> None:
    """The curves have the same steps, and at step s differ by at most ``per_step`` x s; the message names the first
    step that does not."""
    a, b = by_step(a, first_step), by_step(b, first_step)
    assert sorted(a) == sorted(b), f"different steps: {sorted(a)} vs {sorted(b)}"
    for step in sorted(a):
        gap = abs(a[step] - b[step])
        assert gap <= per_step * step, (
            f"step {step}: {a[step]!r} vs {b[step]!r}, a gap of {gap:.2e} > {per_step * step:.2e} allowed "
            f"({per_step:.0e} a step)\n{a}\n{b}"
        )


def max_gap(a: Curve, b: Curve) -> float:
    """The largest gap between two curves of the same steps."""
    a, b = by_step(a), by_step(b)
    return max(abs(a[s] - b[s]) for s in a)
