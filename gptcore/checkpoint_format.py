"""What a checkpoint folder holds, in either layout: file names, meta.json, the train state, and checks of its files.

    model.safetensors      model weights (a tied head is stored once, as tok_emb.weight)
    optimizer.safetensors  optimizer moments and every rank's RNG states
    meta.json              format, config, train state, optimizer hyper-parameters, file sizes

A run sharded with FSDP (``train.parallel="fsdp"``) writes the *sharded* layout instead (`gptcore.checkpoint_sharded`):
every rank writes its own shards with `torch.distributed.checkpoint` (its safetensors storage: no pickled metadata),
and nobody gathers the model::

    shards/shard-0000{r+1}-model-00001-of-00001.safetensors   rank r's shards of every weight and AdamW moment,
                                                               named model.<fqn> and optim.<fqn>.<slot>, each with
                                                               its offsets in the full tensor (safetensors metadata)
    rng.safetensors        every rank's RNG states
    meta.json              as above, with "layout": "sharded" and the world size it was written by

Folders are written next to their destination and renamed into place (`gptcore.files.replace_dir`), so a process
killed while saving never leaves a half-written checkpoint behind. Loading reads only tensors and JSON: nothing
is unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptcore.config import ConfigError, JobConfig

FORMAT = "gptcore-checkpoint"
VERSION = 2  # the version both layouts write, and the newest one read
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


@dataclass
class CheckpointParts:
    """What a checkpoint holds, read when it is taken: the model and its job, progress, optimizer, scaler, RNG."""

    model: torch.nn.Module
    config: JobConfig
    state: TrainState
    optimizer: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    extra: dict[str, Any] | None = None
    rng_states: Sequence[dict[str, torch.Tensor]] | None = None  # every rank's (gather_rng_states); None: this one's


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT inside a compiled and/or DDP-wrapped model."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    return getattr(model, "module", model)  # DDP wrapper


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, without a tied head (it is the token embedding)."""
    model = unwrap(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        state.pop("head.weight", None)
    return state


def new_meta(parts: CheckpointParts) -> dict[str, Any]:
    """The meta.json fields both layouts write: format, config, train state, extras and an enabled scaler's state."""
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": parts.config.to_dict(),
        "state": parts.state.to_dict(),
        "extra": parts.extra or {},
    }
    scaler = parts.scaler
    if scaler is not None and scaler.is_enabled():
        meta["scaler"] = {k: (v.item() if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
    return meta


def optimizer_slots(
    tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Each parameter's optimizer slots, by parameter key: tensors named ``<param>.<slot>`` and the scalar slots."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param, slot = key.rsplit(".", 1)
        state.setdefault(param, {})[slot] = value
    for param, slots in scalars.items():
        state.setdefault(param, {}).update(slots)
    return state


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


def is_sharded(meta: dict[str, Any]) -> bool:
    """Whether a checkpoint's ``meta.json`` (`read_meta`) describes the sharded layout."""
    return meta.get("layout") == SHARDED


def job_config(path: Path, meta: dict[str, Any]) -> JobConfig:
    """The job a checkpoint was taken from, as its meta.json records it."""
    try:
        return JobConfig.from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / META_FILE}: invalid config ({exc})") from None


def check_file(file: Path, expected_size: int | None) -> None:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint is incomplete, pick another one")
    size = file.stat().st_size
    if expected_size is not None and size != expected_size:
        raise CheckpointError(
            f"{file} is truncated or altered ({size} bytes, metadata says {expected_size}); pick an earlier checkpoint"
        )


def load_tensors(file: Path, expected_size: int | None) -> dict[str, torch.Tensor]:
    check_file(file, expected_size)
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file} is corrupt or truncated ({exc}); pick an earlier checkpoint") from None
