"""Checkpoints: a folder with weights and optimizer state in safetensors plus JSON metadata.

    model.safetensors      model weights (a tied head is stored once, as tok_emb.weight)
    optimizer.safetensors  optimizer moments and every rank's RNG states
    meta.json              format, config, train state, optimizer hyper-parameters, file sizes

A run sharded with FSDP (``train.parallel="fsdp"``) writes the *sharded* layout instead: every rank writes its own
shards with `torch.distributed.checkpoint` (its safetensors storage: no pickled metadata), and nobody gathers the
model::

    shards/shard-0000{r+1}-model-00001-of-00001.safetensors   rank r's shards of every weight and AdamW moment,
                                                               named model.<fqn> and optim.<fqn>.<slot>, each with
                                                               its offsets in the full tensor (safetensors metadata)
    rng.safetensors        every rank's RNG states
    meta.json              as above, with "layout": "sharded" and the world size it was written by

It reshards on load: a run on any number of ranks resumes from it (`load_sharded_into`), and one process reads
it into full tensors (`load_checkpoint`, hence `load_model`, sampling, export and ``train.init_from``) as it reads
the single-file layout.

Folders are written next to their destination and renamed into place, so a process killed while
saving never leaves a half-written checkpoint behind. Loading reads only tensors and JSON: nothing
is unpickled.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from gptcore.config import ConfigError, GPTConfig, JobConfig

FORMAT = "gptcore-checkpoint"
VERSION = 2  # the newest version read; the single-file layout is still written as version 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
META_FILE = "meta.json"
SHARDED = "sharded"  # meta.json "layout" of a checkpoint written shard by shard (FSDP)
SHARDS_DIR = "shards"
RNG_FILE = "rng.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not fit the model."""


