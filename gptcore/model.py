"""A decoder-only GPT in one file: embeddings, pre-LN blocks, causal attention, LM head.

Parameter names and shapes follow GPT-2 (a fused ``qkv`` projection in q, k, v order,
LayerNorm eps 1e-5, tanh-GELU), so pretrained GPT-2 weights map one to one.
Positions are learned, sinusoidal or rotary (RoPE). A `KVCache` makes decoding incremental.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gptcore.config import GPTConfig

# --------------------------------------------------------------------------- loss


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over flattened (B*T, V) logits, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# --------------------------------------------------------------------------- positions


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


def rope_tables(n_positions: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, each (n_positions, head_dim // 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + d/2]) of a (B, H, T, d) tensor by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


# --------------------------------------------------------------------------- dropout and attention


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """A boolean mask, True with probability 1 - ``p`` (to 2^-16), from the default generator.

    Each 64-bit random word gives four 16-bit draws: a quarter of the generator calls, and
    about 4x faster on CPU than ``bernoulli_``, which draws one word per element.
    """
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over [-2^15, 2^15)
    return draws >= round(p * 65536) - 32768


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on CPU with the cheaper `keep_mask` (elsewhere ``F.dropout``)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x.mul(keep_mask(x.shape, p, x.device)).mul_(1.0 / (1.0 - p))


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def causal_mask(T: int, S: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, S) boolean mask: T queries, the last T of S positions, each see their own and earlier keys."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout on the attention weights.

    ``F.scaled_dot_product_attention`` everywhere but CPU training with dropout, where SDPA
    takes its fp32 math path anyway; that path is written out here to use `dropout`.
    """
    if dropout_p == 0.0 or q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)
    scores = (q.float() @ k.float().transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if is_causal:
        attn_mask = causal_mask(q.size(-2), k.size(-2), q.device)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = dropout(scores.softmax(dim=-1), dropout_p, training=True)
    return (weights @ v.float()).to(q.dtype)


# --------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far (B, H, max_len, head_dim)."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # tokens already cached
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's k, v for ``layer`` and return all keys and values so far."""
        B, H, T, D = k.shape
        if self.keys[layer] is None:
            self.keys[layer] = k.new_empty(B, H, self.max_len, D)
            self.values[layer] = v.new_empty(B, H, self.max_len, D)
        end = self.length + T
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# --------------------------------------------------------------------------- blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.qkv_bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: KVCache | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        # No mask needed for one new token attending to the whole cache; a causal mask
        # when queries and keys are the same positions; otherwise the caller's mask.
        is_causal = attn_mask is None and T > 1 and k.size(2) == T
        y = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0, is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, attn_mask=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


# --------------------------------------------------------------------------- GPT


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # Training forwards keep only each block's input and recompute its activations in the backward pass
        # (`torch.utils.checkpoint`, non-reentrant): activation memory of one block instead of all. A training setting,
        # not part of the architecture (`train.activation_checkpointing`); parameter names do not change.
        self.activation_checkpointing = False
        V, L, D = config.padded_vocab_size, config.context_length, config.d_model
        self.tok_emb = nn.Embedding(V, D)
        if config.pos_emb == "learned":
            self.pos_emb = nn.Embedding(L, D)
        elif config.pos_emb == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(L, D), persistent=False)
        else:
            cos, sin = rope_tables(L, config.head_dim, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.emb_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.ln_f = nn.LayerNorm(D, eps=config.layer_norm_eps, bias=config.bias)
        self.head = nn.Linear(D, V, bias=False)
        if config.tie_weights:
            self.head.weight = self.tok_emb.weight
        if config.init_scheme == "gpt2":
            self.apply(self._init_weights)
            for name, p in self.named_parameters():  # scale residual projections by 1/sqrt(2 * n_layers)
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))
        self.tok_emb.weight.requires_grad_(not config.freeze_token_embeddings)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _restore_buffers(self) -> None:
        """Recompute the non-persistent position tables (e.g. after building on the meta device)."""
        c = self.config
        if c.pos_emb == "sinusoidal":
            self.pos_table = sinusoidal_table(c.context_length, c.d_model).to(self.tok_emb.weight.device)
        elif c.pos_emb == "rope":
            cos, sin = rope_tables(c.context_length, c.head_dim, c.rope_base)
            self.rope_cos, self.rope_sin = cos.to(self.tok_emb.weight.device), sin.to(self.tok_emb.weight.device)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        cache: KVCache | None = None,
        pad_mask: torch.Tensor | None = None,
        last_only: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids ``idx`` (B, T); with ``targets`` (B, T), their `lm_loss` instead.

        ``cache`` continues from the tokens cached so far. ``pad_mask`` (B, cached + T), True for
        real tokens, supports left-padded batches of prompts of different lengths.
        ``last_only`` computes the head for the last position only (generation).
        The loss is part of the forward so that ``torch.compile`` fuses it with the head: on GPU the
        fp32 cast, log-softmax and its gradient become single passes over the logits.
        """
        _B, T = idx.shape
        start = cache.length if cache is not None else 0
        if start + T > self.config.context_length:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds model.context_length={self.config.context_length}"
            )
        positions = torch.arange(start, start + T, device=idx.device)
        if pad_mask is not None:  # each row's positions count its real tokens only
            positions = (pad_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start : start + T]
        x = self.tok_emb(idx)
        rope = None
        if self.config.pos_emb == "learned":
            x = x + self.pos_emb(positions)
        elif self.config.pos_emb == "sinusoidal":
            x = x + self.pos_table[positions].to(x.dtype)
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if cos.dim() == 3:  # per-row positions: (B, T, d/2) -> (B, 1, T, d/2)
                cos, sin = cos[:, None], sin[:, None]
            rope = (cos, sin)
        x = self.emb_dropout(x)
        attn_mask = self._attention_mask(start, T, pad_mask, idx.device)
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                x = checkpoint(block, x, rope, None, attn_mask, use_reentrant=False)
            else:
                x = block(x, rope, cache, attn_mask)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:, :]
        logits = self.head(self.ln_f(x))
        return logits if targets is None else lm_loss(logits, targets)

    @staticmethod
    def _attention_mask(start: int, T: int, pad_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, start + T) mask, or None where SDPA's own causal path applies."""
        if pad_mask is None and (start == 0 or T == 1):
            return None
        S = start + T
        mask = causal_mask(T, S, device)[None, None]  # (1, 1, T, S)
        if pad_mask is not None:
            own = torch.arange(S, device=device)[None, :] == torch.arange(start, S, device=device)[:, None]
            mask = (mask & pad_mask[:, None, None, :S]) | own  # a padding query attends to itself (no NaN)
        return mask

    def num_params(self, trainable_only: bool = False) -> int:
        """Parameter count (a tied head counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
