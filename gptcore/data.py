"""The windows and batches training reads from a prepared dataset (`gptcore.corpus` prepares it).

`build_datasets` opens a prepared dataset's splits as `SlidingWindowDataset`s; `make_loader` batches them in an
epoch order every rank agrees on (`EpochOrder`, `GlobalBatches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptcore.config import JobConfig
from gptcore.corpus import check_split_length, dataset_folder, window_count
from gptcore.shards import DataError, open_split, read_manifest

# --------------------------------------------------------------------------- windows


class SlidingWindowDataset(Dataset):
    """(x, y) pairs with ``x = t[i:i+L]`` and ``y = t[i+1:i+1+L]`` for ``i = 0, stride, 2*stride, ...``.

    ``tokens`` is anything sliced into arrays: a `TokenStream` over shards, a NumPy array or a tensor.
    A window is read when asked for; nothing is copied up front.
    """

    def __init__(self, tokens: Any, context_length: int, stride: int, *, name: str = "dataset", key: str = ""):
        if stride <= 0:
            raise DataError(f"data.stride must be a positive integer, got {stride}")
        check_split_length(name, len(tokens), context_length)
        self.tokens = tokens
        self.key = key  # the prepared dataset's key: a checkpoint resumes only on the data it was taken on
        self.context_length = context_length
        self.stride = stride
        self.n_windows = window_count(len(tokens), context_length, stride)

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.n_windows:
            raise IndexError(index)
        start = index * self.stride
        window = torch.as_tensor(np.asarray(self.tokens[start : start + self.context_length + 1]).astype(np.int64))
        return window[:-1], window[1:]

    @property
    def tokens_per_epoch(self) -> int:
        return len(self) * self.context_length


def build_datasets(
    config: JobConfig, folder: str | Path | None = None
) -> tuple[SlidingWindowDataset, SlidingWindowDataset]:
    """Train and validation windows of a prepared dataset folder (prepared under the cache if none is given)."""
    folder = Path(folder) if folder else dataset_folder(config)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder}: no manifest.json, so not a finished dataset; prepare the corpus again")
    L, stride = config.model.context_length, config.stride
    return (
        SlidingWindowDataset(open_split(folder, manifest, "train"), L, stride, name="train", key=manifest.key),
        SlidingWindowDataset(
            open_split(folder, manifest, "val", config.data.val_tokens), L, stride, name="validation", key=manifest.key
        ),
    )


# --------------------------------------------------------------------------- order and batches


FEISTEL_ABOVE = 1 << 22  # windows; below this an epoch's order is a stored permutation (32 MB at most)


class EpochOrder:
    """A permutation of ``range(n)`` that depends only on (seed, epoch), read at any position.

    Up to `FEISTEL_ABOVE` items it is ``torch.randperm`` (the order of torch's DistributedSampler); beyond,
    a keyed Feistel bijection computed on the fly, so memory does not grow with the corpus.
    """

    def __init__(self, n: int, seed: int, epoch: int, shuffle: bool = True):
        self.n, self.shuffle = n, shuffle
        self._table = None
        if shuffle and n <= FEISTEL_ABOVE:
            self._table = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).numpy()
        bits = max(2, math.ceil(math.log2(max(n, 2))))
        self._half = (bits + 1) // 2
        rng = np.random.default_rng([seed, epoch])
        self._keys = rng.integers(0, 2**31, size=4, dtype=np.uint64)

    def __getitem__(self, positions: slice) -> np.ndarray:
        idx = np.arange(positions.start, positions.stop, dtype=np.uint64)
        if not self.shuffle:
            return idx.astype(np.int64)
        if self._table is not None:
            return self._table[positions].astype(np.int64)
        out = self._feistel(idx)
        while (over := out >= self.n).any():  # cycle-walk back into range (a bijection of [0, n))
            out[over] = self._feistel(out[over])
        return out.astype(np.int64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        mask = np.uint64((1 << self._half) - 1)
        left, right = x >> np.uint64(self._half), x & mask
        for key in self._keys:
            mixed = (right * np.uint64(0x9E3779B97F4A7C15) + key) & np.uint64(2**64 - 1)
            mixed ^= mixed >> np.uint64(29)
            left, right = right, (left ^ mixed) & mask
        return (left << np.uint64(self._half)) | right


class GlobalBatches:
    """Batch sampler: rank ``rank``'s slice of each global batch of ``batch_size * world_size`` windows.

    Starts at window ``start`` of the epoch's order (the data position a checkpoint saves), so a resumed
    run, on any number of ranks, reads on from exactly where the interrupted one stopped.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
    ):
        self.order = EpochOrder(n, seed, epoch, shuffle)
        self.n, self.batch_size, self.start, self.rank, self.world = n, batch_size, start, rank, world_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        span = self.batch_size * self.world
        left = self.n - self.start
        return left // span if self.drop_last else math.ceil(left / span)

    def __iter__(self) -> Iterator[list[int]]:
        span = self.batch_size * self.world
        for g in range(len(self)):
            begin = self.start + g * span + self.rank * self.batch_size
            stop = min(begin + self.batch_size, self.n)
            if begin < stop:
                yield self.order[slice(begin, stop)].tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader over ``dataset`` in the order of (seed, epoch), from window ``start``, rank's share of each batch.

    Drawing the order takes nothing from torch's global generator: how often a run evaluates, or where it resumed,
    does not change the dropout masks of its training steps.
    """
    sampler = GlobalBatches(
        len(dataset),
        batch_size,
        seed=seed,
        epoch=epoch,
        start=start,
        rank=rank,
        world_size=world_size,
        shuffle=shuffle,
        drop_last=drop_last,
    )
    # a generator of its own: iterating a DataLoader draws a base seed, by default from torch's global generator
    return DataLoader(
        dataset, batch_sampler=sampler, pin_memory=pin_memory, generator=torch.Generator().manual_seed(seed)
    )
