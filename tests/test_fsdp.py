"""FSDP2 in gptcore's loop, with real processes: 2 ranks over gloo, no Ray (`train.parallel=fsdp`).

One pair of spawned ranks runs every 2-rank job of the module in turn (a process start costs more than a job):
FSDP and DDP with tied and untied heads, with gradient accumulation and activation checkpointing, runs that
checkpoint at every evaluation (sharded checkpoints), resumes from them, and a diverging run. Single-process
references and the one-rank resumes run in the test process. In fp32, with the same data and seed, FSDP's losses
equal DDP's and a single process's to 1e-5; a resumed run continues the uninterrupted one's losses.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gptcore.checkpoint import check_fits, load_checkpoint, load_model
from gptcore.checkpoint_format import CheckpointError, read_meta
from gptcore.config import ConfigError, JobConfig
from gptcore.corpus import dataset_folder
from gptcore.evaluation import lockstep
from gptcore.hooks import Hooks
from gptcore.parallel import leave_process_group
from gptcore.train import build_model, train

from .conftest import tiny_job
from .curves import assert_same_training, max_gap

REPO = Path(__file__).resolve().parents[1]
STEPS, HALF = 10, 5
PROMPT = "Every effort moves you"


def job(**train_overrides) -> dict:
    """The micro model (2 layers: two block groups and the root) in fp32, evaluated and checkpointed every HALF
    steps, a 4-token greedy sample at each evaluation."""
    model = {"context_length": 32, "n_layers": 2, "pad_vocab_multiple": 64}
    model.update(train_overrides.pop("model", {}))
    train = {
        "batch_size": 2,
        "max_steps": STEPS,
        "precision": "fp32",
        "lr_schedule": "constant",
        "lr": 2e-3,
        "eval_every": HALF,
        "checkpoint_every": HALF,
        "eval_iters": 9,  # more than the validation split has at 2 x 2 windows a round: the last round is uneven
        "sample_max_new_tokens": 4,
        "sample_prompt": PROMPT,
        "parallel": "fsdp",
    }
    train.update(train_overrides)
    # stride 24: 21 validation windows, so the last evaluation round has a window for rank 0 and none for rank 1
    return tiny_job(model=model, data={"stride": 24}, train=train).to_dict()


class Record(Hooks):
    """Losses, evaluations and samples; every checkpoint to ``out/step<N>`` (and, with ``split``, the last one
    again into one folder per rank, as a Ray worker writes it before uploading)."""

    def __init__(self, out: Path, split: bool = False):
        self.out, self.split = out, split
        self.losses: list[float] = []
        self.evals: list[dict] = []

    def on_step(self, ctx, state, metrics):
        self.losses.append(metrics["loss"])

    def on_eval(self, ctx, state, metrics, sample, save):
        self.evals.append({"step": state.step, "val_loss": metrics["val_loss"], "sample": sample})
        if save is None or not (ctx.is_main or save.sharded):
            return
        save(self.out / f"step{state.step}")
        if self.split and state.step == STEPS:
            save(self.out / "split" / f"rank{ctx.rank}")


def run_job(name: str, raw: dict, out: Path, *, rank=0, world=1, resume=None, split=False, ddp=False) -> dict:
    record = Record(out / name, split=split)
    result = train(
        JobConfig.from_dict(raw),
        record,
        resume_from=resume,
        rank=rank,
        world_size=world,
        device="cpu",
        wrap_model=torch.nn.parallel.DistributedDataParallel if ddp else None,
    )
    outcome = {"losses": record.losses, "evals": record.evals, "status": result.status}
    if rank == 0:
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "outcome.json").write_text(json.dumps(outcome))
    return outcome


def _ranks(rank: int, world: int, init: str, jobs: list[dict], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for spec in jobs:
            resume = spec.get("resume") and str(Path(out) / spec["resume"])
            run_job(
                spec["name"],
                spec["job"],
                Path(out),
                rank=rank,
                world=world,
                resume=resume,
                split=spec.get("split", False),
                ddp=spec.get("ddp", False),
            )
    finally:
        leave_process_group()


TWO_RANK_JOBS = [
    {"name": "fsdp", "job": job(), "split": True},
    {"name": "ddp", "job": job(parallel="ddp"), "ddp": True},
    {"name": "fsdp_untied", "job": job(model={"tie_weights": False})},
    {"name": "ddp_untied", "job": job(model={"tie_weights": False}, parallel="ddp"), "ddp": True},
    {"name": "fsdp_accum", "job": job(batch_size=1, grad_accum_steps=2)},
    {"name": "fsdp_ac", "job": job(activation_checkpointing=True)},
    {"name": "fsdp_resumed", "job": job(), "resume": f"fsdp/step{HALF}"},
    # dropout draws from every rank's own RNG: the resumed run matches only if each rank's RNG state continues
    {"name": "fsdp_dropout", "job": job(model={"dropout": 0.2})},
    {"name": "fsdp_dropout_resumed", "job": job(model={"dropout": 0.2}), "resume": f"fsdp_dropout/step{HALF}"},
    {"name": "fsdp_diverged", "job": job(lr=1e6, max_steps=50, eval_every=0, checkpoint_every=0)},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-rank job, one after another in one pair of ranks; then the single-process references."""
    out = tmp_path_factory.mktemp("fsdp")
    dataset_folder(JobConfig.from_dict(job()))  # prepared once, before the ranks read it
    mp.spawn(_ranks, args=(2, str(out / "init"), TWO_RANK_JOBS, str(out)), nprocs=2)
    outcomes = {spec["name"]: json.loads((out / spec["name"] / "outcome.json").read_text()) for spec in TWO_RANK_JOBS}
    single = job(parallel="ddp", batch_size=4)
    outcomes["single"] = run_job("single", single, out)
    outcomes["single_ac"] = run_job("single_ac", job(parallel="ddp", batch_size=4, activation_checkpointing=True), out)
    outcomes["one_rank_offload"] = run_job("one_rank_offload", job(batch_size=4, fsdp_cpu_offload=True), out)
    untied = job(parallel="ddp", batch_size=4, model={"tie_weights": False})
    outcomes["single_untied"] = run_job("single_untied", untied, out)
    outcomes["single_accum"] = run_job("single_accum", job(parallel="ddp", batch_size=2, grad_accum_steps=2), out)
    return out, outcomes


