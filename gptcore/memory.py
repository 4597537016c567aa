"""What a training run holds in memory at its peak, per worker, estimated from its `JobConfig` alone.

Arithmetic on the config, no torch: a driver that has not imported torch can size its workers with it. The estimate
is of live tensors, what the run's own allocations add to the process, in bytes:

- ``weights``: the fp32 master weights (a tied head counted once) and the position tables: 4 · params.
- ``gradients``: fp32, of the trainable parameters only (``model.freeze_token_embeddings`` freezes the token
  embedding, and with it a tied head): 4 · trainable.
- ``optimizer``: AdamW's two fp32 moments per trainable parameter: 8 · trainable.
- ``autocast``: under bf16/fp16 autocast every matmul weight and bias is cast once per forward and the copy kept
  for the backward: 2 · linear params (0 in fp32, and under FSDP, which gathers its parameters in that dtype).
- ``activations``: what the forward keeps for the backward, for ``train.batch_size`` windows of
  ``model.context_length`` tokens (one micro-batch), plus the loss's largest moment in the backward; see
  `activation_bytes`.
- ``parallel``: what data parallelism adds: DDP's gradient buckets, one more copy of the gradients (4 · trainable;
  ``world_size`` > 1 only: a single worker is not wrapped), or FSDP's unsharded parameters and gradients of the
  groups being computed; see `fsdp_unsharded_bytes`.

Under ``train.parallel="fsdp"`` weights, gradients and optimizer state are sharded: each is divided by
``world_size``. A step peaks at one of two moments: at the start of the backward, when every activation is held (and
the gradients too, if an earlier micro-batch of the step's accumulation left them), or at its end, when every
gradient is; ``total`` is the larger, over what lives throughout.

Approximations, each small next to the terms above: the eager model (``train.compile`` fuses some activations away);
no temporaries inside a block's backward; evaluation and sampling, which hold no gradients or saved activations,
stay below a training step. Allocator overhead is left out: on CPU, glibc under
`gptcore.runtime.keep_freed_memory_mapped` reuses kept blocks of mixed sizes with holes between them, and the
process's resident memory can reach well above this live peak (1.6-2x for the logits-dominated runs of
tests/test_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from gptcore.accounting import param_count
from gptcore.config import GPTConfig, JobConfig, resolved_precision

FP32 = 4  # bytes
AUTOCAST_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAMW_MOMENTS = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """The peak memory of one worker's training step, in bytes, by part (see the module docstring)."""

    weights: int
    gradients: int
    optimizer: int
    autocast: int
    activations: int
    parallel: int
    gradients_at_activation_peak: bool  # an earlier micro-batch's gradients are held while activations peak

    @property
    def total(self) -> int:
        """What lives throughout, plus the larger of the step's two peaks (activations or gradients)."""
        throughout = self.weights + self.optimizer + self.parallel
        backward_start = self.autocast + self.activations + (self.gradients if self.gradients_at_activation_peak else 0)
        return throughout + max(backward_start, self.gradients)


def peak_memory(
    job: JobConfig, world_size: int = 1, device_type: str = "cpu", *, bf16_faster: bool | None = None
) -> MemoryEstimate:
    """The estimated peak memory of each of ``world_size`` workers training ``job`` on ``device_type`` devices.

    ``bf16_faster`` says whether those devices train faster in bf16 (`gptcore.runtime.bf16_faster` of the device,
    "train"); it decides ``train.precision="auto"``, and must be given for it.
    """
    t, c = job.train, job.model
    if t.precision == "auto" and bf16_faster is None:
        raise ValueError(
            "train.precision=auto: pass bf16_faster (gptcore.runtime.bf16_faster of the device) to resolve it, "
            "or set train.precision"
        )
    precision = resolved_precision(t.precision, device_type, bool(bf16_faster))
    fsdp = t.parallel == "fsdp"
    shards = world_size if fsdp else 1
    trainable = trainable_params(c)
    return MemoryEstimate(
        weights=(FP32 * param_count(c).total + buffer_bytes(c)) // shards,
        gradients=FP32 * trainable // shards,
        optimizer=ADAMW_MOMENTS * FP32 * trainable // shards,
        autocast=0 if fsdp or precision == "fp32" else AUTOCAST_BYTES[precision] * linear_params(c),
        activations=activation_bytes(job, precision, device_type),
        parallel=parallel_bytes(job, world_size, precision),
        gradients_at_activation_peak=t.accumulation_steps(world_size) > 1,
    )


# --------------------------------------------------------------------------- parameters


def norm_params(c: GPTConfig) -> int:
    """One LayerNorm's parameters: weight, and bias if the model has biases."""
    return (2 if c.bias else 1) * c.d_model


def linear_params(c: GPTConfig) -> int:
    """The weights and biases of every matmul (the blocks' four and the head): what autocast casts."""
    return param_count(c).matmul - (2 * c.n_layers + 1) * norm_params(c)


def trainable_params(c: GPTConfig) -> int:
    """Parameters that get gradients: all but a frozen token embedding (and the head tied to it)."""
    frozen = c.padded_vocab_size * c.d_model if c.freeze_token_embeddings else 0
    return param_count(c).total - frozen


def block_params(c: GPTConfig) -> int:
    """The parameters of one transformer block."""
    n = param_count(c)
    head = c.padded_vocab_size * c.d_model
    return (n.matmul - norm_params(c) - head) // c.n_layers


