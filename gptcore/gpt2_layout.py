"""What GPT-2 checkpoint readers and writers share: file and layer names, fixed fields, the mapped checkpoint.

Every reader (`gptcore.hf_import`, `gptcore.openai_tf`) maps its checkpoint to gptcore names in nn.Linear
layout and returns a `Pretrained`; `gptcore.load_pretrained` copies one into a model and `gptcore.hf_export`
writes the other way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptcore.checkpoint_format import CheckpointError

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_BIN = "pytorch_model.bin"

# HF GPT-2 module names -> gptcore module names, for the four Conv1D layers of a block.
LINEARS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}


@dataclass
class Pretrained:
    """A checkpoint mapped to gptcore names (nn.Linear layout) plus the model fields it needs."""

    state: dict[str, torch.Tensor]
    fields: dict[str, Any]
    fmt: str  # "hf-safetensors", "hf-bin" or "openai-tf"
    path: str
    sources: dict[str, str] = field(default_factory=dict)  # gptcore name -> checkpoint key
    unused: list[str] = field(default_factory=list)


def gpt2_fields(**values: Any) -> dict[str, Any]:
    """GPTConfig fields: ``values`` plus what every GPT-2 has (biases everywhere, learned positions)."""
    return {**values, "qkv_bias": True, "bias": True, "pos_emb": "learned"}


def read_json(path: Path) -> dict[str, Any]:
    """A checkpoint's JSON file; unreadable or invalid JSON raises `CheckpointError`."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not JSON ({exc})") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder: safetensors first, else pytorch_model.bin (single or sharded)."""
    for single, index in ((HF_SAFETENSORS, f"{HF_SAFETENSORS}.index.json"), (HF_BIN, f"{HF_BIN}.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(read_json(folder / index).get("weight_map", {}).values()))
            return [folder / s for s in shards]
    return []


def is_hf_folder(path: Path, *, weights: bool) -> bool:
    """``path`` holds a HF config.json and, with ``weights``, weight files too."""
    return (path / HF_CONFIG).is_file() and (not weights or bool(weight_files(path)))
