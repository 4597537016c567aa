"""Measures of generated text: diversity (distinct-n), repetition, and the model's own perplexity of it.

The diversity measures are pure functions of token-id lists. ``distinct_n`` pools all samples of a
setting (Li et al., 2016); ``repetition_rate`` looks inside each sample (the seq-rep-n of Welleck
et al., 2019). Both are ``nan`` when the samples are too short to hold a single n-gram.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from gptcore.model import GPT


def ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    """The n-grams of one token list, in order."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams over all samples divided by all n-grams (1 = no n-gram repeats anywhere)."""
    grams = [g for s in samples for g in ngrams(s, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(samples: Sequence[Sequence[int]], n: int = 4) -> float:
    """Fraction of n-grams that repeat an earlier n-gram of the same sample (0 = no loops)."""
    repeated = total = 0
    for sample in samples:
        grams = ngrams(sample, n)
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated / total if total else math.nan


@torch.no_grad()
def continuation_nll(model: GPT, prompt: Sequence[int], continuation: Sequence[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of ``continuation`` after ``prompt`` (temperature 1, no filtering).

    Returns ``(nll, tokens scored)``. Past the context window, windows of ``context_length`` tokens
    advance by half a window, so every token is scored with at least half a window of context.
    """
    model = getattr(model, "module", model)
    ids, L, V = [*prompt, *continuation], model.config.context_length, model.config.vocab_size
    device = next(model.parameters()).device
    nll, pos = 0.0, max(1, len(prompt))  # the first token of a text has nothing to be predicted from
    while pos < len(ids):
        end = min(len(ids), max(pos + max(1, L // 2), L))
        start = max(0, end - L)
        window = torch.tensor(ids[start:end], device=device)[None]
        logits = model(window)[0, pos - start - 1 : end - start - 1, :V].float()
        nll += F.cross_entropy(logits, window[0, pos - start : end - start], reduction="sum").item()
        pos = end
    return nll, max(0, len(ids) - max(1, len(prompt)))


def self_perplexity(model: GPT, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> float:
    """The model's perplexity of its own continuations (one prompt per continuation), pooled over tokens."""
    total, count = 0.0, 0
    for prompt, continuation in zip(prompts, continuations, strict=True):
        nll, n = continuation_nll(model, prompt, continuation)
        total, count = total + nll, count + n
    return math.exp(min(total / count, 50.0)) if count else math.nan
