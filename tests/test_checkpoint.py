import json

import pytest
import torch

from gptcore.checkpoint import load_checkpoint, load_model
from gptcore.checkpoint_format import CheckpointError, TrainState
from gptcore.checkpoint_whole import save_checkpoint
from gptcore.data import build_datasets, make_loader
from gptcore.hooks import Hooks, LocalCheckpoints
from gptcore.model import lm_loss
from gptcore.optimizer import configure_optimizer
from gptcore.parallel import leave_process_group
from gptcore.train import build_model, train

from .conftest import tiny_job


def next_step_loss(model, optimizer, batch):
    x, y = batch
    optimizer.zero_grad()
    loss = lm_loss(model(x), y)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return lm_loss(model(x), y).item()


def test_round_trip_restores_identical_next_step_loss(tmp_path):
    job = tiny_job(train={"precision": "fp32"})
    torch.manual_seed(0)
    model, _ = build_model(job, torch.device("cpu"))
    optimizer = configure_optimizer(model, job, torch.device("cpu"))
    train_ds, _ = build_datasets(job)
    batch = next(iter(make_loader(train_ds, 4, shuffle=False, drop_last=True)))
    next_step_loss(model, optimizer, batch)  # optimizer moments exist
    from gptcore.checkpoint_format import TrainState

    save_checkpoint(tmp_path / "ck", model=model, config=job, state=TrainState(step=1), optimizer=optimizer)
    expected = next_step_loss(model, optimizer, batch)

    ckpt = load_checkpoint(tmp_path / "ck")
    model2, _ = build_model(ckpt.config, torch.device("cpu"))
    from gptcore.checkpoint import load_model_weights

    load_model_weights(model2, ckpt.model_state)
    optimizer2 = configure_optimizer(model2, ckpt.config, torch.device("cpu"))
    optimizer2.load_state_dict(ckpt.optimizer_state)
    assert ckpt.state.step == 1
    assert next_step_loss(model2, optimizer2, batch) == expected


def test_tied_head_is_saved_once_and_retied(tmp_path):
    job = tiny_job(model={"tie_weights": True})
    model, _ = build_model(job, torch.device("cpu"))
    from gptcore.checkpoint_format import TrainState

    save_checkpoint(tmp_path / "ck", model=model, config=job, state=TrainState())
    loaded, _ = load_model(tmp_path / "ck")
    assert loaded.head.weight is loaded.tok_emb.weight
    assert torch.equal(loaded.tok_emb.weight, model.tok_emb.weight)


def test_resume_continues_steps_and_tokens(tmp_path):
    job = tiny_job(train={"max_steps": 4, "eval_every": 2, "checkpoint_every": 2})
    first = train(job, LocalCheckpoints(tmp_path))
    assert first.state.step == 4
    longer = tiny_job(train={"max_steps": 6, "eval_every": 2, "checkpoint_every": 2})
    resumed = train(longer, resume_from=tmp_path / "latest")
    assert resumed.state.step == 6
    assert resumed.state.tokens_seen == 6 * 4 * 32


class BackgroundSaves(Hooks):
    """Starts a background write at every checkpoint point and remembers the weights at that moment."""

    def __init__(self, directory):
        self.directory, self.written = directory, []

    def on_eval(self, ctx, state, metrics, sample, save):
        if save is not None:
            weights = {k: v.clone() for k, v in ctx.model.state_dict().items()}
            self.written.append((state.step, save.start(self.directory / f"step{state.step}"), weights))


