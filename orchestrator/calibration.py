"""A trial's training speed on this machine, measured: a few real optimizer steps of its model, timed.

Where no peak FLOP/s is known (a CPU), a time estimate needs a measured speed rather than a guessed MFU. One worker of
the trial's job is set up by `gptcore.train.setup` (same model, micro-batch, accumulation, precision and torch
threads) on random tokens, so no corpus is read, and `gptcore.train.train_step` runs `CALIBRATION_STEPS` optimizer
steps; the first (allocations, first-touch pages) is not timed. An FSDP trial is timed as one unsharded worker: the
same arithmetic, without the gathers that spread it over several.
"""

from __future__ import annotations

import dataclasses
import functools

from gptcore.config import DataConfig, JobConfig

CALIBRATION_STEPS = 2  # one warm-up step, then the one that is timed: a few seconds for a GPT-2 small on 2 cores


def calibration_job(job: JobConfig) -> JobConfig:
    """``job`` as one worker on this machine's CPU, from scratch, for `CALIBRATION_STEPS` steps, on no corpus of its
    own: what is left is what a step costs (two trials of one model and batch have one calibration job)."""
    train = dataclasses.replace(
        job.train,
        max_steps=CALIBRATION_STEPS,
        flops_budget=None,
        epochs=1,
        init_from="scratch",
        device="cpu",
        parallel="ddp",
        fsdp_cpu_offload=False,
    )
    return dataclasses.replace(job, train=train, data=DataConfig())


def calibrate(job: JobConfig) -> float:
    """Tokens per second that one worker of ``job`` trains at on this machine's CPU."""
    return _tokens_per_sec(calibration_job(job))


@functools.cache  # a process measures a calibration job once (a dry run asks per trial, tests ask again)
def _tokens_per_sec(job: JobConfig) -> float:
    import numpy as np
    import torch

    from gptcore.data import SlidingWindowDataset
    from gptcore.hooks import Hooks
    from gptcore.train import setup, train_step

    context = job.model.context_length
    windows = CALIBRATION_STEPS * job.train.windows_per_step(1)
    tokens = np.random.default_rng(0).integers(0, job.model.vocab_size, size=windows * context + 1, dtype=np.int64)
    splits = (
        SlidingWindowDataset(tokens, context, context, name="train"),
        SlidingWindowDataset(tokens[: context + 1], context, context, name="val"),
    )
    run = setup(
        job,
        Hooks(),
        resume_from=None,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        wrap_model=None,
        datasets=splits,
        data_dir=None,
    )
    try:
        run.model.train()
        batches = run.batches()
        speeds = [train_step(run, batches)["tokens_per_sec"] for _ in range(CALIBRATION_STEPS)]
    finally:
        run.checkpoints.close()
    timed = speeds[1:]
    return len(timed) / sum(1 / speed for speed in timed)  # every step has the same tokens: the harmonic mean