@pytest.mark.parametrize(
    ("fsdp", "ddp", "single"), [("fsdp", "ddp", "single"), ("fsdp_untied", "ddp_untied", "single_untied")]
)
def test_fsdp_trains_as_ddp_and_as_one_process(runs, fsdp, ddp, single):
    _, outcomes = runs
    a, b, c = outcomes[fsdp]["losses"], outcomes[ddp]["losses"], outcomes[single]["losses"]
    assert len(a) == STEPS and len(set(a)) == STEPS  # the losses move: the comparison is not between constants
    assert_same_training(a, b)
    assert_same_training(a, c)
    # evaluation (the last round leaves one rank without a batch) and the greedy samples agree too
    fsdp_evals, ddp_evals = outcomes[fsdp]["evals"], outcomes[ddp]["evals"]
    assert [e["step"] for e in fsdp_evals] == [HALF, STEPS]
    val_losses = [{e["step"]: e["val_loss"] for e in evals} for evals in (fsdp_evals, ddp_evals)]
    assert_same_training(*val_losses)
    assert [e["sample"] for e in fsdp_evals] == [e["sample"] for e in ddp_evals]
    assert all(e["sample"].startswith(PROMPT) for e in fsdp_evals)


def test_fsdp_grad_accumulation_trains_as_one_process(runs):
    _, outcomes = runs
    assert_same_training(outcomes["fsdp_accum"]["losses"], outcomes["single_accum"]["losses"])
    # the same global batch in two micro-steps: the same training, but for rounding
    assert_same_training(outcomes["fsdp_accum"]["losses"], outcomes["fsdp"]["losses"])


def test_activation_checkpointing_changes_nothing_but_memory(runs):
    _, outcomes = runs
    # the same forward recomputed: the same sums in the same order, so the same bits
    assert outcomes["fsdp_ac"]["losses"] == outcomes["fsdp"]["losses"]
    assert outcomes["single_ac"]["losses"] == outcomes["single"]["losses"]


def test_fsdp_of_one_rank_with_cpu_offload_trains_as_one_process(runs):
    """No torch.distributed in the process: train() starts (and ends) a one-rank group."""
    _, outcomes = runs
    assert_same_training(outcomes["one_rank_offload"]["losses"], outcomes["single"]["losses"])
    assert not dist.is_initialized()


