"""The training loop's one owner of checkpoints: when one is due, taking it in either layout, writing it, resuming.

The loop asks a `CheckpointManager` once per step whether an evaluation and a checkpoint are due; at a checkpoint
point it hands the hooks a `CheckpointSaver`, and the hooks say where the checkpoint goes (`LocalCheckpoints`: a
local folder; the orchestrator's Ray reporter: the trial's storage). What is saved, how, and how a run resumes from
it is the manager's alone.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

from gptcore.checkpoint import check_resumable, load_checkpoint, load_model_weights
from gptcore.checkpoint_format import CheckpointError, CheckpointParts, TrainState, is_sharded, read_meta
from gptcore.checkpoint_rng import gather_rng_states, restore_rng
from gptcore.checkpoint_sharded import load_sharded_into, save_sharded
from gptcore.checkpoint_whole import CheckpointWriter, Snapshot, take_snapshot, write_snapshot
from gptcore.config import JobConfig
from gptcore.parallel import is_sharded as is_sharded_model


class CheckpointSaver:
    """What hooks get at checkpoint points: ``save(dir)`` writes a checkpoint of the current state now;
    ``save.start(dir)`` copies the state to host memory and writes it in the background (a `Future` of the path).

    ``save.sharded``: the model is sharded (FSDP). Then saving is a collective: **every** rank calls ``save`` (or
    ``save.start``) at the same point, each with the same folder or one of its own (`save_sharded`), and each
    writes its own shards there; ``start`` writes them before it returns (a finished `Future`).
    """

    def __init__(
        self,
        take: Callable[[bool], Snapshot] | None,
        writer: CheckpointWriter,
        write_sharded: Callable[[Path], Path] | None = None,
    ):
        self._take, self._writer, self._write_sharded = take, writer, write_sharded
        self.sharded = write_sharded is not None

    def __call__(self, path: Path) -> Path:
        self._writer.wait()
        if self._write_sharded is not None:
            return self._write_sharded(path)
        return write_snapshot(self._take(False), path)

    def start(self, path: Path) -> Future[Path]:
        if self._write_sharded is not None:
            done: Future[Path] = Future()
            done.set_result(self(path))
            return done
        return self._writer.submit(lambda: self._take(True), path)


class CheckpointManager:
    """Checkpoints of one run: its model (as the loop calls it), optimizer and gradient scaler.

    Due every ``train.checkpoint_every`` steps; or, when that is 0, once an epoch at the first evaluation from the
    epoch's end on (no evaluation is added for it); and always at the last step, which is also evaluated.
    """

    def __init__(
        self,
        config: JobConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        device: torch.device,
    ):
        self.config, self.model, self.optimizer, self.scaler, self.device = config, model, optimizer, scaler, device
        self.eval_every, self.checkpoint_every = config.train.eval_every, config.train.checkpoint_every
        self.pending = False  # an epoch ended since the last checkpoint
        self.writer = CheckpointWriter()

    def after_step(self, step: int, *, epoch_end: bool, last: bool) -> tuple[bool, bool]:
        """(evaluate, checkpoint) after optimizer step ``step``."""
        eval_due = bool(self.eval_every) and step % self.eval_every == 0
        if self.checkpoint_every:
            checkpoint = step % self.checkpoint_every == 0
        else:
            self.pending = self.pending or epoch_end
            checkpoint = self.pending and (eval_due or not self.eval_every)
        checkpoint = checkpoint or last
        self.pending = self.pending and not checkpoint
        return eval_due or checkpoint, checkpoint

    def saver(self, state: TrainState) -> CheckpointSaver:
        """The saver of this checkpoint point, ``state`` as it is when a checkpoint is taken. A collective: every
        rank calls it at the same point (rank 0's checkpoint holds every rank's RNG state)."""
        rng_states = gather_rng_states(self.device)

        parts = CheckpointParts(self.model, self.config, state, self.optimizer, self.scaler, rng_states=rng_states)
        if is_sharded_model(self.model):
            return CheckpointSaver(None, self.writer, lambda path: save_sharded(path, parts))
        return CheckpointSaver(lambda copy: take_snapshot(parts, copy=copy), self.writer)

    def resume(self, path: str | Path | None, data_key: str, rank: int) -> TrainState | None:
        """Load a checkpoint's weights, optimizer, scaler and this rank's RNG state; its train state (None: no path).

        A sharded model (FSDP) reads its shards of a sharded checkpoint, written by any number of ranks; any other
        model reads a checkpoint of either layout whole.
        """
        if path is None:
            return None
        if is_sharded_model(self.model):
            if not is_sharded(read_meta(path)):
                raise CheckpointError(
                    f"cannot resume a train.parallel=fsdp run from {path}: it was written whole, by a "
                    "train.parallel=ddp run; resume it with train.parallel=ddp, or start from its weights with "
                    "train.init_from"
                )
            ckpt = load_checkpoint(path, with_weights=False)
            check_resumable(ckpt, self.config, data_key)
            load_sharded_into(path, self.model, self.optimizer)
        else:
            ckpt = load_checkpoint(path)
            check_resumable(ckpt, self.config, data_key)
            load_model_weights(self.model, ckpt.model_state, source=str(path))
            if ckpt.optimizer_state is not None:
                self.optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.scaler_state:
            self.scaler.load_state_dict(ckpt.scaler_state)
        restore_rng(ckpt.rng, rank=rank, seed=self.config.train.seed + rank)
        ckpt.state.data_key = data_key or ckpt.state.data_key
        return ckpt.state

    def close(self) -> None:
        """Wait until every checkpoint written in the background is on disk; raise a write's error."""
        self.writer.close()
