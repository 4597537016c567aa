"""The process a run trains in: its seed, device, precision, CPU threads and allocator."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import random

import numpy as np
import torch
import torch.distributed as dist

from gptcore.autoprecision import Workload, cpu_prefers_bf16
from gptcore.config import TrainConfig, resolved_precision


def set_seed(seed: int) -> int:
    """Seed Python, NumPy and torch (all devices); returns the seed for logging."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def resolve_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def bf16_faster(device: torch.device, workload: Workload) -> bool:
    """Whether ``workload`` runs faster in bf16 than in fp32 on ``device``: a CUDA GPU that supports bf16 is taken to
    (tensor cores); a CPU is measured once per machine (`gptcore.autoprecision`)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_prefers_bf16(workload)


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: torch.device, workload: Workload) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` when it does ``workload`` ("train" or "sample"; None =
    plain fp32), as `resolved_precision` rules. Only ``auto`` depends on the workload."""
    faster = precision == "auto" and bf16_faster(device, workload)  # nothing measured for an explicit precision
    return AUTOCAST_DTYPES[resolved_precision(precision, device.type, faster)]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def prepare_process(train: TrainConfig, device: torch.device, rank: int) -> torch.dtype | None:
    """Set this process up for ``train`` on ``device``: allocator, CPU threads, the rank's seed; the autocast dtype."""
    if device.type == "cpu":
        keep_freed_memory_mapped()
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
    set_seed(train.seed + rank)
    dtype = resolve_precision(train.precision, device, "train")
    if train.precision == "auto" and device.type == "cpu" and dist.is_initialized() and dist.get_world_size() > 1:
        dtype = _rank0s(dtype)
    return dtype


def _rank0s(dtype: torch.dtype | None) -> torch.dtype | None:
    """Rank 0's autocast dtype on every rank (a collective): CPU ranks on other machines measure ``auto`` each on
    their own and could differ, which would train the ranks' shares of the model in different precisions."""
    choice = [dtype]
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def keep_freed_memory_mapped() -> None:
    """Stop glibc from returning large freed blocks to the OS.

    Every training step allocates and frees the same large buffers (logits, embedding
    gradients). With glibc's defaults each is a fresh mmap whose pages fault in again on
    first touch, which costs a third of a CPU step for gpt2-small. Keeping them in the heap
    removes that cost; the process keeps its peak memory, as any caching allocator does.
    This tunes the main arena: a loop run in another thread (Ray Train's) gets the same effect
    only if the process started with ``MALLOC_ARENA_MAX=1``, which puts every thread on it.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 1 << 40)
