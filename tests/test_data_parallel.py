"""Data parallelism in gptcore's loop, with real processes: 2 ranks over gloo (DDP), no Ray.

2 ranks x batch b must train exactly as 1 rank x batch 2b (gradients synchronised, each rank its slice of every
global batch), and a checkpoint taken mid-epoch must resume on 2 or on 1 rank with the batches and losses of the
uninterrupted run (the data position is saved in windows of the epoch's order, not in per-rank batches).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptcore.config import JobConfig
from gptcore.corpus import dataset_folder
from gptcore.hooks import HookList, Hooks, LocalCheckpoints
from gptcore.parallel import leave_process_group
from gptcore.train import train

from .conftest import tiny_job
from .curves import assert_same_training

STEPS, HALF = 8, 4


class Losses(Hooks):
    def __init__(self):
        self.losses: list[float] = []

    def on_step(self, ctx, state, metrics):
        self.losses.append(metrics["loss"])


def _rank(rank: int, world: int, init: str, job: dict, out: str, resume: str | None) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        losses = Losses()
        train(
            JobConfig.from_dict(job),
            HookList(losses, LocalCheckpoints(Path(out) / "ckpt")),
            resume_from=resume,
            rank=rank,
            world_size=world,
            device="cpu",
            wrap_model=torch.nn.parallel.DistributedDataParallel,
        )
        if rank == 0:
            (Path(out) / "losses.json").write_text(json.dumps(losses.losses))
    finally:
        leave_process_group()


def run(
    tmp_path: Path, name: str, *, world: int, batch: int, steps: int, resume: Path | None = None, **train: object
) -> list[float]:
    job = tiny_job(
        model={"context_length": 32},
        train={
            "batch_size": batch,
            "max_steps": steps,
            "precision": "fp32",
            "lr_schedule": "constant",
            "eval_every": HALF,
            "checkpoint_every": HALF,
            "sample_max_new_tokens": 0,
            **train,
        },
    )
    dataset_folder(job)  # prepared once, before the ranks read it
    out = tmp_path / name
    out.mkdir()
    if world == 1:
        _rank_single(job, out, resume)
    else:
        mp.spawn(_rank, args=(world, str(out / "init"), job.to_dict(), str(out), resume and str(resume)), nprocs=world)
    return json.loads((out / "losses.json").read_text())


def _rank_single(job: JobConfig, out: Path, resume: Path | None) -> None:
    losses = Losses()
    train(job, HookList(losses, LocalCheckpoints(out / "ckpt")), resume_from=resume, device="cpu")
    (out / "losses.json").write_text(json.dumps(losses.losses))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """An uninterrupted 2-rank run, and one stopped at step HALF (its checkpoint is where a killed run resumes)."""
    tmp = tmp_path_factory.mktemp("ddp")
    full = run(tmp, "full", world=2, batch=2, steps=STEPS)
    run(tmp, "first_half", world=2, batch=2, steps=HALF)
    return tmp, full, tmp / "first_half" / "ckpt" / "latest"


def test_two_ranks_train_as_one_rank_with_their_joint_batch(two_ranks, tmp_path):
    _, full, _ = two_ranks
    single = run(tmp_path, "single", world=1, batch=4, steps=STEPS)
    assert_same_training(full, single)
    assert len(set(full)) == STEPS  # the losses move: the comparison is not between constants


def test_a_two_rank_run_resumes_mid_epoch_on_two_ranks(two_ranks, tmp_path):
    _, full, checkpoint = two_ranks
    assert json.loads((checkpoint / "meta.json").read_text())["state"]["samples_in_epoch"] == HALF * 4
    resumed = run(tmp_path, "resumed", world=2, batch=2, steps=STEPS, resume=checkpoint)
    assert_same_training(resumed, full[HALF:], first_step=HALF + 1)


def test_a_two_rank_run_resumes_mid_epoch_on_one_rank(two_ranks, tmp_path):
    _, full, checkpoint = two_ranks
    resumed = run(tmp_path, "one", world=1, batch=4, steps=STEPS, resume=checkpoint)
    assert_same_training(resumed, full[HALF:], first_step=HALF + 1)


def test_a_global_batch_trains_the_same_on_one_two_and_four_ranks(tmp_path):
    """``train.global_batch_size`` fixes the windows of an optimizer step whatever the ranks: 1 rank accumulating 4
    micro-batches of 2, 2 ranks accumulating 2 and 4 ranks 1 train the same; and a checkpoint of the 4-rank run
    resumes on 2 ranks (accumulating 2 again) on the same curve."""
    curves = {w: run(tmp_path, f"ranks{w}", world=w, batch=2, steps=STEPS, global_batch_size=8) for w in (1, 2, 4)}
    assert_same_training(curves[2], curves[1])
    assert_same_training(curves[4], curves[1])
    assert len(set(curves[1])) == STEPS
    run(tmp_path, "ranks4_half", world=4, batch=2, steps=HALF, global_batch_size=8)
    checkpoint = tmp_path / "ranks4_half" / "ckpt" / "latest"
    resumed = run(tmp_path, "resumed", world=2, batch=2, steps=STEPS, resume=checkpoint, global_batch_size=8)
    assert_same_training(resumed, curves[1][HALF:], first_step=HALF + 1)
