"""Evaluation during training: the mean loss over a loader and a text sample, both in lockstep when sharded.

Under FSDP every forward all-gathers parameters, a collective: every rank must run the same number of forwards,
whatever its share of the data or the tokens it samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from gptcore.config import TrainConfig
from gptcore.model import GPT
from gptcore.parallel import is_sharded, mean_across_ranks
from gptcore.runtime import autocast
from gptcore.sampling import generate, generate_text
from gptcore.tokenizer import EOT_ID, decode, encode


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    eval_iters: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """Mean loss over the first ``eval_iters`` batches of ``loader`` (averaged across ranks)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    if is_sharded(model):  # every forward is a collective: all ranks run the same number
        batches = lockstep(loader, min(eval_iters, len(loader)))
    else:
        batches = ((x, y, True) for x, y in itertools.islice(loader, eval_iters))
    try:
        with autocast(device, dtype):  # one autocast region: each weight is cast once, not once per batch
            for x, y, counted in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = model(x, targets=y).item()
                if counted:
                    total += loss
                    count += 1
    finally:
        model.train(was_training)
    return mean_across_ranks(total / max(count, 1), device)


def lockstep(loader: torch.utils.data.DataLoader, rounds: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
    """``rounds`` batches of ``loader``; once this rank's run out (the last global batch may leave it none), a batch
    again, marked not to be counted, so that it still takes part in every round's forward."""
    spare = None
    batches = iter(loader)
    for _ in range(rounds):
        batch = next(batches, None)
        if batch is not None:
            spare = batch
            yield batch[0], batch[1], True
            continue
        if spare is None:
            x, y = loader.dataset[0]
            spare = (x[None], y[None])
        yield spare[0], spare[1], False


def sample_text(
    model: GPT, t: TrainConfig, *, step: int, device: torch.device, dtype: torch.dtype | None, is_main: bool
) -> str | None:
    """A sample of ``t.sample_max_new_tokens`` tokens after ``t.sample_prompt``, on rank 0 (None on the others).

    A sharded model's ranks all generate, in lockstep — the same prompt, a generator seeded alike on all, and no
    early stop at end-of-text (the text is cut there after), so every rank runs exactly ``sample_max_new_tokens``
    forwards whatever its numerics.
    """
    with autocast(device, dtype):
        if not is_sharded(model):
            return generate_text(
                model,
                t.sample_prompt,
                t.sample_max_new_tokens,
                temperature=t.sample_temperature,
                top_k=t.sample_top_k,
            )[0]
        generator = torch.Generator(device=device).manual_seed(t.seed + step)
        new = generate(
            model,
            [encode(t.sample_prompt)],
            t.sample_max_new_tokens,
            temperature=t.sample_temperature,
            top_k=t.sample_top_k,
            generator=generator,
            device=device,
        )[0]
    if not is_main:
        return None
    return t.sample_prompt + decode(new[: new.index(EOT_ID)] if EOT_ID in new else new)
