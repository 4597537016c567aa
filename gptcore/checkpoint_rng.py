"""RNG state in checkpoints: every rank's torch generators, saved as tensors and restored to the rank they came from.

Saved as ``rng.rank{r}.cpu`` and ``rng.rank{r}.cuda.{i}``; checkpoints written before per-rank states hold one
state, ``rng.cpu`` / ``rng.cuda.{i}`` (`restore_rng`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states: ``cpu`` and ``cuda.{i}`` for each visible GPU."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    return rng


def gather_rng_states(device: torch.device | str | None = None) -> list[dict[str, torch.Tensor]] | None:
    """Every rank's `rng_state`, in rank order, under torch.distributed (None outside it, or with one rank).

    A collective: every rank must call it at the same point. ``device`` is this rank's training device (NCCL
    exchanges objects through the current CUDA device).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    states: list[Any] = [None] * dist.get_world_size()
    device = torch.device(device) if device is not None else None
    with torch.cuda.device(device) if device is not None and device.type == "cuda" else contextlib.nullcontext():
        dist.all_gather_object(states, rng_state())
    return states


def rng_tensors(states: Sequence[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """Every rank's state in ``states`` (default: this process's only) as checkpoint tensors."""
    if states is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        states_by_rank = {rank: rng_state()}
    else:
        states_by_rank = dict(enumerate(states))
    return {
        f"rng.rank{rank}.{key}": value.detach().cpu().contiguous()
        for rank, state in states_by_rank.items()
        for key, value in state.items()
    }


def restore_rng(rng: dict[str, torch.Tensor], *, rank: int = 0, seed: int | None = None) -> None:
    """Set this rank's torch RNG states from a checkpoint's ``rng`` tensors.

    Each rank gets its own saved state (``rng.rank{rank}.*``). A checkpoint written before per-rank states
    holds rank 0's only (``rng.cpu``): every rank gets that, as before. A rank the checkpoint has no state for
    (it was saved by fewer ranks) re-seeds with ``seed`` (default ``rank``), with a warning.
    """
    prefix = f"rng.rank{rank}."
    own = {key.removeprefix(prefix): value for key, value in rng.items() if key.startswith(prefix)}
    if not own and any(key.startswith("rng.rank") for key in rng):
        saved = len({key.split(".")[1] for key in rng if key.startswith("rng.rank")})
        seed = rank if seed is None else seed
        warnings.warn(
            f"the checkpoint holds the RNG states of {saved} rank(s), none for rank {rank}: rank {rank} re-seeds "
            f"with {seed} (its random numbers, e.g. dropout masks, differ from an uninterrupted run)",
            stacklevel=2,
        )
        torch.manual_seed(seed)
        return
    if not own:  # an older checkpoint: rank 0's state only
        own = {key.removeprefix("rng."): value for key, value in rng.items()}
    if "cpu" in own:
        torch.set_rng_state(own["cpu"])
    for key, value in own.items():
        if key.startswith("cuda.") and torch.cuda.is_available():
            index = int(key.rsplit(".", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(value, index)