def test_fsdp_writes_sharded_checkpoints(runs):
    out, _ = runs
    checkpoint = out / "fsdp" / f"step{STEPS}"
    meta = read_meta(checkpoint)
    assert meta["layout"] == "sharded" and meta["world_size"] == 2 and meta["state"]["step"] == STEPS
    shards = sorted(p.name for p in (checkpoint / "shards").iterdir())
    assert len(shards) == 2 and all(name.endswith(".safetensors") for name in shards)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["meta.json", "rng.safetensors", "shards"]
    assert not list((out / "fsdp").glob(".step*"))  # no temporary folder left behind


def test_a_sharded_checkpoint_resumes_on_two_ranks(runs):
    _, outcomes = runs
    full = outcomes["fsdp"]["losses"]
    assert_same_training(outcomes["fsdp_resumed"]["losses"], full[HALF:], first_step=HALF + 1)


def test_each_rank_continues_its_rng_stream_on_resume(runs):
    _, outcomes = runs
    full, resumed = outcomes["fsdp_dropout"]["losses"], outcomes["fsdp_dropout_resumed"]["losses"]
    assert max_gap(full, outcomes["fsdp"]["losses"]) > 1e-3  # dropout is on
    assert_same_training(resumed, full[HALF:], first_step=HALF + 1)


@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_a_sharded_checkpoint_resumes_on_one_rank(runs, tmp_path, parallel):
    """2 -> 1 worker: FSDP of one rank reshards the checkpoint; a plain run reads it whole (optimizer state too)."""
    out, outcomes = runs
    full = outcomes["fsdp"]["losses"]
    resumed = run_job("one", job(parallel=parallel, batch_size=4), tmp_path, resume=str(out / "fsdp" / f"step{HALF}"))
    assert_same_training(resumed["losses"], full[HALF:], first_step=HALF + 1)
    assert not dist.is_initialized()  # the one-rank group train() started is gone


def test_a_diverging_fsdp_run_stops_on_every_rank(runs):
    _, outcomes = runs
    diverged = outcomes["fsdp_diverged"]
    assert diverged["status"] == "diverged" and len(diverged["losses"]) < 50
    assert not math.isfinite(diverged["losses"][-1])


# --------------------------------------------------------------------------- the tools on a sharded checkpoint


