"""The training loop and its pieces: optimizer, LR schedule, precision, step, evaluation.

`train(config, hooks)` is a plain single-process loop. Distributed runners (the orchestrator's
Ray Train worker) call the same function with their rank, world size, device and a model
wrapper (DDP), and plug metrics, samples and checkpoints in through `Hooks`. With
``train.parallel="fsdp"`` the loop shards the model itself (`gptcore.parallel`) and writes sharded
checkpoints; every piece below works on either.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from gptcore.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    Snapshot,
    TrainState,
    check_resumable,
    gather_rng_states,
    init_source_kind,
    load_checkpoint,
    load_model_weights,
    load_sharded_into,
    read_meta,
    restore_rng,
    save_sharded,
    take_snapshot,
    write_snapshot,
)
from gptcore.checkpoint import is_sharded as is_sharded_checkpoint
from gptcore.config import JobConfig, TrainConfig
from gptcore.data import SlidingWindowDataset, build_datasets, make_loader
from gptcore.model import GPT
from gptcore.parallel import (
    ensure_process_group,
    full_value,
    is_sharded,
    leave_process_group,
    set_gradient_sync,
    shard_model,
)
from gptcore.sampling import generate, generate_text
from gptcore.tokenizer import EOT_ID, decode, encode

# --------------------------------------------------------------------------- pieces


def set_seed(seed: int) -> int:
    """Seed Python, NumPy and torch (all devices); returns the seed for logging."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def resolve_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``auto``: bf16 on CUDA GPUs that support it, fp16 (with a GradScaler) on older GPUs,
    bf16 on CPUs with native bf16 instructions (AVX-512 BF16 / AMX), fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def keep_freed_memory_mapped() -> None:
    """Stop glibc from returning large freed blocks to the OS.

    Every training step allocates and frees the same large buffers (logits, embedding
    gradients). With glibc's defaults each is a fresh mmap whose pages fault in again on
    first touch, which costs a third of a CPU step for gpt2-small. Keeping them in the heap
    removes that cost; the process keeps its peak memory, as any caching allocator does.
    This tunes the main arena: a loop run in another thread (Ray Train's) gets the same effect
    only if the process started with ``MALLOC_ARENA_MAX=1``, which puts every thread on it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 40)


def configure_optimizer(model: torch.nn.Module, config: JobConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; frozen parameters excluded."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    t = config.train
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=fused)


def learning_rate(step: int, total_steps: int, config: JobConfig) -> float:
    """Linear warmup to ``lr``, then constant or cosine decay to ``min_lr`` at ``total_steps``."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + math.cos(math.pi * progress))