@dataclass
class TrainState:
    """Progress of a run; restored on resume so step and token counts continue."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # current epoch (0-based)
    samples_in_epoch: int = 0  # windows of the current epoch's order already consumed, by all ranks together
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    seed: int = 0
    data_key: str = ""  # the prepared dataset trained on

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["best_val_loss"] = None if math.isinf(self.best_val_loss) else self.best_val_loss
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainState:
        d = dict(d)
        d["best_val_loss"] = math.inf if d.get("best_val_loss") is None else d["best_val_loss"]
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


@dataclass
class Checkpoint:
    """A loaded checkpoint: everything needed to rebuild the model or resume training."""

    path: Path
    config: JobConfig
    model_state: dict[str, torch.Tensor]
    state: TrainState
    optimizer_state: dict[str, Any] | None = None
    scaler_state: dict[str, Any] | None = None
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- saving


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return getattr(model, "module", model)  # DDP wrapper


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, without a tied head (it is the token embedding)."""
    model = _unwrap(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("head.weight", None)
    return state


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


def _rng_tensors(states: Sequence[dict[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
    """``rng.rank{r}.cpu`` and ``rng.rank{r}.cuda.{i}`` for every rank in ``states`` (default: this process only).

    Checkpoints written before per-rank states hold one state, ``rng.cpu`` / ``rng.cuda.{i}`` (`restore_rng`).
    """
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


@dataclass
class Snapshot:
    """A checkpoint held in host memory, ready to be written by `write_snapshot`."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]  # optimizer moments and RNG states
    meta: dict[str, Any]


def _host(tensor: torch.Tensor, copy: bool) -> torch.Tensor:
    """``tensor`` on the CPU; a copy of it when ``copy`` (training goes on updating the original in place)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        return tensor.to("cpu")  # always a copy
    return tensor.clone(memory_format=torch.contiguous_format) if copy else tensor.contiguous()


def take_snapshot(
    *,
    model: torch.nn.Module,
    config: JobConfig,
    state: TrainState,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
    rng_states: Sequence[dict[str, torch.Tensor]] | None = None,
    copy: bool = True,
) -> Snapshot:
    """Everything a checkpoint holds, as of now. ``copy=False`` shares CPU tensors (only for an immediate write).

    ``rng_states``: every rank's RNG state (`gather_rng_states`); default: this process's only.
    """
    tensors = {k: _host(v, copy) for k, v in model_state_dict(model).items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "state": state.to_dict(),
        "extra": extra or {},
    }
    opt_tensors = _rng_tensors(rng_states)
    if optimizer is not None:
        sd = optimizer.state_dict()
        meta["optimizer"] = {"param_groups": sd["param_groups"], "scalars": {}}
        for idx, slots in sd["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    opt_tensors[f"state.{idx}.{name}"] = _host(value, copy)
                else:
                    meta["optimizer"]["scalars"][f"{idx}.{name}"] = value
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
    return Snapshot(model=tensors, optimizer=opt_tensors, meta=meta)


def write_snapshot(snapshot: Snapshot, path: str | Path) -> Path:
    """Write ``snapshot`` as a checkpoint folder at ``path`` atomically (replacing an existing one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_file(snapshot.model, tmp / MODEL_FILE)
        save_file(snapshot.optimizer, tmp / OPTIMIZER_FILE)
        meta = {**snapshot.meta, "files": {name: (tmp / name).stat().st_size for name in (MODEL_FILE, OPTIMIZER_FILE)}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        for name in (MODEL_FILE, OPTIMIZER_FILE, META_FILE):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(path: str | Path, **parts: Any) -> Path:
    """Write a checkpoint folder at ``path`` now, atomically; ``parts`` (model, config, state, optimizer, …) as for
    `take_snapshot`."""
    return write_snapshot(take_snapshot(**parts, copy=False), path)


class CheckpointWriter:
    """Writes snapshots on one background thread, so training goes on while a checkpoint reaches the disk.

    At most one write is in flight: `submit` first waits for the previous one, which bounds the extra
    host memory to one snapshot. `close` waits for the last write and raises its error, if any.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: Future[Path] | None = None

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def submit(self, take: Callable[[], Snapshot], path: str | Path) -> Future[Path]:
        """Wait for the previous write, take a snapshot now (``take()``), and write it to ``path`` in the background."""
        self.wait()
        snapshot = take()
        self._pending = self._pool.submit(write_snapshot, snapshot, path)
        return self._pending

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; where the OS can swap atomically, ``dst`` is never missing in between."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if _exchange(src, dst):  # src now holds the old folder
        shutil.rmtree(src, ignore_errors=True)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")  # elsewhere: two renames (a brief gap)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- the sharded layout (FSDP)


def _tied_head(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_weights", False))


def _flat_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """``model.<fqn>`` and ``optim.<fqn>.<slot>`` tensors (this rank's shards under FSDP, as DTensors), the model
    state dict they came from, and the optimizer's JSON part (param groups naming parameters by fqn, scalars)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model = _unwrap(model)
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


def _fsync(file: Path) -> None:
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def save_sharded(
    path: str | Path,
    *,
    model: torch.nn.Module,
    config: JobConfig,
    state: TrainState,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    extra: dict[str, Any] | None = None,
    rng_states: Sequence[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write the sharded-layout checkpoint of a (FSDP) model: a collective, called by every rank.

    Every rank writes its shards into ``path``; ranks may pass different paths (e.g. one local folder each, to be
    uploaded into one place): each then holds its own rank's shards, and rank 0's folder the metadata. Each folder
    is written under a temporary name and renamed into place once every rank's shards are on disk.
    ``rng_states``: every rank's RNG state (`gather_rng_states`); default: this process's only.
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
    tensors, _, optim_meta = _flat_state(model, optimizer)
    try:
        (tmp / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), save_distributed=True))
        dist.barrier()  # every shard is on disk (the writer fsyncs each file)
        listing = {f"{SHARDS_DIR}/{f.name}": f.stat().st_size for f in (tmp / SHARDS_DIR).iterdir()}
        listings: list[Any] = [None] * world
        dist.all_gather_object(listings, listing)
        if rank == 0:
            files = {name: size for found in listings for name, size in found.items()}
            meta: dict[str, Any] = {"format": FORMAT, "version": 2, "layout": SHARDED, "world_size": world}
            meta |= {"config": config.to_dict(), "state": state.to_dict(), "extra": extra or {}}
            if optim_meta is not None:
                meta["optimizer"] = optim_meta
            if scaler is not None and scaler.is_enabled():
                meta["scaler"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
            _write_rng_and_meta(tmp, meta, files, rng_states)
        dist.barrier()
        if owner:
            _replace_dir(tmp, path)
        dist.barrier()  # the checkpoint is in place when any rank returns
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write_rng_and_meta(
    folder: Path, meta: dict[str, Any], files: dict[str, int], rng_states: Sequence[dict[str, torch.Tensor]] | None
) -> None:
    """Rank 0's part of a sharded checkpoint: every rank's RNG state, then meta.json listing every file (fsynced)."""
    save_file(_rng_tensors(rng_states), folder / RNG_FILE)
    files = {**files, RNG_FILE: (folder / RNG_FILE).stat().st_size}
    (folder / META_FILE).write_text(json.dumps({**meta, "files": files}, indent=2))
    for name in (RNG_FILE, META_FILE):
        _fsync(folder / name)


def is_sharded(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``meta.json`` (`read_meta`) describes the sharded layout."""
    return meta.get("layout") == SHARDED


def _check_sharded_files(path: Path, meta: dict[str, Any]) -> None:
    files = meta.get("files", {})
    if not any(name.startswith(f"{SHARDS_DIR}/") for name in files):
        raise CheckpointError(f"{path / META_FILE} lists no shard files; the checkpoint is incomplete, pick another")
    for name, size in files.items():
        _check_file(path / name, size)


def _shard_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(path / SHARDS_DIR))


def _sharded_shapes(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
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


def _read_sharded(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Full CPU tensors named ``prefix...`` (the prefix removed) of a sharded checkpoint, read by this process alone."""
    import torch.distributed.checkpoint as dcp

    shapes = _sharded_shapes(path)
    wanted = {k: torch.empty(size, dtype=dtype) for k, (size, dtype) in shapes.items() if k.startswith(prefix)}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(wanted, storage_reader=_shard_reader(path), no_dist=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _unreadable(path, exc) from None
    return {k.removeprefix(prefix): v for k, v in wanted.items()}


def _indexed_optimizer_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A sharded checkpoint's optimizer state (full tensors by parameter name) as ``Optimizer.state_dict()`` has it:
    parameters numbered across the param groups, in order."""
    index, groups = {}, []
    for group in meta["param_groups"]:
        ids = []
        for fqn in group["params"]:
            index[fqn] = len(index)
            ids.append(index[fqn])
        groups.append({**group, "params": ids})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        fqn, name = key.rsplit(".", 1)
        state.setdefault(index[fqn], {})[name] = value
    for fqn, slots in meta.get("scalars", {}).items():
        state.setdefault(index[fqn], {}).update(slots)
    return {"state": state, "param_groups": groups}


def load_sharded_into(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a sharded checkpoint's weights (and optimizer state) into a FSDP-sharded ``model``: a collective.

    Each rank reads the pieces of the saved shards that make up its own shards now: the checkpoint may have been
    written by any number of ranks.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = read_meta(path)
    _check_sharded_files(path, meta)
    model = _unwrap(model)
    targets, msd, _ = _flat_state(model, optimizer)
    if optimizer is None or "optimizer" not in meta:
        targets = {k: v for k, v in targets.items() if k.startswith("model.")}
    saved = _sharded_shapes(path)
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
        state: dict[str, dict[str, Any]] = {}
        for key, value in targets.items():
            if key.startswith("optim."):
                fqn, name = key.removeprefix("optim.").rsplit(".", 1)
                state.setdefault(fqn, {})[name] = value
        for fqn, slots in meta["optimizer"].get("scalars", {}).items():
            state.setdefault(fqn, {}).update(slots)
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": meta["optimizer"]["param_groups"]})


# --------------------------------------------------------------------------- loading


def _check_file(file: Path, expected_size: int | None) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete, pick another one")
    size = file.stat().st_size
    if expected_size is not None and size != expected_size:
        raise CheckpointError(
            f"{file} is truncated or altered ({size} bytes, metadata says {expected_size}); pick an earlier checkpoint"
        )


def _load_tensors(file: Path, expected_size: int | None) -> dict[str, torch.Tensor]:
    _check_file(file, expected_size)
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated ({exc}); pick an earlier checkpoint") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of a checkpoint folder, validated."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass a checkpoint folder such as "
            "ray_results/<sweep>/<trial>/train/checkpoint_000000"
        )
    meta_file = path / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a gptcore checkpoint folder (no {META_FILE}); "
            "pass a folder written by gptcore (e.g. a trial's checkpoint_XXXXXX)"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_file} is truncated or corrupt ({exc}); pick an earlier checkpoint") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_file}: unknown checkpoint format {meta.get('format')!r}")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{meta_file}: written by a newer gptcore (version {meta['version']}); upgrade gptcore")
    return meta


def load_checkpoint(path: str | Path, *, with_optimizer: bool = True, with_weights: bool = True) -> Checkpoint:
    """Read a checkpoint folder (CPU tensors), checking it is complete.

    A sharded checkpoint is read into full tensors by this process alone, as if it had been saved whole (its
    optimizer state numbered as ``Optimizer.state_dict()`` numbers it). ``with_weights=False`` leaves the weights
    (and the optimizer state) out: the metadata, train state and RNG states only.
    """
    path = Path(path)
    meta = read_meta(path)
    files = meta.get("files", {})
    try:
        config = JobConfig.from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: invalid config ({exc})") from None
    sharded = is_sharded(meta)
    if sharded:
        _check_sharded_files(path, meta)
    model_state = {}
    if with_weights:
        if sharded:
            model_state = _read_sharded(path, "model.")
        else:
            model_state = _load_tensors(path / MODEL_FILE, files.get(MODEL_FILE))
    ckpt = Checkpoint(
        path=path,
        config=config,
        model_state=model_state,
        state=TrainState.from_dict(meta.get("state", {})),
        scaler_state=meta.get("scaler"),
        extra=meta.get("extra", {}),
    )
    if sharded:
        if with_optimizer:
            ckpt.rng = _load_tensors(path / RNG_FILE, files.get(RNG_FILE))
            if "optimizer" in meta and with_weights:
                ckpt.optimizer_state = _indexed_optimizer_state(meta["optimizer"], _read_sharded(path, "optim."))
        return ckpt
    if with_optimizer:
        tensors = _load_tensors(path / OPTIMIZER_FILE, files.get(OPTIMIZER_FILE))
        ckpt.rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
        if "optimizer" in meta:
            ckpt.optimizer_state = _optimizer_state(meta["optimizer"], tensors)
    return ckpt


def _optimizer_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def check_shape(name: str, target: torch.Tensor, value: torch.Tensor, *, source: str = "checkpoint") -> None:
    """A `CheckpointError` naming parameter ``name`` when ``value`` (from ``source``) does not fit ``target``."""
    if tuple(value.shape) != tuple(target.shape):
        raise CheckpointError(
            f"{source}: parameter {name} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}; "
            "it was saved from a different architecture (check model.* settings)"
        )


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> None:
    """Copy ``state`` into ``model``, naming any missing, unexpected or mis-shaped parameter."""
    target = model_state_dict(model)
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; "
            "it was saved from a different architecture (check model.* settings)"
        )
    for name, tensor in state.items():
        check_shape(name, target[name], tensor, source=source)
    with torch.no_grad():
        for name, tensor in state.items():
            target[name].copy_(tensor)


#: GPTConfig fields that decide which weights a model has and their shapes.
ARCHITECTURE_FIELDS = (
    "vocab_size",
    "pad_vocab_multiple",
    "context_length",
    "d_model",
    "n_heads",
    "n_layers",
    "mlp_ratio",
    "qkv_bias",
    "bias",
    "pos_emb",
    "tie_weights",
)


def check_fits(path: str | Path, config: GPTConfig) -> None:
    """Raise `CheckpointError` unless the weights of checkpoint ``path`` load into a model of ``config``.

    Cheap: reads meta.json and the safetensors headers, builds the model on the meta device; loads no tensor.
    """
    from gptcore.model import GPT

    path = Path(path)
    meta = read_meta(path)
    try:
        theirs = JobConfig.from_dict(meta["config"]).model
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: invalid config ({exc})") from None
    if is_sharded(meta):
        _check_sharded_files(path, meta)
        shapes = _sharded_shapes(path)
        saved = {k.removeprefix("model."): tuple(v[0]) for k, v in shapes.items() if k.startswith("model.")}
    else:
        file = path / MODEL_FILE
        _check_file(file, meta.get("files", {}).get(MODEL_FILE))
        try:
            with safe_open(file, framework="pt") as f:
                saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{file} is corrupt or truncated ({exc}); pick an earlier checkpoint") from None
    with torch.device("meta"):
        wanted = {k: tuple(v.shape) for k, v in model_state_dict(GPT(config)).items()}
    if saved == wanted:
        return
    diff = [
        f"model.{k}: checkpoint {getattr(theirs, k)!r} vs config {getattr(config, k)!r}"
        for k in ARCHITECTURE_FIELDS
        if getattr(theirs, k) != getattr(config, k)
    ]
    raise CheckpointError(
        f"{path} is a checkpoint of another architecture ({'; '.join(diff) or 'its weights have other shapes'}); "
        "set these model.* values to the checkpoint's, or pick a checkpoint of this model"
    )


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


def init_source_kind(source: str) -> str:
    """What ``train.init_from`` names: ``scratch``, a gptcore ``checkpoint`` folder, a local ``folder`` (a Hugging
    Face model saved on disk; it may not exist yet), or a Hugging Face ``hub`` model id (``gpt2``, ``org/name``)."""
    if source == "scratch":
        return "scratch"
    path = Path(source).expanduser()
    if (path / META_FILE).is_file():
        return "checkpoint"
    if path.exists() or source.startswith(("/", ".", "~")) or source.count("/") > 1:
        return "folder"
    return "hub"


def check_resumable(ckpt: Checkpoint, config: JobConfig, data_key: str = "") -> None:
    """Resuming needs the same model and the same dataset; name what differs."""
    if data_key and ckpt.state.data_key and ckpt.state.data_key != data_key:
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: it was taken on dataset {ckpt.state.data_key}, this run reads dataset "
            f"{data_key} (data.corpus {config.data.corpus!r}, or its files or split, changed); resume with the "
            "checkpoint's corpus, or start a fresh run (train.init_from for its weights)"
        )
    theirs, ours = ckpt.config.to_dict()["model"], config.to_dict()["model"]
    diff = [f"model.{k}: checkpoint {theirs[k]!r} vs config {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
    if diff:
        raise CheckpointError(
            f"cannot resume from {ckpt.path}: it is a checkpoint of another architecture ({'; '.join(diff)}); "
            "start a fresh run or resume with the checkpoint's model settings"
        )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Checkpoint]:
    """Rebuild the model a checkpoint was saved from, in eval mode."""
    from gptcore.model import GPT

    ckpt = load_checkpoint(path, with_optimizer=False)
    model = GPT(ckpt.config.model)
    load_model_weights(model, ckpt.model_state, source=str(path))
    return model.to(device).eval(), ckpt
