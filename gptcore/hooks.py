"""How the training loop talks to the outside: what hooks may read, the hook interface, and the stock hooks.

`train(config, hooks)` calls every hook on every rank; the stock ones print progress (`PrintProgress`) and keep
local checkpoint folders (`LocalCheckpoints`). The orchestrator plugs in its Ray reports and MLflow logging alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptcore.checkpoint_format import TrainState
from gptcore.checkpointing import CheckpointSaver
from gptcore.config import JobConfig
from gptcore.model import GPT


@dataclass
class TrainContext:
    """What hooks may read: the job, the (unwrapped) model, sizes and the run's identity."""

    config: JobConfig
    model: GPT
    device: torch.device
    rank: int
    world_size: int
    train_windows: int
    val_windows: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    dtype: torch.dtype | None
    resumed_from: str | None = None
    init_report: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def epochs_done(self, state: TrainState) -> float:
        """Fractional epochs completed, e.g. 1.5 halfway through the second epoch."""
        return state.epoch + state.samples_in_epoch / (
            self.batches_per_epoch * self.config.train.batch_size * self.world_size
        )


@dataclass
class TrainResult:
    status: str  # "finished" or "diverged"
    state: TrainState
    metrics: dict[str, float]  # last evaluation
    wall_time: float
    tokens_per_sec: float


class Hooks:
    """Callbacks of `train`; every method is optional. Called on every rank."""

    def on_train_start(self, ctx: TrainContext, state: TrainState) -> None: ...

    def on_step(self, ctx: TrainContext, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_eval(
        self,
        ctx: TrainContext,
        state: TrainState,
        metrics: dict[str, float],
        sample: str | None,
        save: CheckpointSaver | None,
    ) -> None:
        """After an evaluation. ``save`` is given at checkpoint points: ``save(dir)`` writes a checkpoint,
        ``save.start(dir)`` writes it in the background (`train` returns once it is on disk)."""

    def on_train_end(self, ctx: TrainContext, state: TrainState, result: TrainResult) -> None: ...

    def wants_checkpoint(self, ctx: TrainContext, state: TrainState) -> bool:
        """Whether a checkpoint must be taken now, after step ``state.step``, though none is due (e.g. the node is
        about to be reclaimed): then this step is evaluated and checkpointed. Asked after every step, on every rank;
        every rank must answer the same."""
        return False


class HookList(Hooks):
    def __init__(self, *hooks: Hooks):
        self.hooks = [h for h in hooks if h is not None]

    def on_train_start(self, ctx, state):
        for h in self.hooks:
            h.on_train_start(ctx, state)

    def on_step(self, ctx, state, metrics):
        for h in self.hooks:
            h.on_step(ctx, state, metrics)

    def on_eval(self, ctx, state, metrics, sample, save):
        for h in self.hooks:
            h.on_eval(ctx, state, metrics, sample, save)

    def on_train_end(self, ctx, state, result):
        for h in self.hooks:
            h.on_train_end(ctx, state, result)

    def wants_checkpoint(self, ctx, state):
        # every hook is asked, whatever the others answer: one may be a collective that every rank must enter
        return any([h.wants_checkpoint(ctx, state) for h in self.hooks])


class LocalCheckpoints(Hooks):
    """Keep ``latest/`` and ``best/`` checkpoint folders under ``directory`` (rank 0; every rank when sharded)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def on_eval(self, ctx, state, metrics, sample, save):
        if save is None or not (ctx.is_main or save.sharded):
            return
        save(self.directory / "latest")
        if metrics.get("val_loss", math.inf) <= state.best_val_loss:
            save(self.directory / "best")


class PrintProgress(Hooks):
    """One console line per evaluation (rank 0)."""

    def on_eval(self, ctx, state, metrics, sample, save):
        if not ctx.is_main:
            return
        print(
            f"epoch {ctx.epochs_done(state):.2f} step {state.step}/{ctx.total_steps}: "
            f"train {metrics['train_loss']:.3f} val {metrics['val_loss']:.3f} | "
            f"{metrics.get('tokens_per_sec', 0):.0f} tok/s",
            flush=True,
        )
        if sample is not None:
            print(f"  sample: {sample!r}", flush=True)
