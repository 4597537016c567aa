"""The training loop: set a run up (data, model, optimizer, resumed state), then step, evaluate and checkpoint.

`train(config, hooks)` is a plain single-process loop. Distributed runners (the orchestrator's Ray Train worker)
call the same function with their rank, world size, device and a model wrapper (DDP), and plug metrics, samples
and checkpoint destinations in through `Hooks`. With ``train.parallel="fsdp"`` the loop shards the model itself
(`gptcore.parallel`) and writes sharded checkpoints; every piece works on either.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from gptcore.accounting import run_length
from gptcore.checkpoint import init_source_kind, load_checkpoint, load_model_weights
from gptcore.checkpoint_format import TrainState
from gptcore.checkpointing import CheckpointManager
from gptcore.config import JobConfig, TrainConfig
from gptcore.data import SlidingWindowDataset, build_datasets, make_loader
from gptcore.evaluation import evaluate, sample_text
from gptcore.hooks import Hooks, TrainContext, TrainResult
from gptcore.model import GPT
from gptcore.optimizer import configure_optimizer, learning_rate
from gptcore.parallel import (
    ensure_process_group,
    full_value,
    is_sharded,
    leave_process_group,
    mean_across_ranks,
    set_gradient_sync,
    shard_model,
)
from gptcore.runtime import autocast, prepare_process, resolve_device, resolve_precision


def build_model(config: JobConfig, device: torch.device) -> tuple[GPT, dict[str, Any]]:
    """A GPT for ``config``, initialised from scratch or from ``train.init_from``."""
    model = GPT(config.model)
    report: dict[str, Any] = {"init_from": config.train.init_from}
    source = config.train.init_from
    kind = init_source_kind(source)
    if kind == "checkpoint":
        ckpt = load_checkpoint(Path(source).expanduser(), with_optimizer=False)
        load_model_weights(model, ckpt.model_state, source=source)
    elif kind != "scratch":
        from gptcore.load_pretrained import load_pretrained_into

        report.update(load_pretrained_into(model, source))
    return model.to(device), report


@dataclass
class Run:
    """What the loop works on, built once by `setup`: the job, the model (wrapped and not), optimizer and data."""

    config: JobConfig
    ctx: TrainContext
    model: torch.nn.Module  # compiled and/or wrapped (DDP), or sharded (FSDP): what forward and backward go through
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    state: TrainState
    train_ds: SlidingWindowDataset
    eval_loaders: dict[str, torch.utils.data.DataLoader]  # train_loss / val_loss -> loader
    hooks: Hooks
    checkpoints: CheckpointManager

    @property
    def windows_per_micro_step(self) -> int:
        """Windows one micro-batch of every rank takes together."""
        return self.config.train.batch_size * self.ctx.world_size

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches from the saved data position of the current epoch on."""
        t, ctx = self.config.train, self.ctx
        loader = make_loader(
            self.train_ds,
            t.batch_size,
            shuffle=True,
            drop_last=True,
            seed=t.seed,
            epoch=self.state.epoch,
            start=self.state.samples_in_epoch,
            rank=ctx.rank,
            world_size=ctx.world_size,
            pin_memory=ctx.device.type == "cuda",
        )
        return iter(loader)


def setup(
    config: JobConfig,
    hooks: Hooks,
    *,
    resume_from: str | Path | None,
    rank: int,
    world_size: int,
    device: torch.device,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None,
    datasets: tuple[SlidingWindowDataset, SlidingWindowDataset] | None,
    data_dir: str | Path | None,
) -> Run:
    """Seed, data, model, optimizer, and the state of a resumed run; the `Run` the loop works on.

    ``train.parallel="fsdp"`` needs torch.distributed initialised (`train` starts a one-rank group if it is not);
    the model is sharded here, and ``wrap_model`` must be None.
    """
    t = config.train
    _check_parallel(t, wrap_model, world_size)
    dtype = prepare_process(t, device, rank)
    train_ds, val_ds = datasets or build_datasets(config, data_dir)
    length = run_length(config, len(train_ds), world_size)
    model, init_report = _initial_model(config, rank, device, dtype)
    optimizer = configure_optimizer(model, config, device)  # after sharding: it holds this rank's shards
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    checkpoints = CheckpointManager(config, model, optimizer, scaler, device)
    state = checkpoints.resume(resume_from, train_ds.key, rank) or TrainState(seed=t.seed, data_key=train_ds.key)
    ctx = TrainContext(
        config=config,
        model=model,
        device=device,
        rank=rank,
        world_size=world_size,
        train_windows=len(train_ds),
        val_windows=len(val_ds),
        batches_per_epoch=length.batches_per_epoch,
        steps_per_epoch=length.steps_per_epoch,
        total_steps=length.total_steps,
        dtype=dtype,
        resumed_from=str(resume_from) if resume_from else None,
        init_report=init_report,
    )
    loaders = {
        name: _eval_loader(ds, t.batch_size, ctx) for name, ds in (("train_loss", train_ds), ("val_loss", val_ds))
    }
    model_called = _wrapped(model, t, wrap_model)
    return Run(config, ctx, model_called, optimizer, scaler, state, train_ds, loaders, hooks, checkpoints)