def _all_reduce_mean(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    eval_iters: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """Mean loss over the first ``eval_iters`` batches of ``loader`` (averaged across ranks)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    if is_sharded(model):  # every forward is a collective: all ranks run the same number
        batches = _lockstep(loader, min(eval_iters, len(loader)))
    else:
        batches = ((x, y, True) for x, y in itertools.islice(loader, eval_iters))
    try:
        with autocast(device, dtype):  # one autocast region: each weight is cast once, not once per batch
            for x, y, counted in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = model(x, targets=y).item()
                if counted:
                    total += loss
                    count += 1
    finally:
        model.train(was_training)
    return _all_reduce_mean(total / max(count, 1), device)


def _lockstep(loader: torch.utils.data.DataLoader, rounds: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``rounds`` batches of ``loader``; once this rank's run out (the last global batch may leave it none), a batch
    again, marked not to be counted, so that it still takes part in every round's forward."""
    spare = None
    batches = iter(loader)
    for _ in range(rounds):
        batch = next(batches, None)
        if batch is not None:
            spare = batch
            yield batch[0], batch[1], True
            continue
        if spare is None:
            x, y = loader.dataset[0]
            spare = (x[None], y[None])
        yield spare[0], spare[1], False


# --------------------------------------------------------------------------- hooks


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


@dataclass
class TrainResult:
    status: str  # "finished" or "diverged"
    state: TrainState
    metrics: dict[str, float]  # last evaluation
    wall_time: float
    tokens_per_sec: float


# --------------------------------------------------------------------------- loop


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
        from gptcore.pretrained import load_pretrained_into

        report.update(load_pretrained_into(model, source))
    return model.to(device), report


class CheckpointSchedule:
    """Decides, after each step, whether to evaluate and whether to checkpoint.

    Every ``train.checkpoint_every`` steps; or, when that is 0, once an epoch at the first evaluation from the
    epoch's end on (no evaluation is added for it); and always at the last step, which is also evaluated.
    """

    def __init__(self, train: TrainConfig):
        self.eval_every, self.checkpoint_every = train.eval_every, train.checkpoint_every
        self.pending = False  # an epoch ended since the last checkpoint

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
    writer: CheckpointWriter = field(default_factory=CheckpointWriter)
    rng_states: list[dict[str, torch.Tensor]] = field(default_factory=list)  # gathered at a checkpoint point

    @property
    def global_batch(self) -> int:
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

    def saver(self) -> CheckpointSaver:
        def parts() -> dict[str, Any]:  # what a checkpoint holds, read when it is taken
            return {
                "model": self.ctx.model,
                "config": self.config,
                "state": self.state,
                "optimizer": self.optimizer,
                "scaler": self.scaler,
                "rng_states": self.rng_states or None,
            }

        if is_sharded(self.model):
            return CheckpointSaver(None, self.writer, lambda path: save_sharded(path, **parts()))
        return CheckpointSaver(lambda copy: take_snapshot(**parts(), copy=copy), self.writer)


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
    if device.type == "cpu":
        keep_freed_memory_mapped()
        if t.num_threads:
            torch.set_num_threads(t.num_threads)
    dtype = resolve_precision(t.precision, device)
    set_seed(t.seed + rank)
    train_ds, val_ds = datasets or build_datasets(config, data_dir)
    batches_per_epoch = _batches_per_epoch(len(train_ds), t.batch_size, world_size)
    steps_per_epoch = math.ceil(batches_per_epoch / t.grad_accum_steps)
    model, init_report = _initial_model(config, rank, device, dtype)
    optimizer = configure_optimizer(model, config, device)  # after sharding: it holds this rank's shards
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = resume(resume_from, config, model, optimizer, scaler, train_ds.key, rank) or TrainState(
        seed=t.seed, data_key=train_ds.key
    )
    ctx = TrainContext(
        config=config,
        model=model,
        device=device,
        rank=rank,
        world_size=world_size,
        train_windows=len(train_ds),
        val_windows=len(val_ds),
        batches_per_epoch=batches_per_epoch,
        steps_per_epoch=steps_per_epoch,
        total_steps=int(min(t.max_steps or math.inf, t.epochs * steps_per_epoch)),
        dtype=dtype,
        resumed_from=str(resume_from) if resume_from else None,
        init_report=init_report,
    )
    loaders = {
        name: _eval_loader(ds, t.batch_size, ctx) for name, ds in (("train_loss", train_ds), ("val_loss", val_ds))
    }
    return Run(config, ctx, _wrapped(model, t, wrap_model), optimizer, scaler, state, train_ds, loaders, hooks)


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


def _batches_per_epoch(windows: int, batch_size: int, world_size: int) -> int:
    batches = windows // (batch_size * world_size)
    if batches == 0:
        raise ValueError(
            f"the train split has {windows} windows, fewer than train.batch_size={batch_size} x "
            f"{world_size} worker(s); lower train.batch_size or data.stride, or use a larger corpus"
        )
    return batches


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


def resume(
    path: str | Path | None,
    config: JobConfig,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data_key: str,
    rank: int,
) -> TrainState | None:
    """Load a checkpoint's weights, optimizer, scaler and this rank's RNG state; its train state (None: no path).

    A sharded model (FSDP) reads its shards of a sharded checkpoint, written by any number of ranks; any other
    model reads a checkpoint of either layout whole.
    """
    if path is None:
        return None
    if is_sharded(model):
        if not is_sharded_checkpoint(read_meta(path)):
            raise CheckpointError(
                f"cannot resume a train.parallel=fsdp run from {path}: it was written whole, by a "
                "train.parallel=ddp run; resume it with train.parallel=ddp, or start from its weights with "
                "train.init_from"
            )
        ckpt = load_checkpoint(path, with_weights=False)
        check_resumable(ckpt, config, data_key)
        load_sharded_into(path, model, optimizer)
    else:
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, config, data_key)
        load_model_weights(model, ckpt.model_state, source=str(path))
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
    if ckpt.scaler_state:
        scaler.load_state_dict(ckpt.scaler_state)
    restore_rng(ckpt.rng, rank=rank, seed=config.train.seed + rank)
    ckpt.state.data_key = data_key or ckpt.state.data_key
    return ckpt.state


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
    """One optimizer step over ``grad_accum_steps`` micro-batches (fewer at an epoch's end); its metrics."""
    t, ctx, state = run.config.train, run.ctx, run.state
    started = time.perf_counter()
    lr = learning_rate(state.step, ctx.total_steps, run.config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    n_micro = min(t.grad_accum_steps, (len(run.train_ds) - state.samples_in_epoch) // run.global_batch)
    micro_batches = [next(batches) for _ in range(n_micro)]
    loss, grad_norm = optimizer_step(
        run.model, run.optimizer, run.scaler, micro_batches, device=ctx.device, dtype=ctx.dtype, grad_clip=t.grad_clip
    )
    tokens = n_micro * run.global_batch * run.config.model.context_length
    state.step += 1
    state.samples_in_epoch += n_micro * run.global_batch
    state.tokens_seen += tokens
    metrics = {"loss": _all_reduce_mean(float(loss), ctx.device), "lr": lr, "grad_norm": grad_norm}
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
        sample = _sample(run)
    if checkpoint:  # a collective on every rank: rank 0's hooks save every rank's RNG state
        run.rng_states[:] = gather_rng_states(ctx.device) or []
    run.hooks.on_eval(ctx, state, metrics, sample, run.saver() if checkpoint else None)
    run.rng_states.clear()
    return metrics


def _sample(run: Run) -> str | None:
    """Rank 0's sample generation (None on the other ranks).

    A sharded model's every forward gathers its parameters, a collective: all ranks generate, in lockstep — the
    same prompt, a generator seeded alike on all, and no early stop at end-of-text (the text is cut there after), so
    every rank runs exactly ``sample_max_new_tokens`` forwards whatever its numerics.
    """
    t, ctx = run.config.train, run.ctx
    with autocast(ctx.device, ctx.dtype):
        if not is_sharded(run.model):
            return generate_text(
                ctx.model,
                t.sample_prompt,
                t.sample_max_new_tokens,
                temperature=t.sample_temperature,
                top_k=t.sample_top_k,
            )[0]
        generator = torch.Generator(device=ctx.device).manual_seed(t.seed + run.state.step)
        new = generate(
            ctx.model,
            [encode(t.sample_prompt)],
            t.sample_max_new_tokens,
            temperature=t.sample_temperature,
            top_k=t.sample_top_k,
            generator=generator,
            device=ctx.device,
        )[0]
    if not ctx.is_main:
        return None
    return t.sample_prompt + decode(new[: new.index(EOT_ID)] if EOT_ID in new else new)


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
    state, ctx, schedule = run.state, run.ctx, CheckpointSchedule(config.train)
    run.hooks.on_train_start(ctx, state)
    status, metrics, step_metrics = "finished", {}, {}
    started, tokens_at_start = time.perf_counter(), state.tokens_seen
    run.model.train()
    try:
        while status == "finished" and state.step < ctx.total_steps and state.epoch < config.train.epochs:
            if state.samples_in_epoch + run.global_batch > len(run.train_ds):  # resumed on more ranks: epoch done
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
                epoch_end = state.samples_in_epoch + run.global_batch > len(run.train_ds)
                last = state.step >= ctx.total_steps or (epoch_end and state.epoch + 1 >= config.train.epochs)
                evaluate_now, checkpoint = schedule.after_step(state.step, epoch_end=epoch_end, last=last)
                if epoch_end:  # the saved state points at the start of the next epoch
                    state.epoch, state.samples_in_epoch = state.epoch + 1, 0
                if evaluate_now:
                    extra = {"tokens_per_sec": step_metrics["tokens_per_sec"], "lr": step_metrics["lr"]}
                    metrics = evaluate_and_report(run, checkpoint, extra)
    finally:
        run.writer.close()  # every checkpoint written in the background is on disk before the end hooks (or the error)
    wall = time.perf_counter() - started
    if status == "diverged":
        metrics = {"loss": step_metrics["loss"], "train_loss": math.nan, "val_loss": math.nan}
    tokens_per_sec = (state.tokens_seen - tokens_at_start) / max(wall, 1e-9)
    result = TrainResult(status=status, state=state, metrics=metrics, wall_time=wall, tokens_per_sec=tokens_per_sec)
    run.hooks.on_train_end(ctx, state, result)
    return result