def test_a_sharded_checkpoint_loads_whole(runs):
    """One process reads the shards of both ranks into the full weights: those the run ended with."""
    out, _ = runs
    sharded = out / "fsdp" / f"step{STEPS}"
    model, ckpt = load_model(sharded)
    assert ckpt.config.train.parallel == "fsdp" and ckpt.state.step == STEPS
    assert model.head.weight is model.tok_emb.weight and model.tok_emb.weight.shape == (50304, 32)
    whole = load_checkpoint(sharded)
    assert sorted(whole.optimizer_state["state"]) == list(range(len(list(model.parameters()))))
    assert sorted(k.split(".")[1] for k in whole.rng) == ["rank0", "rank1"]
    # written per rank into two folders, then put together (what an upload to object storage does): the same
    merged = out / "merged"
    for part in sorted((out / "fsdp" / "split").iterdir()):
        shutil.copytree(part, merged, dirs_exist_ok=True)
    again, _ = load_model(merged)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_sample_and_export_read_a_sharded_checkpoint(runs, tmp_path, capsys):
    from orchestrator.cli import main

    out, outcomes = runs
    sharded = out / "fsdp" / f"step{STEPS}"
    assert main(["sample", str(sharded), "--prompt", PROMPT, "--max-new-tokens", "4", "--precision", "fp32"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == outcomes["fsdp"]["evals"][-1]["sample"]  # what rank 0 sampled in training, at the same step
    assert main(["export", str(sharded), str(tmp_path / "hf")]) == 0
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    model, _ = load_model(sharded)
    ids = torch.tensor([[464, 318, 257, 1332]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids)[..., : hf.config.vocab_size], atol=1e-4)


def test_init_from_a_sharded_checkpoint(runs):
    out, _ = runs
    sharded = out / "fsdp" / f"step{STEPS}"
    config = JobConfig.from_dict({**job(parallel="ddp"), "train": {**job()["train"], "init_from": str(sharded)}})
    check_fits(sharded, config.model)
    model, report = build_model(config, torch.device("cpu"))
    reference, _ = load_model(sharded)
    assert report["init_from"] == str(sharded)
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    )
    other = JobConfig.from_dict({"model": {"preset": "micro", "n_layers": 3, "pad_vocab_multiple": 64}}).model
    with pytest.raises(CheckpointError, match=r"model\.n_layers: checkpoint 2 vs config 3"):
        check_fits(sharded, other)
    with pytest.raises(CheckpointError, match=r"model\.pad_vocab_multiple: checkpoint 64 vs config 1"):
        check_fits(sharded, JobConfig.from_dict({"model": {"preset": "micro", "n_layers": 2}}).model)


def test_a_whole_checkpoint_does_not_resume_a_sharded_run(runs, tmp_path):
    out, _ = runs
    with pytest.raises(CheckpointError, match=r"written whole.*train\.init_from"):
        run_job("x", job(batch_size=4), tmp_path, resume=str(out / "single" / f"step{HALF}"))


SAVER = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
from gptcore.checkpoint_format import CheckpointParts, TrainState
from gptcore.checkpoint_sharded import save_sharded
from gptcore.config import JobConfig
from gptcore.model import GPT
from gptcore.parallel import shard_model

def rank_main(rank, init, target):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    job = JobConfig.from_dict({"model": {"preset": "micro", "d_model": 256, "n_heads": 4, "n_layers": 2,
                                         "pad_vocab_multiple": 64}, "train": {"parallel": "fsdp"}})
    model = shard_model(GPT(job.model), device=torch.device("cpu"), dtype=None)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().fill_(step)
        save_sharded(target, CheckpointParts(model, job, TrainState(step=step)))
        if rank == 0:
            print(step, flush=True)

if __name__ == "__main__":
    mp.spawn(rank_main, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_a_sharded_checkpoint_survives_a_rank_killed_mid_save(tmp_path):
    """SIGKILL one rank of two saving shards over and over, then the rest: the folder always loads, whole and
    consistent (every shard of one step), and no temporary folder is mistaken for it."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from tests.servers import psutil

    target, rng = tmp_path / "ckpt", random.Random(0)
    script = tmp_path / "saver.py"  # a file: spawned ranks import their function from it
    script.write_text(SAVER)
    for attempt in range(2):
        init = tmp_path / f"init{attempt}"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(init), str(target)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            assert proc.stdout.readline().strip(), "the saver wrote no checkpoint"
            time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside a later save
            ranks = [p for p in psutil.Process(proc.pid).children(recursive=True) if "spawn" in " ".join(p.cmdline())]
            rng.choice(ranks).kill()
            time.sleep(0.2)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        model, ckpt = load_model(target)
        assert ckpt.state.step >= 1, attempt
        values = {float(p.min()) for p in model.parameters()} | {float(p.max()) for p in model.parameters()}
        assert values == {float(ckpt.state.step)}, (attempt, values, ckpt.state.step)  # both ranks' shards, one step


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train.parallel": "zero3"}, "train.parallel: unknown data parallelism 'zero3'; choose one of ddp, fsdp"),
        ({"train.parallel": "fsdp"}, "set model.pad_vocab_multiple=64 (50304 rows"),
        ({"train.fsdp_cpu_offload": True}, "train.fsdp_cpu_offload: only applies with train.parallel=fsdp"),
        ({"train.parallel": "fsdp", "model.pad_vocab_multiple": 64, "train.precision": "fp16"}, "use bf16 or fp32"),
        ({"train.activation_checkpointing": "yes"}, "train.activation_checkpointing: must be true or false"),
    ],
)
def test_bad_parallel_settings_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        JobConfig.from_dict(raw)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "5"], "shards the 50304-row token embedding across 5 workers, which do not divide it"),
        (["--set", "train.parallel=zero"], "train.parallel: unknown data parallelism 'zero'; choose one of ddp, fsdp"),
        (["--set", "model.pad_vocab_multiple=1"], "set model.pad_vocab_multiple=64"),
    ],
)
def test_the_fsdp_study_refuses_bad_settings_before_anything_starts(capsys, args, message):
    from orchestrator.cli import main

    assert main(["run", str(REPO / "experiments" / "gpt2_xl_fsdp.py"), "--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trial 000_lr=0.0006: ") and message in err, err


def test_uneven_ranks_sit_out_no_evaluation_round():
    loader = torch.utils.data.DataLoader([(torch.tensor([i]), torch.tensor([i])) for i in range(3)], batch_size=2)
    rounds = list(lockstep(loader, 3))
    assert [counted for _, _, counted in rounds] == [True, True, False]
    assert torch.equal(rounds[2][0], rounds[1][0])  # the last batch again, not counted
    empty = torch.utils.data.DataLoader([(torch.tensor([7]), torch.tensor([8]))], batch_size=1, sampler=[])
    ((x, _y, counted),) = list(lockstep(empty, 1))
    assert not counted and x.tolist() == [[7]]