def _check_parallel(
    t: TrainConfig, wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None, world_size: int
) -> None:
    """FSDP: gptcore shards the model itself, in a process group of ``world_size`` ranks."""
    if t.parallel != "fsdp":
        return
    if wrap_model is not None:
        raise ValueError("train.parallel=fsdp: gptcore shards the model itself; pass no wrap_model")
    if not dist.is_initialized() or dist.get_world_size() != world_size:
        raise ValueError(
            f"train.parallel=fsdp needs torch.distributed initialised with {world_size} rank(s) "
            "(train() starts a one-rank group itself when there is none)"
        )


def _initial_model(
    config: JobConfig, rank: int, device: torch.device, dtype: torch.dtype
) -> tuple[GPT, dict[str, Any]]:
    """Every rank builds rank 0's initial weights (its seed's), then draws from its own stream: FSDP shards them as
    they are (DDP would broadcast rank 0's anyway). FSDP: built on the CPU, sharding moves one group at a time."""
    t = config.train
    fsdp = t.parallel == "fsdp"
    with torch.random.fork_rng(devices=[], enabled=rank != 0):
        if rank != 0:
            torch.manual_seed(t.seed)
        model, init_report = build_model(config, torch.device("cpu") if fsdp else device)
    model.activation_checkpointing = t.activation_checkpointing
    if fsdp:
        if t.compile:  # each block, in place (parameter names unchanged), before sharding: FSDP's hooks stay eager
            for block in model.blocks:
                block.compile()
        shard_model(model, device=device, dtype=dtype, cpu_offload=t.fsdp_cpu_offload)
    return model, init_report


def _wrapped(
    model: GPT, t: TrainConfig, wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None
) -> torch.nn.Module:
    """What the loop calls: the model compiled and wrapped (DDP) as asked; a sharded model as it is."""
    if t.parallel == "fsdp":
        return model
    wrapped = torch.compile(model) if t.compile else model
    return wrap_model(wrapped) if wrap_model is not None else wrapped


def _eval_loader(dataset: SlidingWindowDataset, batch_size: int, ctx: TrainContext) -> torch.utils.data.DataLoader:
    """In order, every window once, this rank's share."""
    pin = ctx.device.type == "cuda"
    return make_loader(
        dataset,
        batch_size,
        shuffle=False,
        drop_last=False,
        rank=ctx.rank,
        world_size=ctx.world_size,
        pin_memory=pin,
    )