def test_background_checkpoints_hold_the_state_of_their_step(tmp_path):
    """Training goes on while a checkpoint is written; each holds its own step's weights, all on disk at the end."""
    hooks = BackgroundSaves(tmp_path)
    result = train(tiny_job(train={"max_steps": 6, "eval_every": 2, "checkpoint_every": 2}), hooks)
    assert [step for step, _, _ in hooks.written] == [2, 4, 6]
    for step, future, weights in hooks.written:
        assert future.done() and future.result() == tmp_path / f"step{step}"  # train() waited for every write
        ckpt = load_checkpoint(tmp_path / f"step{step}")
        assert ckpt.state.step == step and ckpt.optimizer_state is not None
        assert all(torch.equal(ckpt.model_state[k], weights[k]) for k in ckpt.model_state)
    resumed = train(tiny_job(train={"max_steps": 8, "eval_every": 2}), resume_from=tmp_path / "step6")
    assert resumed.state.step == 8 and result.state.step == 6


def make_checkpoint(tmp_path):
    job = tiny_job()
    model, _ = build_model(job, torch.device("cpu"))
    from gptcore.checkpoint_format import TrainState

    return save_checkpoint(tmp_path / "ck", model=model, config=job, state=TrainState())


def test_truncated_weights_are_reported(tmp_path):
    path = make_checkpoint(tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_corrupt_metadata_is_reported(tmp_path):
    path = make_checkpoint(tmp_path)
    (path / "meta.json").write_text('{"format": "gptcore-check')
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a gptcore checkpoint"):
        load_model(tmp_path)


def test_other_architecture_names_the_parameter(tmp_path):
    path = make_checkpoint(tmp_path)
    meta = json.loads((path / "meta.json").read_text())
    meta["config"]["model"]["d_model"] = 64
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"parameter \S+ has shape \(32,?.*\), the model expects \(64,?.*\)"):
        load_model(path)


def test_resume_into_another_architecture_is_refused(tmp_path):
    path = make_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match=r"another architecture.*model\.n_layers"):
        train(tiny_job(model={"n_layers": 2}), resume_from=path)


def test_no_pickle_in_checkpoint_files(tmp_path, monkeypatch):
    """Safetensors and JSON only, and loading one back unpickles nothing."""
    import pickle

    from safetensors import safe_open

    path = make_checkpoint(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optimizer.safetensors"]
    for name in ("model.safetensors", "optimizer.safetensors"):
        with safe_open(path / name, framework="pt") as f:  # a safetensors header, then raw tensor bytes
            assert list(f.keys())
    json.loads((path / "meta.json").read_text())

    def unpickle(*args, **kwargs):
        raise AssertionError("a checkpoint load unpickled something")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(module, name, unpickle)
    ckpt = load_checkpoint(path)
    assert ckpt.model_state and ckpt.rng


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path)
    before = (path / "model.safetensors").read_bytes()
    job = tiny_job()
    model, _ = build_model(job, torch.device("cpu"))
    import gptcore.files

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gptcore.files, "replace_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, config=job, state=TrainState())
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folder left behind
    load_model(path)


# --------------------------------------------------------------------------- resume under DDP


