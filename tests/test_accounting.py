"""What a model costs, counted from its config: parameters as the built model has them, FLOPs as PyTorch counts them."""

import dataclasses

import psutil
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gptcore.accounting import (
    budget_steps,
    param_count,
    run_length,
    step_flops,
    training_flops,
    training_flops_per_token,
)
from gptcore.config import PRESETS, model_config
from gptcore.model import GPT

VARIANTS = [
    {},
    {"tie_weights": False},
    {"bias": False, "qkv_bias": False},
    {"pos_emb": "rope", "pad_vocab_multiple": 64},
    {"pos_emb": "sinusoidal", "mlp_ratio": 2, "freeze_token_embeddings": True},
]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "default")
def test_param_count_is_the_built_models(preset, variant):
    config = dataclasses.replace(model_config(preset), **variant)
    with torch.device("meta"):
        model = GPT(config)
    counts = param_count(config)
    assert counts.total == model.num_params()
    embeddings = model.tok_emb.weight.numel() + (model.pos_emb.weight.numel() if config.pos_emb == "learned" else 0)
    assert counts.embedding == embeddings and counts.non_embedding == counts.total - embeddings
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert counts.matmul == sum(w.numel() for w in linears)  # a tied head counted here, as it does a matmul


@pytest.mark.parametrize(
    ("preset", "context", "batch"),
    [("micro", 64, 2), ("tiny", 32, 3)],
)
def test_training_flops_per_token_count_the_models_matmuls(preset, context, batch):
    """One training step's matmuls (forward and backward, attention in PyTorch's math kernel, which the counter
    sees) are exactly the formula's FLOPs per token times the tokens."""
    config = dataclasses.replace(model_config(preset), context_length=context, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(config)
    x = torch.randint(0, config.vocab_size, (batch, context))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, targets=x).backward()
    assert counter.get_total_flops() == training_flops_per_token(config) * batch * context
    assert training_flops(config, batch * context) == counter.get_total_flops()


def test_attention_flops_grow_with_the_window():
    config = model_config("gpt2-small")
    short, long = training_flops_per_token(config, 256), training_flops_per_token(config, 1024)
    assert long - short == 12 * config.n_layers * config.d_model * (1024 - 256)
    assert training_flops_per_token(config) == long  # the context by default


def test_run_length_is_what_the_loop_trains_on():
    """Steps and tokens as `train` counts them, an epoch's last step taking fewer micro-batches."""
    from gptcore.data import build_datasets
    from gptcore.train import train

    from .conftest import tiny_job

    job = tiny_job(train={"grad_accum_steps": 5, "epochs": 2, "max_steps": None, "eval_every": 0})
    windows = len(build_datasets(job)[0])
    length = run_length(job, windows)
    assert length.batches_per_epoch % 5  # so the epoch's last step is short
    result = train(job)
    assert (result.state.step, result.state.tokens_seen) == (length.total_steps, length.tokens)
    capped = tiny_job(train={"grad_accum_steps": 5, "epochs": 2, "max_steps": length.steps_per_epoch + 1})
    assert run_length(capped, windows).tokens == (length.batches_per_epoch + 5) * 4 * job.model.context_length


