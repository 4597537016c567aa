"""Datasheet figures of known accelerators: peak arithmetic rates, for model FLOPs utilisation (MFU), and memory.

MFU = achieved model FLOP/s (`gptcore.accounting.training_flops_per_token` x tokens/s) / the device's dense bf16
(fp16 on GPUs without bf16) tensor-core peak from its datasheet. Unknown devices get no peak, hence no MFU,
rather than a wrong one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the tables need no torch: a driver sizes a cluster's GPUs without importing it
    import torch

#: Dense (no sparsity) bf16 peak FLOP/s by device-name substring; the first match wins, so the
#: specific variants come before the family name.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10G": 70e12,
    "T4": 65e12,  # fp16: the T4 has no bf16
}


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak FLOP/s of the GPU called ``name`` (as CUDA reports it); None if unknown."""
    return next((value for key, value in PEAK_FLOPS.items() if key in name), None)


#: Memory per GPU in bytes (datasheet GB, 10^9 bytes: what CUDA reports, less a few hundred MiB it reserves), by
#: device-name substring, the first match wins: CUDA's names ("NVIDIA A100-SXM4-80GB") and Ray's accelerator types
#: ("A100-80G"; Ray calls both A100 sizes "A100" unless a node declares "A100-80G", so "A100" is the 40 GB part).
GPU_MEMORY: dict[str, int] = {
    "H200": 141 * 10**9,
    "H100 NVL": 94 * 10**9,
    "H100": 80 * 10**9,
    "A100-80G": 80 * 10**9,  # Ray's accelerator type
    "A100-SXM4-80GB": 80 * 10**9,
    "A100 80GB": 80 * 10**9,  # "A100 80GB PCIe"
    "A100": 40 * 10**9,
    "L40": 48 * 10**9,  # L40 and L40S
    "L4": 24 * 10**9,
    "A10G": 24 * 10**9,
    "T4": 16 * 10**9,
}


def gpu_memory_of(name: str) -> int | None:
    """The memory in bytes of one GPU called ``name`` (a CUDA device name or a Ray accelerator type); None if
    unknown."""
    return next((value for key, value in GPU_MEMORY.items() if key in name), None)


def peak_flops(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak FLOP/s of a CUDA ``device``; None for CPUs and unknown GPUs."""
    import torch

    return peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def model_flops_utilisation(tokens_per_sec: float, flops_per_token: float, peak: float | None) -> float | None:
    """Achieved over peak FLOP/s; None without a known peak."""
    return tokens_per_sec * flops_per_token / peak if peak else None
