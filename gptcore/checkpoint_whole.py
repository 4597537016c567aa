"""The single-file checkpoint layout: a whole model's weights, optimizer and RNG states, written in the background.

`take_snapshot` copies what a checkpoint holds to host memory; `write_snapshot` writes it atomically; a
`CheckpointWriter` does that on a thread while training goes on. `read_whole` reads it back.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gptcore import files
from gptcore.checkpoint_format import (
    META_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    CheckpointParts,
    load_tensors,
    model_state_dict,
    new_meta,
    optimizer_slots,
)
from gptcore.checkpoint_rng import rng_tensors


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


def take_snapshot(parts: CheckpointParts, *, copy: bool = True) -> Snapshot:
    """Everything a checkpoint holds, as of now. ``copy=False`` shares CPU tensors (only for an immediate write)."""
    tensors = {k: _host(v, copy) for k, v in model_state_dict(parts.model).items()}
    meta = new_meta(parts)
    opt_tensors = rng_tensors(parts.rng_states)
    if parts.optimizer is not None:
        sd = parts.optimizer.state_dict()
        meta["optimizer"] = {"param_groups": sd["param_groups"], "scalars": {}}
        for idx, slots in sd["state"].items():
            for name, value in slots.items():
                if torch.is_tensor(value):
                    opt_tensors[f"state.{idx}.{name}"] = _host(value, copy)
                else:
                    meta["optimizer"]["scalars"][f"{idx}.{name}"] = value
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
            files.fsync(tmp / name)
        files.replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_checkpoint(path: str | Path, **parts: Any) -> Path:
    """Write a checkpoint folder at ``path`` now, atomically; ``parts`` are the fields of `CheckpointParts`."""
    return write_snapshot(take_snapshot(CheckpointParts(**parts), copy=False), path)


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


def read_whole(
    path: Path, meta: dict[str, Any], *, with_weights: bool, with_optimizer: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, dict[str, torch.Tensor]]:
    """A single-file checkpoint's weights, optimizer state (as ``Optimizer.state_dict()`` has it) and RNG tensors;
    each empty (None) when not asked for."""
    sizes = meta.get("files", {})
    weights = load_tensors(path / MODEL_FILE, sizes.get(MODEL_FILE)) if with_weights else {}
    if not with_optimizer:
        return weights, None, {}
    tensors = load_tensors(path / OPTIMIZER_FILE, sizes.get(OPTIMIZER_FILE))
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    if "optimizer" not in meta:
        return weights, None, rng
    saved = meta["optimizer"]
    scalars: dict[str, dict[str, Any]] = {}
    for key, value in saved.get("scalars", {}).items():  # "<index>.<slot>"
        index, slot = key.split(".", 1)
        scalars.setdefault(index, {})[slot] = value
    moments = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
    state = {int(index): slots for index, slots in optimizer_slots(moments, scalars).items()}
    return weights, {"state": state, "param_groups": saved["param_groups"]}, rng
