"""Work across ranks: FSDP2 sharding of gptcore's GPT, gradient sync, the process group, values reduced over ranks.

With ``train.parallel="fsdp"`` every transformer block is one FSDP group and the rest of the model (token and
position embeddings, final norm, head — a tied head shares the embedding's group, as it must) is the root group.
Each rank holds 1/world of every parameter, gradient and AdamW moment; a group's parameters are all-gathered just
before its forward (and again for its backward), and its gradients reduce-scattered right after. The optimizer is
built after sharding, so it holds (and steps) only this rank's shards.

Pure PyTorch: `torch.distributed.fsdp.fully_shard` on an explicit 1-D device mesh (``"cpu"`` with gloo, where a
default CUDA mesh would not do, or ``"cuda"`` with NCCL). FSDP and DTensor are imported by `shard_model` only
(~0.5 s of imports that every other job, and every Ray Train worker start, is spared): until then no model or tensor
can be one of theirs.
"""

from __future__ import annotations

import gc
import sys

import torch
import torch.distributed as dist

from gptcore.config import ConfigError
from gptcore.model import GPT


def ensure_process_group(device: torch.device) -> bool:
    """Start a one-rank process group if torch.distributed has none (FSDP needs one); True if it was started here.

    A process that runs `gptcore.train.train` by itself, without torchrun or Ray, trains with FSDP of one rank.
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def leave_process_group() -> None:
    """Destroy the default process group, after collecting the garbage that may still hold its work.

    A sharded model in a reference cycle keeps gloo's pending work objects alive past the group; freed at interpreter
    exit, they abort the process ("terminate called without an active exception", one exit in three in tests).
    """
    gc.collect()
    dist.destroy_process_group()


def shard_model(model: GPT, *, device: torch.device, dtype: torch.dtype | None, cpu_offload: bool = False) -> GPT:
    """Shard ``model`` in place with FSDP2 across every rank of the default process group; returns it.

    ``model`` may still be on the CPU: each group's parameters move to ``device`` as it is sharded, so no rank ever
    holds more than one group's full parameters there. ``dtype`` bf16 gives bf16 parameters for compute (all-gathers
    move half the bytes) with fp32 gradient reductions and fp32 sharded parameters for the optimizer; otherwise all
    stays fp32. ``cpu_offload`` keeps the shards (parameters, gradients, optimizer state) in host memory.
    """
    world = dist.get_world_size()
    rows = model.config.padded_vocab_size
    if rows % world:
        raise ConfigError(
            f"model.pad_vocab_multiple: the {rows}-row token embedding does not split evenly across {world} workers "
            f"under train.parallel=fsdp; use a worker count that divides {rows}, or a model.pad_vocab_multiple that "
            f"{world} divides"
        )
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ConfigError(
            f"train.precision: {dtype} is not supported with train.parallel=fsdp (fp16 needs a gradient scaler "
            "FSDP does not take here); set train.precision=bf16 or fp32"
        )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    # Block inputs stay as they are (cast_forward_inputs=False): the RoPE tables must keep fp32.
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload)  # moves the buffers to the device too
    return model


def _instance_of(value: object, module: str, name: str) -> bool:
    """``isinstance(value, module.name)``, False without importing ``module`` when nothing has imported it yet."""
    loaded = sys.modules.get(module)
    return loaded is not None and isinstance(value, getattr(loaded, name))


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model a compile wrapper holds) is sharded with FSDP2."""
    return _instance_of(getattr(model, "_orig_mod", model), "torch.distributed.fsdp", "FSDPModule")


def set_gradient_sync(model: torch.nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients in the next backward (``sync``) or keep accumulating them unsharded."""
    if is_sharded(model):
        getattr(model, "_orig_mod", model).set_requires_gradient_sync(sync)


def mean_across_ranks(value: float, device: torch.device) -> float:
    """The mean of ``value`` over the ranks of torch.distributed (``value`` itself outside it): a collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor: a DTensor's full value (a collective for sharded ones), anything else as it is."""
    return value.full_tensor() if _instance_of(value, "torch.distributed.tensor", "DTensor") else value