def buffer_bytes(c: GPTConfig) -> int:
    """The position tables the model computes rather than learns (fp32): sinusoidal T x d, or RoPE's cos and sin."""
    if c.pos_emb == "sinusoidal":
        return FP32 * c.context_length * c.d_model
    if c.pos_emb == "rope":
        return FP32 * 2 * c.context_length * (c.head_dim // 2)
    return 0


def parallel_bytes(job: JobConfig, world_size: int, precision: str) -> int:
    """What data parallelism adds to each worker: FSDP's unsharded groups, or DDP's gradient buckets.

    DDP (Ray Train's ``prepare_model``, which the orchestrator wraps the model with when ``world_size`` > 1; a
    single worker is not wrapped) copies the gradients into buckets to all-reduce them: 4 · trainable.
    """
    if job.train.parallel == "fsdp":
        return fsdp_unsharded_bytes(job.model, precision)
    return FP32 * trainable_params(job.model) if world_size > 1 else 0


def fsdp_unsharded_bytes(c: GPTConfig, precision: str) -> int:
    """FSDP's full copies, in the compute dtype, of the groups being computed, and one group's unsharded gradient.

    The root group (embeddings, final norm, untied head) stays gathered from its forward to its backward (FSDP2 does
    not reshard the root after forward); one block is computed while the next is gathered (prefetch); a group's
    gradient is whole until it is reduce-scattered: p · (root + 2 · block) + 4 · max(root, block), p the compute
    dtype's bytes.
    """
    block = block_params(c)
    root = param_count(c).total - c.n_layers * block
    return AUTOCAST_BYTES[precision] * (root + 2 * block) + FP32 * max(root, block)


# --------------------------------------------------------------------------- activations


def activation_bytes(job: JobConfig, precision: str, device_type: str = "cpu") -> int:
    """Saved activations of one micro-batch plus the loss's backward peak, in bytes.

    With N = batch_size · context_length tokens, V the padded vocabulary:

    - L blocks of `block_activation_bytes` each; with ``train.activation_checkpointing`` only each block's fp32
      input (4 · N · d) is kept, and one block's activations are rebuilt while its backward runs (the loss's
      tensors are gone by then: the larger of the two counts).
    - Around the blocks: the token ids (8 · N), the embedding's dropout mask (N · d), the final norm's fp32 input
      and statistics (4 · N · d + 8 · N) and its output as the head's input (a · N · d).
    - The loss, computed in fp32 over the whole padded vocabulary: the forward keeps its log-probabilities
      (4 · N · V); the backward's first steps add the gradient of the log-probabilities and that of the logits
      (8 · N · V): 12 · N · V, whatever the autocast dtype. For small models this term dominates.
    """
    c, t = job.model, job.train
    n = t.batch_size * c.context_length
    a = AUTOCAST_BYTES[precision]
    block = block_activation_bytes(c, t.batch_size, a, device_type)
    around = 8 * n + FP32 * n * c.d_model + 2 * FP32 * n + a * n * c.d_model
    if c.dropout > 0:
        around += n * c.d_model
    loss = 3 * FP32 * n * c.padded_vocab_size
    if not t.activation_checkpointing:
        return c.n_layers * block + around + loss
    inputs = c.n_layers * FP32 * n * c.d_model
    return inputs + max(around + loss, block)


def block_activation_bytes(c: GPTConfig, batch_size: int, a: int, device_type: str = "cpu") -> int:
    """What one block's forward keeps for its backward, for ``batch_size`` windows; ``a``: the autocast bytes.

    With N tokens, d = d_model, h = mlp_ratio · d:

    - the fp32 residual stream at both LayerNorms (2 · 4 · N · d) and their mean and rstd (2 · 2 · 4 · N);
    - the inputs of the four matmuls, in the autocast dtype: a · (3 · N · d + N · h);
    - the GELU's input: a · N · h;
    - attention (`attention_bytes`), and with dropout its two masks, one byte per element (2 · N · d).
    """
    n, d = batch_size * c.context_length, c.d_model
    h = c.mlp_ratio * d
    total = 2 * FP32 * n * d + 2 * 2 * FP32 * n + a * (3 * n * d + n * h) + a * n * h
    total += attention_bytes(c, batch_size, a, device_type)
    if c.dropout > 0:
        total += 2 * n * d
    return total


def attention_bytes(c: GPTConfig, batch_size: int, a: int, device_type: str = "cpu") -> int:
    """What attention keeps for its backward, for ``batch_size`` windows; ``a``: the autocast bytes.

    Fused attention (``F.scaled_dot_product_attention``) keeps q, k and v (views of the fused projection's output,
    a · 3 · N · d), its output (a · N · d) and the log-sum-exp of every query (4 · B · heads · T); RoPE keeps the
    rotated q and k besides (2 · a · N · d). CPU training with dropout takes the written-out path
    (`gptcore.model.attention`): its two batched matmuls keep contiguous copies of q, k and v (a · 3 · N · d), and
    per head the T x T softmax, its dropout mask and the dropped weights ((2 · a + 1) · B · heads · T²), and the
    causal mask (T²).
    """
    n, d, heads, ctx = batch_size * c.context_length, c.d_model, c.n_heads, c.context_length
    if c.dropout > 0 and device_type == "cpu":
        return a * 3 * n * d + (2 * a + 1) * batch_size * heads * ctx * ctx + ctx * ctx
    rotated = 2 * a * n * d if c.pos_emb == "rope" else 0
    return a * 3 * n * d + rotated + a * n * d + FP32 * batch_size * heads * ctx
