"""Reading a checkpoint back, whichever layout wrote it, and checking that it fits a model or a run."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from gptcore.checkpoint_format import (
    META_FILE,
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    TrainState,
    check_file,
    is_sharded,
    job_config,
    model_state_dict,
    read_meta,
)
from gptcore.checkpoint_sharded import check_sharded_files, read_sharded, sharded_shapes
from gptcore.checkpoint_whole import read_whole
from gptcore.config import GPTConfig, JobConfig


def load_checkpoint(path: str | Path, *, with_optimizer: bool = True, with_weights: bool = True) -> Checkpoint:
    """Read a checkpoint folder (CPU tensors), checking it is complete.

    A sharded checkpoint is read into full tensors by this process alone, as if it had been saved whole (its
    optimizer state numbered as ``Optimizer.state_dict()`` numbers it). ``with_weights=False`` leaves the weights
    (and the optimizer state) out: the metadata, train state and RNG states only.
    """
    path = Path(path)
    meta = read_meta(path)
    config = job_config(path, meta)
    read = read_sharded if is_sharded(meta) else read_whole
    weights, optimizer_state, rng = read(path, meta, with_weights=with_weights, with_optimizer=with_optimizer)
    return Checkpoint(
        path=path,
        config=config,
        model_state=weights,
        state=TrainState.from_dict(meta.get("state", {})),
        optimizer_state=optimizer_state,
        scaler_state=meta.get("scaler"),
        rng=rng,
        extra=meta.get("extra", {}),
    )


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
    theirs = job_config(path, meta).model
    if is_sharded(meta):
        check_sharded_files(path, meta)
        shapes = sharded_shapes(path)
        saved = {k.removeprefix("model."): tuple(v[0]) for k, v in shapes.items() if k.startswith("model.")}
    else:
        file = path / MODEL_FILE
        check_file(file, meta.get("files", {}).get(MODEL_FILE))
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
