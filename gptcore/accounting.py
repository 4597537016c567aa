"""What a run costs before it runs: the model's parameters and training FLOPs per token, and the run's length.

FLOPs follow PaLM's convention (Chowdhery et al. 2022, appendix B), the one MFU is quoted in by nanoGPT and
torchtitan: 6 FLOPs per token for every weight of a matmul (forward 2, backward 4) — the blocks' linear layers and
the LM head; not the embedding lookups, biases or norms, which are no matmuls — plus 12 · n_layers · d_model · T for
attention's two T x T products (scores and values, forward and backward, over the whole window: causal masking is
not subtracted). That is exactly what PyTorch's FLOP counter counts for a training step (tests/test_accounting.py).
Kaplan et al. (2020) count 6 · n_layers · d_model · T for attention and no head; Chinchilla counts the embeddings
too. With one convention here and everywhere (MFU, the plan of a sweep, the scaling fit's compute), figures stay
comparable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptcore.config import GPTConfig, JobConfig


@dataclass(frozen=True)
class ParamCount:
    """The parameters of a GPT (a tied head counted once, as ``GPT.num_params`` counts them)."""

    total: int
    embedding: int  # the token embedding and a learned position embedding
    matmul: int  # the weights of the matmuls every token goes through: the blocks' linear layers and the LM head

    @property
    def non_embedding(self) -> int:
        """Kaplan et al.'s N: everything but the embeddings (with a tied head, the head is the embedding)."""
        return self.total - self.embedding


def param_count(c: GPTConfig) -> ParamCount:
    """The parameter counts of the GPT ``c`` describes, without building it."""
    d, hidden = c.d_model, c.mlp_ratio * c.d_model
    linear_bias, norm = (1 if c.bias else 0), (2 if c.bias else 1) * d  # a LayerNorm: weight, and bias if any
    attention = d * 3 * d + (3 * d if c.qkv_bias else 0) + d * d + linear_bias * d
    mlp = d * hidden + linear_bias * hidden + hidden * d + linear_bias * d
    blocks = c.n_layers * (2 * norm + attention + mlp)
    block_matmuls = c.n_layers * (4 * d * d + 2 * d * hidden)  # qkv, attention output, MLP in and out
    tokens = c.padded_vocab_size * d
    positions = c.context_length * d if c.pos_emb == "learned" else 0
    head = tokens  # the head has the embedding's shape, tied or not
    return ParamCount(
        total=tokens + positions + blocks + norm + (0 if c.tie_weights else head),
        embedding=tokens + positions,
        matmul=block_matmuls + head,
    )


def training_flops_per_token(c: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token of windows of ``seq_len`` tokens (default: the context): 6 N + 12 L d T."""
    t = seq_len or c.context_length
    return 6.0 * param_count(c).matmul + 12.0 * c.n_layers * c.d_model * t


def training_flops(c: GPTConfig, tokens: float, seq_len: int | None = None) -> float:
    """The FLOPs of training on ``tokens`` tokens."""
    return training_flops_per_token(c, seq_len) * tokens


@dataclass(frozen=True)
class RunLength:
    """How long a run trains: its epochs' batches and optimizer steps, and the tokens it sees."""

    batches_per_epoch: int  # global batches (every worker's micro-batch) in one epoch
    steps_per_epoch: int  # optimizer steps: the last one of an epoch may take fewer micro-batches
    total_steps: int
    tokens: int


def step_flops(job: JobConfig, world_size: int = 1) -> float:
    """The training FLOPs of one full optimizer step: every worker's micro-batches of windows."""
    return training_flops(job.model, job.train.windows_per_step(world_size) * job.model.context_length)


def budget_steps(job: JobConfig, world_size: int = 1) -> int | None:
    """The full optimizer steps ``train.flops_budget`` buys (None without a budget); 0 when it buys none."""
    budget = job.train.flops_budget
    return None if budget is None else int(budget // step_flops(job, world_size))


def run_length(job: JobConfig, train_windows: int, world_size: int = 1) -> RunLength:
    """The length of ``job`` on a train split of ``train_windows`` windows, on ``world_size`` workers.

    Every worker reads ``train.batch_size`` windows per micro-batch; an optimizer step takes
    ``train.accumulation_steps(world_size)`` micro-batches, fewer at an epoch's end; the run ends after
    ``train.epochs``, ``train.max_steps`` or the steps ``train.flops_budget`` buys, whichever comes first.
    """
    t = job.train
    global_batch = t.batch_size * world_size
    batches = train_windows // global_batch
    if batches == 0:
        raise ValueError(
            f"the train split has {train_windows} windows, fewer than train.batch_size={t.batch_size} x "
            f"{world_size} worker(s); lower train.batch_size or data.stride, or use a larger corpus"
        )
    accumulation = t.accumulation_steps(world_size)
    steps_per_epoch = math.ceil(batches / accumulation)
    limits = [t.epochs * steps_per_epoch, *([t.max_steps] if t.max_steps else [])]
    bought = budget_steps(job, world_size)
    if bought == 0:
        raise ValueError(
            f"train.flops_budget={t.flops_budget:.3g} buys no optimizer step: one step of this model, "
            f"train.batch_size={t.batch_size} x {world_size} worker(s) x context {job.model.context_length}, is "
            f"{step_flops(job, world_size):.3g} FLOPs; raise the budget, or shrink the model or the batch"
        )
    total_steps = min(limits + ([bought] if bought is not None else []))
    epochs, steps_left = divmod(total_steps, steps_per_epoch)
    micro_batches = epochs * batches + min(steps_left * accumulation, batches)
    return RunLength(batches, steps_per_epoch, total_steps, micro_batches * global_batch * job.model.context_length)