@pytest.mark.parametrize("bf16_faster", [True, False])
def test_the_dry_run_says_what_each_trial_costs(capsys, tmp_path, monkeypatch, bf16_faster):
    """The main job's plan: parameters, steps, tokens, FLOPs and peak memory of each trial, before anything runs; the
    memory at the precision ``auto`` trains in on this machine (bf16 where it measured faster)."""
    from gptcore.memory import peak_memory
    from orchestrator.cli import main
    from orchestrator.experiment import expand_trials, load_experiment

    from .conftest import REPO, cache_precision_timings

    monkeypatch.setenv("GPTCORE_CACHE_DIR", str(tmp_path))
    cache_precision_timings(tmp_path, train=(2.0, 1.0) if bf16_faster else (1.0, 2.0))
    experiment = load_experiment(REPO / "experiments" / "stride_sweep.py")
    job = expand_trials(experiment, {})[0].job  # both trials: one model, batch and precision
    assert main(["run", str(REPO / "experiments" / "stride_sweep.py"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("trial ")))
    columns = ["trial", "data.stride", "model", "params", "length", "steps", "tokens", "FLOPs", "memory/worker"]
    assert lines[header].split() == columns
    config = model_config("gpt2-small")
    rows = {line.split()[0]: line.split() for line in lines[header + 1 : header + 3]}
    for trial, steps, tokens in [("000_stride=256", 90, 46_080), ("001_stride=128", 170, 87_040)]:
        row = rows[trial]
        assert row[row.index("epoch(s)") + 1 : -2] == [
            str(steps),
            f"{tokens / 1e3:.3g}k",
            f"{training_flops(dataclasses.replace(config, context_length=256), tokens):.2e}",
        ]
        assert row[-2:] == [f"{peak_memory(job, 1, bf16_faster=bf16_faster).total / 2**30:.2f}", "GiB"]
    have = psutil.virtual_memory().total / 2**30
    assert f"memory: this machine has {have:.1f} GiB; every trial fits" in lines


def test_the_dry_run_says_which_trials_do_not_fit_this_machine(capsys):
    """A local run's trials are sized against this machine: one that needs more memory is named, with the fix."""
    from orchestrator.cli import main

    from .conftest import REPO

    wide = ["--set", "model.d_model=1000000", "--set", "model.n_heads=1"]  # 10^11 parameters: 1.5 TiB to train
    argv = ["run", str(REPO / "experiments" / "stride_sweep.py"), "--dry-run", *wide]
    assert main(argv) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("memory: ")]
    assert "does not fit: 000_stride=256 needs " in line and ", 001_stride=128 needs " in line
    assert "lower train.batch_size" in line and "--address" in line
    # a cluster's nodes are not this machine: the dry run asks the cluster for them (tests/test_estimate.py)
    assert main([*argv, "--address", "127.0.0.1:1"]) == 2
    assert "error: Ray cluster at 127.0.0.1:1 is unreachable" in capsys.readouterr().err


def test_a_flops_budget_sets_the_run_and_its_schedule():
    """A trial spends its budget: the steps it buys, the cosine schedule ending at the last of them."""
    from gptcore.hooks import Hooks
    from gptcore.optimizer import learning_rate
    from gptcore.train import train

    from .conftest import tiny_job

    job = tiny_job(train={"flops_budget": 2e10, "epochs": 100, "max_steps": None, "eval_every": 0, "min_lr": 1e-5})
    steps = budget_steps(job)
    assert steps == int(2e10 // step_flops(job)) and 3 <= steps <= 50

    class LearningRates(Hooks):
        def __init__(self):
            self.lrs = []

        def on_step(self, ctx, state, metrics):
            self.lrs.append(metrics["lr"])

    seen = LearningRates()
    result = train(job, seen)
    assert result.state.step == steps
    assert seen.lrs == [learning_rate(k, steps, job) for k in range(steps)]
    assert (
        training_flops(job.model, result.state.tokens_seen)
        <= 2e10
        < training_flops(job.model, result.state.tokens_seen + job.train.batch_size * job.model.context_length)
    )


LADDER = """
from orchestrator import Experiment, grid
EXPERIMENT = Experiment(name="ladder", corpus="the-verdict", model="micro", train={{"epochs": 100}},
                        grid={{"model.d_model": grid({sizes}), "train.flops_budget": grid({budgets})}})
"""


@pytest.mark.parametrize(
    ("sizes", "budgets", "message"),
    [
        ("32, 64, 96", "1e5, 1e12", "trial 000_d_model=32_flops_budget=100000: train.flops_budget=1e+05 buys no"),
        ("32, 64", "1e11, 1e12", "budget train.flops_budget=1e+11 has 2 model size(s); its iso-FLOP profile needs 3"),
    ],
)
def test_a_ladder_that_cannot_be_fitted_is_refused_before_anything_runs(tmp_path, capsys, sizes, budgets, message):
    from orchestrator.cli import main

    path = tmp_path / "ladder.py"
    path.write_text(LADDER.format(sizes=sizes, budgets=budgets))
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "ray_results").exists()
