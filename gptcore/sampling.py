"""Text generation: greedy, temperature, top-k and top-p (nucleus) sampling, eos stop, batches.

Decoding is incremental with a `KVCache`: the prompt is processed once and each new token costs
one position. Prompts of different lengths are left-padded and masked. Past the model's context
window, each step re-reads the last ``context_length`` tokens (the same output as without a cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gptcore.model import GPT, KVCache
from gptcore.tokenizer import EOT_ID, decode, encode


def filter_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Apply temperature, then top-k, then top-p to (B, V) logits; removed entries become -inf."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling (use temperature=0 in generate() for greedy)")
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # keep a token while the mass before it is < p: the smallest set whose mass reaches p
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of (B, V) logits; ``temperature=0`` is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits.float(), temperature=temperature, top_k=top_k, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens.

    A row stops at ``eos_id`` (which is not returned); generation ends when every row has stopped.
    ``device``: where the model computes (default: where its parameters are; FSDP with CPU offload differs).
    """
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    try:
        options = (temperature, top_k, top_p, eos_id, use_cache, generator, device)
        return _generate(model, prompts, max_new_tokens, *options)
    finally:
        model.train(was_training)


def _generate(model, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator, device):
    L, V = model.config.context_length, model.config.vocab_size
    rows = [list(map(int, p)) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    B, width = len(rows), max(len(r) for r in rows)
    ragged = any(len(r) != width for r in rows)
    idx = torch.zeros(B, width, dtype=torch.long, device=device)
    pad = torch.ones(B, width, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        idx[i, width - len(r) :] = torch.tensor(r, device=device)
        pad[i, : width - len(r)] = False
    generated: list[torch.Tensor] = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache(len(model.blocks), L) if use_cache and width < L else None
    step_input = idx
    for _ in range(max_new_tokens):
        if cache is not None and cache.length + step_input.size(1) <= L:
            logits = model(step_input, cache=cache, pad_mask=pad if ragged else None, last_only=True)
        else:  # no cache, or past the context window: re-read the last L tokens
            cache = None
            logits = model(idx[:, -L:], pad_mask=pad[:, -L:] if ragged else None, last_only=True)
        token = next_token(logits[:, -1, :V], temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        generated.append(token)
        if eos_id is not None:
            done |= token[:, 0] == eos_id
            if bool(done.all()):
                break
        idx = torch.cat([idx, token], dim=1)
        pad = torch.cat([pad, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        step_input = token
    if not generated:
        return [[] for _ in range(B)]
    out = torch.cat(generated, dim=1).tolist()
    if eos_id is not None:
        out = [row[: row.index(eos_id)] if eos_id in row else row for row in out]
    return out


def generate_text(
    model: GPT,
    prompt: str | Sequence[str],
    max_new_tokens: int = 50,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_at_eos: bool = True,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Prompt text(s) -> prompt plus generated continuation, one string per prompt."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = [encode(p) for p in prompts]
    new = generate(
        model,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=EOT_ID if stop_at_eos else None,
        generator=generator,
    )
    return [p + decode(n) for p, n in zip(prompts, new, strict=True)]
