"""The sharded checkpoint layout (FSDP): every rank writes and reads its own shards; nobody gathers the model.

It reshards on load: a run on any number of ranks resumes from it (`load_sharded_into`), and one process reads it
into full tensors (`read_sharded`, hence `gptcore.checkpoint.load_checkpoint`, sampling, export and
``train.init_from``) as it reads the single-file layout.
"""

from __future__ import annotations

import json
import shutil
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from gptcore import files
from gptcore.checkpoint_format import (
    META_FILE,
    RNG_FILE,
    SHARDED,
    SHARDS_DIR,
    CheckpointError,
    CheckpointParts,
    check_file,
    load_tensors,
    new_meta,
    optimizer_slots,
    read_meta,
    unwrap,
)
from gptcore.checkpoint_rng import rng_tensors

# --------------------------------------------------------------------------- writing


def save_sharded(path: str | Path, parts: CheckpointParts) -> Path:
    """Write the sharded-layout checkpoint of a (FSDP) model: a collective, called by every rank.

    Every rank writes its shards into ``path``; ranks may pass different paths (e.g. one local folder each, to be
    uploaded into one place): each then holds its own rank's shards, and rank 0's folder the metadata. Each folder
    is written under a temporary name and renamed into place once every rank's shards are on disk.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = Path(path).absolute()
    rank, world = dist.get_rank(), dist.get_world_size()
    paths: list[Any] = [None] * world
    dist.all_gather_object(paths, str(path))
    token: list[Any] = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    owner = paths.index(str(path)) == rank  # the lowest rank writing into this folder renames it into place
    tmp = path.parent / f".{path.name}.tmp-{token[0]}"
    tensors, _, optim_meta = _flat_state(parts.model, parts.optimizer)
    try:
        (tmp / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), save_distributed=True))
        dist.barrier()  # every shard is on disk (the writer fsyncs each file)
        listing = {f"{SHARDS_DIR}/{f.name}": f.stat().st_size for f in (tmp / SHARDS_DIR).iterdir()}
        listings: list[Any] = [None] * world
        dist.all_gather_object(listings, listing)
        if rank == 0:
            sizes = {name: size for found in listings for name, size in found.items()}
            meta = {**new_meta(parts), "layout": SHARDED, "world_size": world}
            if optim_meta is not None:
                meta["optimizer"] = optim_meta
            _write_rng_and_meta(tmp, meta, sizes, parts.rng_states)
        dist.barrier()
        if owner:
            files.replace_dir(tmp, path)
        dist.barrier()  # the checkpoint is in place when any rank returns
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_rng_and_meta(
    folder: Path, meta: dict[str, Any], sizes: dict[str, int], rng_states: Sequence[dict[str, torch.Tensor]] | None
) -> None:
    """Rank 0's part of a sharded checkpoint: every rank's RNG state, then meta.json listing every file (fsynced)."""
    save_file(rng_tensors(rng_states), folder / RNG_FILE)
    sizes = {**sizes, RNG_FILE: (folder / RNG_FILE).stat().st_size}
    (folder / META_FILE).write_text(json.dumps({**meta, "files": sizes}, indent=2))
    for name in (RNG_FILE, META_FILE):
        files.fsync(folder / name)


def _tied_head(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_weights", False))


def _flat_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """``model.<fqn>`` and ``optim.<fqn>.<slot>`` tensors (this rank's shards under FSDP, as DTensors), the model
    state dict they came from, and the optimizer's JSON part (param groups naming parameters by fqn, scalars)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = unwrap(model)
    msd = get_model_state_dict(model)
    tensors = {f"model.{k}": v for k, v in msd.items() if not (k == "head.weight" and _tied_head(model))}
    optim_meta = None
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer)  # an optimizer that never stepped gets zero state first
        optim_meta = {"param_groups": osd["param_groups"], "scalars": {}}
        for fqn, slots in osd["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{fqn}.{name}"] = value
                else:
                    optim_meta["scalars"].setdefault(fqn, {})[name] = value
    return tensors, msd, optim_meta


# --------------------------------------------------------------------------- reading