def _ddp_resume_worker(rank: int, world_size: int, tmp: str) -> None:
    """One of ``world_size`` gloo ranks: an uninterrupted run, then a run stopped at step 4 and resumed."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    try:
        common = {"precision": "fp32", "lr_schedule": "constant", "eval_every": 2, "eval_iters": 1}
        common |= {"num_threads": 1, "sample_max_new_tokens": 0}

        def job(**train_section):
            return tiny_job(model={"dropout": 0.3}, train={**common, **train_section})

        run = dict(rank=rank, world_size=world_size, device="cpu", wrap_model=DistributedDataParallel)

        def losses(config, resume_from=None):
            rec = StepLosses()
            train(config, rec, resume_from=resume_from, **run)
            return rec.losses

        full = losses(job(max_steps=6))
        train(job(max_steps=4, checkpoint_every=4), LocalCheckpoints(f"{tmp}/ck"), **run)
        dist.barrier()  # rank 0's checkpoint is on disk before any rank reads it
        resumed = losses(job(max_steps=6), f"{tmp}/ck/latest")
        with open(f"{tmp}/rank{rank}.json", "w") as f:
            json.dump({"full": full, "resumed": resumed}, f)
        dist.barrier()  # neither rank leaves the group while the other may still use it
    finally:
        leave_process_group()


class StepLosses(Hooks):
    def __init__(self):
        self.losses = []

    def on_step(self, ctx, state, metrics):
        self.losses.append(metrics["loss"])


def test_ddp_resume_restores_every_ranks_rng_state(tmp_path):
    """With dropout on, 2 DDP ranks (seeded seed + rank) resumed from a checkpoint take the same steps as an
    uninterrupted run: each rank gets its own RNG state back, not rank 0's. (The logged loss is the mean over
    the ranks, so rank 1's dropout masks show in it.)"""
    import torch.multiprocessing as mp

    build_datasets(tiny_job())  # the corpus is tokenized once, before the ranks read it
    mp.spawn(_ddp_resume_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(out["full"]) == 6 and out["resumed"] == out["full"][4:], f"rank {rank}: {out}"
    ckpt = load_checkpoint(tmp_path / "ck" / "latest")
    assert {"rng.rank0.cpu", "rng.rank1.cpu"} <= set(ckpt.rng)
    assert not torch.equal(ckpt.rng["rng.rank0.cpu"], ckpt.rng["rng.rank1.cpu"])


def test_each_rank_restores_its_own_rng_state():
    """Per-rank states go to their ranks; an older checkpoint's single state to every rank; a rank the checkpoint
    has no state for (more ranks than saved) re-seeds with its seed, and says so."""
    from gptcore.checkpoint_rng import restore_rng, rng_tensors

    def state_after(seed):
        torch.manual_seed(seed)
        return torch.get_rng_state()

    saved = rng_tensors([{"cpu": state_after(10)}, {"cpu": state_after(11)}])
    assert sorted(saved) == ["rng.rank0.cpu", "rng.rank1.cpu"]
    for rank, seed in [(0, 10), (1, 11)]:
        torch.manual_seed(99)
        restore_rng(saved, rank=rank, seed=123 + rank)
        assert torch.equal(torch.get_rng_state(), state_after(seed))
    with pytest.warns(UserWarning, match="RNG states of 2 rank.*none for rank 2: rank 2 re-seeds with 125"):
        restore_rng(saved, rank=2, seed=125)
    assert torch.initial_seed() == 125 and torch.equal(torch.get_rng_state(), state_after(125))
    for rank in (0, 1):  # a checkpoint from before per-rank states
        torch.manual_seed(99)
        restore_rng({"rng.cpu": state_after(7)}, rank=rank, seed=123 + rank)
        assert torch.equal(torch.get_rng_state(), state_after(7))


def test_a_checkpoint_resumes_only_on_the_dataset_it_was_taken_on(tmp_path):
    from gptcore.checkpoint import check_resumable, load_checkpoint
    from gptcore.checkpoint_format import CheckpointError, TrainState
    from gptcore.checkpoint_whole import save_checkpoint
    from gptcore.model import GPT

    job = tiny_job()
    path = save_checkpoint(tmp_path / "ckpt", model=GPT(job.model), config=job, state=TrainState(data_key="abc"))
    check_resumable(load_checkpoint(path), job, "abc")
    with pytest.raises(CheckpointError, match="taken on dataset abc, this run reads dataset xyz"):
        check_resumable(load_checkpoint(path), job, "xyz")


def test_init_from_names_a_checkpoint_a_folder_or_a_hub_model(tmp_path):
    from gptcore.checkpoint import init_source_kind
    from gptcore.checkpoint_format import TrainState
    from gptcore.checkpoint_whole import save_checkpoint
    from gptcore.model import GPT

    job = tiny_job()
    save_checkpoint(tmp_path / "ckpt", model=GPT(job.model), config=job, state=TrainState())
    kinds = ["scratch", str(tmp_path / "ckpt"), str(tmp_path), "./missing", "gpt2", "openai-community/gpt2"]
    assert [init_source_kind(k) for k in kinds] == ["scratch", "checkpoint", "folder", "folder", "hub", "hub"]