def forward_backward_step(
    model: torch.nn.Module,
    scaler: torch.amp.GradScaler,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_micro: int,
    sync: bool,
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """One of ``n_micro`` micro-batches: forward, loss / n_micro, backward (gradients all-reduced, or reduce-scattered
    under FSDP, only if ``sync``)."""
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    set_gradient_sync(model, sync)  # FSDP (DDP: no_sync below)
    no_sync = not sync and hasattr(model, "no_sync")
    with model.no_sync() if no_sync else contextlib.nullcontext(), autocast(device, dtype):
        loss = model(x, targets=y) / n_micro
    scaler.scale(loss).backward()
    return loss.detach()


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    grad_clip: float,
) -> tuple[torch.Tensor, float]:
    """Accumulate gradients over ``micro_batches``, clip, step: the mean loss (a tensor) and the gradient norm."""
    n = len(micro_batches)
    loss = sum(
        forward_backward_step(model, scaler, x, y, n_micro=n, sync=i == n - 1, device=device, dtype=dtype)
        for i, (x, y) in enumerate(micro_batches)
    )
    grad_norm = float("nan")
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        # over every rank's shards under FSDP (the norm of DTensor gradients is a replicated DTensor)
        grad_norm = float(full_value(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def train_step(run: Run, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """One optimizer step over the step's micro-batches (`TrainConfig.accumulation_steps`; fewer at an epoch's end);
    its metrics."""
    t, ctx, state = run.config.train, run.ctx, run.state
    started = time.perf_counter()
    lr = learning_rate(state.step, ctx.total_steps, run.config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    accumulation = t.accumulation_steps(ctx.world_size)
    n_micro = min(accumulation, (len(run.train_ds) - state.samples_in_epoch) // run.windows_per_micro_step)
    micro_batches = [next(batches) for _ in range(n_micro)]
    loss, grad_norm = optimizer_step(
        run.model, run.optimizer, run.scaler, micro_batches, device=ctx.device, dtype=ctx.dtype, grad_clip=t.grad_clip
    )
    tokens = n_micro * run.windows_per_micro_step * run.config.model.context_length
    state.step += 1
    state.samples_in_epoch += n_micro * run.windows_per_micro_step
    state.tokens_seen += tokens
    metrics = {"loss": mean_across_ranks(float(loss), ctx.device), "lr": lr, "grad_norm": grad_norm}
    metrics["tokens_seen"] = float(state.tokens_seen)
    metrics["tokens_per_sec"] = tokens / (time.perf_counter() - started)
    metrics["epoch"] = ctx.epochs_done(state)
    return metrics


def evaluate_and_report(run: Run, checkpoint: bool, extra: dict[str, float]) -> dict[str, float]:
    """Train/val loss, a sample, then the hooks' `on_eval` (with a saver at checkpoint points); the metrics."""
    t, ctx, state = run.config.train, run.ctx, run.state
    metrics = {
        name: evaluate(run.model, loader, t.eval_iters, ctx.device, ctx.dtype)
        for name, loader in run.eval_loaders.items()
    }
    metrics.update(extra)
    metrics["val_perplexity"] = math.exp(min(metrics["val_loss"], 50.0))
    state.best_val_loss = min(state.best_val_loss, metrics["val_loss"])
    metrics["best_val_loss"] = state.best_val_loss
    want_sample = t.sample_every is None or (t.sample_every > 0 and state.step % t.sample_every == 0)
    sample = None
    if want_sample and t.sample_max_new_tokens > 0 and (ctx.is_main or is_sharded(run.model)):
        dtype = resolve_precision(t.precision, ctx.device, "sample")  # auto may differ from training's (measured)
        sample = sample_text(ctx.model, t, step=state.step, device=ctx.device, dtype=dtype, is_main=ctx.is_main)
    save = run.checkpoints.saver(state) if checkpoint else None  # a collective, on every rank
    run.hooks.on_eval(ctx, state, metrics, sample, save)
    return metrics


def train(
    config: JobConfig,
    hooks: Hooks | None = None,
    *,
    resume_from: str | Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str | None = None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    datasets: tuple[SlidingWindowDataset, SlidingWindowDataset] | None = None,
    data_dir: str | Path | None = None,
) -> TrainResult:
    """Train a GPT as ``config`` says; resumes from a checkpoint folder if given.

    ``wrap_model`` wraps the model for data parallelism (e.g. DDP); each rank reads its slice of every global batch.
    With ``train.parallel="fsdp"`` the model is sharded across the ranks instead (no ``wrap_model``); a process
    without torch.distributed trains as a one-rank group. ``data_dir`` is a prepared dataset folder (default: the
    corpus prepared under the cache). Returns when the epochs or ``max_steps`` are done, or early with status
    ``"diverged"`` when the loss stops being finite.
    """
    device = torch.device(device) if device is not None else resolve_device(config.train.device)
    own_group = config.train.parallel == "fsdp" and ensure_process_group(device)
    try:
        return _train(config, hooks, resume_from, rank, world_size, device, wrap_model, datasets, data_dir)
    finally:
        if own_group:
            leave_process_group()


def _train(config, hooks, resume_from, rank, world_size, device, wrap_model, datasets, data_dir) -> TrainResult:
    run = setup(
        config,
        hooks or Hooks(),
        resume_from=resume_from,
        rank=rank,
        world_size=world_size,
        device=device,
        wrap_model=wrap_model,
        datasets=datasets,
        data_dir=data_dir,
    )
    state, ctx = run.state, run.ctx
    run.hooks.on_train_start(ctx, state)
    status, metrics, step_metrics = "finished", {}, {}
    started, tokens_at_start = time.perf_counter(), state.tokens_seen
    run.model.train()
    try:
        while status == "finished" and state.step < ctx.total_steps and state.epoch < config.train.epochs:
            if state.samples_in_epoch + run.windows_per_micro_step > len(run.train_ds):  # resumed on more ranks
                state.epoch, state.samples_in_epoch = state.epoch + 1, 0
                continue
            batches = run.batches()
            epoch_end = False
            while not epoch_end and state.step < ctx.total_steps:
                step_metrics = train_step(run, batches)
                run.hooks.on_step(ctx, state, step_metrics)
                if not math.isfinite(step_metrics["loss"]):
                    status = "diverged"
                    break
                epoch_end = state.samples_in_epoch + run.windows_per_micro_step > len(run.train_ds)
                last = state.step >= ctx.total_steps or (epoch_end and state.epoch + 1 >= config.train.epochs)
                evaluate_now, checkpoint = run.checkpoints.after_step(state.step, epoch_end=epoch_end, last=last)
                if run.hooks.wants_checkpoint(ctx, state):  # asked every step: a hook's question may be a collective
                    evaluate_now = checkpoint = True
                if epoch_end:  # the saved state points at the start of the next epoch
                    state.epoch, state.samples_in_epoch = state.epoch + 1, 0
                if evaluate_now:
                    extra = {"tokens_per_sec": step_metrics["tokens_per_sec"], "lr": step_metrics["lr"]}
                    metrics = evaluate_and_report(run, checkpoint, extra)
    finally:
        run.checkpoints.close()  # background writes are on disk before the end hooks (or the error)
    wall = time.perf_counter() - started
    if status == "diverged":
        metrics = {"loss": step_metrics["loss"], "train_loss": math.nan, "val_loss": math.nan}
    tokens_per_sec = (state.tokens_seen - tokens_at_start) / max(wall, 1e-9)
    result = TrainResult(status=status, state=state, metrics=metrics, wall_time=wall, tokens_per_sec=tokens_per_sec)
    run.hooks.on_train_end(ctx, state, result)
    return result