def check_sharded_files(path: Path, meta: dict[str, Any]) -> None:
    """Every file meta.json lists is there, at its size, and there are shards."""
    sizes = meta.get("files", {})
    if not any(name.startswith(f"{SHARDS_DIR}/") for name in sizes):
        raise CheckpointError(f"{path / META_FILE} lists no shard files; the checkpoint is incomplete, pick another")
    for name, size in sizes.items():
        check_file(path / name, size)


def _shard_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(path / SHARDS_DIR))


def sharded_shapes(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Full shape and dtype of every tensor of a sharded checkpoint, from the shards' headers (no tensor read)."""
    try:
        metadata = _shard_reader(path).read_metadata()
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path / SHARDS_DIR} holds a corrupt or truncated shard ({exc}); pick an earlier checkpoint"
        ) from None
    return {k: (m.size, m.properties.dtype) for k, m in metadata.state_dict_metadata.items()}


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{path / SHARDS_DIR}: cannot read the shards ({exc}); pick an earlier checkpoint")


def _read_full(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Full CPU tensors named ``prefix...`` (the prefix removed) of a sharded checkpoint, read by this process alone."""
    import torch.distributed.checkpoint as dcp

    shapes = sharded_shapes(path)
    wanted = {k: torch.empty(size, dtype=dtype) for k, (size, dtype) in shapes.items() if k.startswith(prefix)}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, storage_reader=_shard_reader(path), no_dist=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from None
    return {k.removeprefix(prefix): v for k, v in wanted.items()}


def read_sharded(
    path: Path, meta: dict[str, Any], *, with_weights: bool, with_optimizer: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """A sharded checkpoint read whole by this process, as if it had been saved whole: full weights, the optimizer
    state numbered as ``Optimizer.state_dict()`` numbers it (with the weights only), and the RNG tensors."""
    check_sharded_files(path, meta)
    weights = _read_full(path, "model.") if with_weights else {}
    if not with_optimizer:
        return weights, None, {}
    rng = load_tensors(path / RNG_FILE, meta.get("files", {}).get(RNG_FILE))
    if "optimizer" not in meta or not with_weights:
        return weights, None, rng
    saved = meta["optimizer"]
    index, groups = {}, []  # parameters numbered across the param groups, in order
    for group in saved["param_groups"]:
        ids = []
        for fqn in group["params"]:
            index[fqn] = len(index)
            ids.append(index[fqn])
        groups.append({**group, "params": ids})
    slots = optimizer_slots(_read_full(path, "optim."), saved.get("scalars", {}))
    return weights, {"state": {index[fqn]: s for fqn, s in slots.items()}, "param_groups": groups}, rng


def load_sharded_into(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into a FSDP-sharded ``model``: a collective.

    Each rank reads the pieces of the saved shards that make up its own shards now: the checkpoint may have been
    written by any number of ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = read_meta(path)
    check_sharded_files(path, meta)
    model = unwrap(model)
    targets, msd, _ = _flat_state(model, optimizer)
    if optimizer is None or "optimizer" not in meta:
        targets = {k: v for k, v in targets.items() if k.startswith("model.")}
    saved = sharded_shapes(path)
    missing = sorted(set(targets) - set(saved))
    if missing:
        raise CheckpointError(
            f"{path} does not fit this run: it lacks {missing[:5]}{'...' if len(missing) > 5 else ''}; it was saved "
            "from a different architecture or optimizer (check model.* settings)"
        )
    for key, target in targets.items():
        if tuple(saved[key][0]) != tuple(target.shape):
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(saved[key][0])}, this run expects {tuple(target.shape)}; it was "
                "saved from a different architecture (check model.* settings)"
            )
    try:
        dcp.load(targets, storage_reader=_shard_reader(path))  # in place, into this rank's shards
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from None
    for key, value in targets.items():
        if key.startswith("model."):
            msd[key.removeprefix("model.")] = value
    if _tied_head(model):
        msd["head.weight"] = msd["tok_emb.weight"]
    set_model_state_dict(model, msd)
    if optimizer is not None and "optimizer" in meta:
        moments = {k.removeprefix("optim."): v for k, v in targets.items() if k.startswith("optim.")}
        state = optimizer_slots(moments, meta["optimizer"].get("scalars", {}))
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["optimizer"]["param_groups"]})
