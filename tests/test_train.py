import math

import pytest
import torch

from gptcore.evaluation import evaluate
from gptcore.hooks import Hooks
from gptcore.optimizer import configure_optimizer, learning_rate
from gptcore.runtime import resolve_precision
from gptcore.train import build_model, train

from .conftest import tiny_job


class Recorder(Hooks):
    def __init__(self):
        self.steps, self.evals, self.samples, self.saves, self.started, self.ended = [], [], [], 0, 0, None

    def on_train_start(self, ctx, state):
        self.started += 1

    def on_step(self, ctx, state, metrics):
        self.steps.append((state.step, metrics))

    def on_eval(self, ctx, state, metrics, sample, save):
        self.evals.append((state.step, metrics))
        self.samples.append(sample)
        self.saves += save is not None

    def on_train_end(self, ctx, state, result):
        self.ended = result


def test_weight_decay_only_on_2d_weights():
    job = tiny_job(model={"tie_weights": False, "freeze_token_embeddings": True})
    model, _ = build_model(job, torch.device("cpu"))
    decay, no_decay = configure_optimizer(model, job, torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert all(p is not model.tok_emb.weight for p in decay["params"])  # frozen: not optimized


def test_warmup_then_cosine():
    job = tiny_job(train={"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10})
    assert learning_rate(0, 100, job) == pytest.approx(1e-4)
    assert learning_rate(9, 100, job) == pytest.approx(1e-3)
    assert learning_rate(55, 100, job) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert learning_rate(100, 100, job) == pytest.approx(1e-4)
    constant = tiny_job(train={"lr": 1e-3, "lr_schedule": "constant"})
    assert learning_rate(77, 100, constant) == 1e-3


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("fp32", cpu, "train") is None
    assert resolve_precision("bf16", cpu, "sample") is torch.bfloat16
    assert resolve_precision("fp16", cuda, "train") is torch.float16


def test_evaluate_uses_eval_mode_and_no_grad():
    job = tiny_job(model={"dropout": 0.5})
    model, _ = build_model(job, torch.device("cpu"))
    batches = [(torch.randint(0, 50257, (2, 8)), torch.randint(0, 50257, (2, 8)))] * 3
    forwards = []  # (grad enabled, training mode) in each forward
    model.register_forward_hook(lambda module, args, out: forwards.append((torch.is_grad_enabled(), module.training)))
    a = evaluate(model, batches, 3, torch.device("cpu"), None)
    b = evaluate(model, batches, 3, torch.device("cpu"), None)
    assert forwards == [(False, False)] * 6  # no autograd graph, eval mode, in every forward
    assert a == b and model.training  # deterministic (no dropout) and the mode is restored


def test_train_calls_hooks_and_counts_tokens():
    rec = Recorder()
    result = train(tiny_job(train={"max_steps": 6, "eval_every": 3}), rec)
    assert result.status == "finished" and result.state.step == 6
    assert [s for s, _ in rec.steps] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in rec.evals] == [3, 6]
    assert rec.saves == 1  # the last evaluation is a checkpoint point
    assert result.state.tokens_seen == 6 * 4 * 32
    assert rec.samples[-1].startswith("Every effort moves you")
    assert {"loss", "lr", "tokens_seen", "tokens_per_sec", "grad_norm", "epoch"} <= set(rec.steps[0][1])
    assert {"train_loss", "val_loss", "val_perplexity", "best_val_loss"} <= set(rec.evals[0][1])
    assert result.state.seed == 123 and rec.started == 1 and rec.ended is result


def test_training_reduces_loss():
    result = train(tiny_job(train={"max_steps": 30, "eval_every": 30, "lr": 1e-2, "batch_size": 8}))
    first = tiny_job(train={"max_steps": 1, "eval_every": 1, "lr": 1e-2, "batch_size": 8})
    assert result.metrics["train_loss"] < train(first).metrics["train_loss"] - 1.0


def test_same_seed_same_run():
    a = train(tiny_job(train={"precision": "fp32"}))
    b = train(tiny_job(train={"precision": "fp32"}))
    assert a.metrics["val_loss"] == b.metrics["val_loss"]


class MicroBatches(Recorder):
    """Records every training forward's loss (one per micro-batch) and the parameters at the end."""

    def __init__(self):
        super().__init__()
        self.micro_losses, self.params = [], None

    def on_train_start(self, ctx, state):
        def record(module, args, kwargs, output):
            if module.training and kwargs.get("targets") is not None:
                self.micro_losses.append(output.item())

        ctx.model.register_forward_hook(record, with_kwargs=True)

    def on_train_end(self, ctx, state, result):
        self.params = {k: v.detach().clone() for k, v in ctx.model.named_parameters()}


def test_gradient_accumulation_matches_a_larger_batch():
    """3 micro-batches of 2 make the same optimizer step as one batch of 6 (fp32, no dropout, same windows), and
    the logged step loss is the mean of the micro-batch losses, not their sum."""
    common = {"precision": "fp32", "max_steps": 1, "eval_iters": 1, "sample_max_new_tokens": 0}
    big, acc = MicroBatches(), MicroBatches()
    # same data order: the sampler shuffles windows, micro-batches are consecutive slices of it
    big_result = train(tiny_job(train={**common, "batch_size": 6, "grad_accum_steps": 1}), big)
    acc_result = train(tiny_job(train={**common, "batch_size": 2, "grad_accum_steps": 3}), acc)
    assert big_result.state.tokens_seen == acc_result.state.tokens_seen == 6 * 32
    assert len(big.micro_losses) == 1 and len(acc.micro_losses) == 3
    (_, big_step), (_, acc_step) = big.steps[0], acc.steps[0]
    assert acc_step["loss"] == pytest.approx(sum(acc.micro_losses) / 3, rel=1e-6)
    assert acc_step["loss"] == pytest.approx(big_step["loss"], rel=1e-6)
    # AdamW's step barely changes when the gradient is scaled, so a summed (k times too large) gradient shows in
    # grad_norm (taken before clipping), not in the parameters; these catch a gradient with the wrong direction
    assert acc_step["grad_norm"] == pytest.approx(big_step["grad_norm"], rel=1e-5)
    for name, value in big.params.items():
        torch.testing.assert_close(acc.params[name], value, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_epochs_and_checkpoint_points():
    rec = Recorder()
    job = tiny_job(
        model={"preset": "micro", "context_length": 256},
        data={"stride": 256},
        train={"batch_size": 2, "max_steps": None, "epochs": 2, "eval_every": 0},
    )
    result = train(job, rec)
    assert result.state.step == 2 * 9 and result.state.epoch == 2
    assert [s for s, _ in rec.evals] == [9, 18] and rec.saves == 2  # end of each epoch


def test_epoch_checkpoints_wait_for_the_next_evaluation():
    """Once an epoch, at the first scheduled evaluation from the epoch's end: no evaluation is added for it."""
    rec = CheckpointSteps()
    job = tiny_job(
        model={"preset": "micro", "context_length": 256},
        data={"stride": 256},
        train={"batch_size": 2, "max_steps": None, "epochs": 3, "eval_every": 5},  # 9 steps an epoch
    )
    result = train(job, rec)
    assert result.state.step == 27
    assert [s for s, _ in rec.evals] == [5, 10, 15, 20, 25, 27]  # the last step is always evaluated
    assert rec.checkpoints == [(10, 1, 2), (20, 2, 4), (27, 3, 0)]  # (step, epoch, windows into the epoch)


class CheckpointSteps(Recorder):
    def __init__(self):
        super().__init__()
        self.checkpoints = []

    def on_eval(self, ctx, state, metrics, sample, save):
        super().on_eval(ctx, state, metrics, sample, save)
        if save is not None:
            self.checkpoints.append((state.step, state.epoch, state.samples_in_epoch))


def test_divergence_stops_with_status():
    result = train(tiny_job(train={"lr": 1e6, "grad_clip": 0.0, "max_steps": 50, "precision": "fp32"}))
    assert result.status == "diverged" and result.state.step < 50
    assert not math.isfinite(result.metrics["loss"])


def step_losses(job, resume_from=None):
    rec = Recorder()
    train(job, rec, resume_from=resume_from)
    return [metrics["loss"] for _, metrics in rec.steps]


def test_evaluations_and_resumes_leave_the_training_steps_unchanged(tmp_path):
    """With dropout on, neither the evaluation cadence nor a resume changes any training step's loss."""
    common = {"precision": "fp32", "max_steps": 6, "lr_schedule": "constant"}  # same lr whatever the length
    every2 = step_losses(tiny_job(model={"dropout": 0.2}, train={**common, "eval_every": 2}))
    every5 = step_losses(tiny_job(model={"dropout": 0.2}, train={**common, "eval_every": 5}))
    assert every2 == every5

    first = tiny_job(model={"dropout": 0.2}, train={**common, "max_steps": 4, "eval_every": 2, "checkpoint_every": 4})
    from gptcore.hooks import LocalCheckpoints

    train(first, LocalCheckpoints(tmp_path))
    resumed = step_losses(tiny_job(model={"dropout": 0.2}, train={**common, "eval_every": 2}), tmp_path / "latest")
    assert resumed == every2[4:]


def schedule_points(steps: int, epoch_steps: int, **train) -> list[tuple[int, bool, bool]]:
    """(step, evaluate, checkpoint) at every step where something happens, epochs of ``epoch_steps``."""
    from gptcore.checkpointing import CheckpointManager

    job, cpu = tiny_job(train=train), torch.device("cpu")
    model, _ = build_model(job, cpu)
    schedule = CheckpointManager(
        job, model, configure_optimizer(model, job, cpu), torch.amp.GradScaler(enabled=False), cpu
    )
    points = []
    for step in range(1, steps + 1):
        evaluate, checkpoint = schedule.after_step(step, epoch_end=step % epoch_steps == 0, last=step == steps)
        if evaluate or checkpoint:
            points.append((step, evaluate, checkpoint))
    return points


def test_checkpoints_every_n_steps_and_at_the_end():
    assert schedule_points(12, 9, eval_every=4, checkpoint_every=5) == [
        (4, True, False),
        (5, True, True),  # a checkpoint is always evaluated (its metrics pick the best one)
        (8, True, False),
        (10, True, True),
        (12, True, True),
    ]


def test_an_epoch_checkpoint_waits_for_the_next_evaluation():
    assert schedule_points(20, 9, eval_every=5) == [
        (5, True, False),
        (10, True, True),  # epoch 1 ended at step 9: saved at the evaluation of step 10, no extra evaluation
        (15, True, False),
        (20, True, True),  # epoch 2 ended at step 18, and step 20 is the last
    ]


def test_without_evaluations_an_epoch_is_checkpointed_at_its_end():
    assert schedule_points(20, 9, eval_every=0) == [(9, True, True), (18, True, True), (20, True, True)]


def test_each_epoch_reads_the_windows_in_an_order_of_its_own():
    """With a learning rate too small to move the weights, a step's loss is its batch's alone: epochs read in one
    order would log the same losses, step for step."""
    job = tiny_job(
        train={"max_steps": None, "epochs": 2, "lr": 1e-12, "lr_schedule": "constant", "eval_every": 0},
    )
    recorder = Recorder()
    train(job, recorder, device="cpu")
    losses = [metrics["loss"] for _, metrics in recorder.steps]
    half = len(losses) // 2
    first, second = losses[:half], losses[half:]
    assert len(first) == len(second) > 4
    assert max(abs(a - b) for a, b in zip(first, second, strict=True)) > 1e-2, (first, second)
    # the same windows, seen again: the epoch's mean loss is the same, but for batches grouped otherwise
    assert sum(second) / half == pytest.approx(sum(first) / half, rel=1e-3)
