import json

import pytest
import torch

from gptcore.checkpoint import CheckpointError, load_checkpoint, load_model, save_checkpoint
from gptcore.data import build_datasets, make_loader
from gptcore.model import lm_loss
from gptcore.train import Hooks, LocalCheckpoints, build_model, configure_optimizer, train

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
    from gptcore.checkpoint import TrainState

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
    from gptcore.checkpoint import TrainState

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
    from gptcore.checkpoint import TrainState

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


def test_no_pickle_in_checkpoint_files(tmp_path):
    path = make_checkpoint(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "optimizer.safetensors"]


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = make_checkpoint(tmp_path)
    before = (path / "model.safetensors").read_bytes()
    job = tiny_job()
    model, _ = build_model(job, torch.device("cpu"))
    import gptcore.checkpoint as ck

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "_replace_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, config=job, state=ck.TrainState())
    assert (path / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folder left behind
    load_model(path)
