"""Pretrained GPT-2 weights into a gptcore model: read the source, check the model fits it, copy every tensor.

`load_pretrained_into` copies GPT-2 weights into a `GPT` whose config fits them (`config_from_pretrained`
gives the fields). Sources, in the order they are tried:

    a local Hugging Face folder   config.json + model.safetensors or pytorch_model.bin (`gptcore.hf_import`)
    a local OpenAI TF folder      checkpoint, model.ckpt.*, hparams.json (`gptcore.openai_tf`)
    a Hugging Face model id       ``gpt2``, ``gpt2-medium``, ``openai-community/gpt2-xl``, ... downloaded
                                  first (`gptcore.hub`)

The readers map every checkpoint to gptcore names in nn.Linear layout (the fused c_attn keeps its q, k, v
order, which is gptcore's); here it is copied with `assign`, which checks every shape. A smaller
``model.context_length`` crops the position table; a padded vocabulary keeps its extra rows as initialised.
Zero biases of a bias-free model's checkpoint (written by `gptcore.hf_export`) are accepted and dropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptcore.checkpoint import check_shape
from gptcore.checkpoint_format import CheckpointError
from gptcore.config import PRESETS, GPTConfig
from gptcore.gpt2_layout import Pretrained, is_hf_folder
from gptcore.hf_import import read_hf, read_hf_fields
from gptcore.hub import pretrained_folder
from gptcore.model import GPT
from gptcore.openai_tf import TF_HPARAMS, is_tf_folder, read_openai_fields, read_openai_tf


def assign(name: str, target: torch.Tensor, value: torch.Tensor | np.ndarray) -> None:
    """Copy ``value`` into ``target`` in place; a shape mismatch raises `CheckpointError` naming ``name``."""
    value = torch.as_tensor(value)
    check_shape(name, target, value)
    with torch.no_grad():
        target.copy_(value)


# --------------------------------------------------------------------------- reading


def config_from_pretrained(source: str) -> dict[str, Any]:
    """The model fields (GPTConfig keyword arguments) a checkpoint needs, e.g. for ``model.*`` overrides.

    For a model id only ``config.json`` is downloaded.
    """
    path = pretrained_folder(source, weights=False)
    if is_hf_folder(path, weights=False):
        return read_hf_fields(path)
    if (path / TF_HPARAMS).is_file():
        return read_openai_fields(path)
    raise _not_a_checkpoint(path)


def read_pretrained(source: str) -> Pretrained:
    """Read a checkpoint (folder or model id) and map it to gptcore names."""
    path = pretrained_folder(source, weights=True)
    if is_hf_folder(path, weights=True):
        return read_hf(path)
    if is_tf_folder(path):
        return read_openai_tf(path)
    raise _not_a_checkpoint(path)


def _not_a_checkpoint(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a pretrained GPT-2 folder: expected a Hugging Face folder (config.json plus "
        "model.safetensors or pytorch_model.bin), an OpenAI TF checkpoint (checkpoint, model.ckpt.*, "
        "hparams.json) or a gptcore checkpoint (meta.json)"
    )


# --------------------------------------------------------------------------- copying into a model


def load_pretrained_into(model: GPT, source: str) -> dict[str, Any]:
    """Copy the weights of ``source`` (folder or HF model id) into ``model``; returns a JSON-able report.

    Raises `CheckpointError` when the model config does not fit the checkpoint (naming the fields to
    set), when required weights are missing, or when a tensor has the wrong shape.
    """
    return copy_pretrained(model, read_pretrained(source), source)


def copy_pretrained(model: GPT, pre: Pretrained, source: str | None = None) -> dict[str, Any]:
    """Copy an already read checkpoint into ``model`` (see `load_pretrained_into`)."""
    source = source or pre.path
    c: GPTConfig = model.config
    check_compatible(c, pre.fields, source)
    state, sources = dict(pre.state), dict(pre.sources)
    targets = dict(model.named_parameters())  # a tied head appears once, as tok_emb.weight
    head = "tied"
    if "head.weight" in targets and "head.weight" not in state and "tok_emb.weight" in state:
        state["head.weight"] = state["tok_emb.weight"]
        sources["head.weight"] = sources.get("tok_emb.weight", "tok_emb.weight") + " (untied copy)"
        head = "copied from the token embedding"
    elif "head.weight" in targets:
        head = "lm_head"
    missing = sorted(set(targets) - set(state))
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} required weight(s): {', '.join(missing[:6])}"
            f"{'...' if len(missing) > 6 else ''}; the checkpoint is incomplete or not a GPT-2 model"
        )
    dropped = _drop_zero_biases(state, targets, c, source)
    cropped = None
    if "pos_emb.weight" in targets and state["pos_emb.weight"].shape[0] > c.context_length:
        cropped = f"{state['pos_emb.weight'].shape[0]}->{c.context_length}"
        state["pos_emb.weight"] = state["pos_emb.weight"][: c.context_length]
    pairs = [(_described(n, sources), _rows(targets[n], state[n], c), state[n]) for n in targets]
    for name, target, value in pairs:  # check every shape before copying anything
        check_shape(name, target, value)
    for name, target, value in pairs:
        assign(name, target, value)
    return {
        "init_source": source,
        "init_path": pre.path,
        "init_format": pre.fmt,
        "unused_keys": sorted(pre.unused + [sources[n] for n in set(state) - set(targets) - set(dropped)]),
        "missing_keys": [],
        "zero_biases_dropped": dropped,
        "cropped_context": cropped,
        "padded_vocab_rows_kept": c.padded_vocab_size - c.vocab_size,
        "head": head,
    }


def _described(name: str, sources: Mapping[str, str]) -> str:
    return f"{name} (checkpoint key {sources[name]})" if name in sources else name


def _rows(target: torch.Tensor, value: torch.Tensor, c: GPTConfig) -> torch.Tensor:
    """The first ``vocab_size`` rows of a padded (vocab, d) target when the checkpoint has exactly those."""
    padded = c.padded_vocab_size > c.vocab_size and target.shape[0] == c.padded_vocab_size
    if padded and target.dim() == 2 and value.shape[0] == c.vocab_size:
        return target[: c.vocab_size]
    return target


def _drop_zero_biases(
    state: dict[str, torch.Tensor], targets: Mapping[str, torch.Tensor], c: GPTConfig, source: str
) -> list[str]:
    """Drop checkpoint biases the bias-free model lacks when they are zero (exported by `export_hf`)."""
    dropped = []
    for name in sorted(set(state) - set(targets)):
        if not name.endswith(".bias"):
            continue
        field_name = "model.qkv_bias" if name.endswith("attn.qkv.bias") else "model.bias"
        if bool(state[name].any()):
            raise CheckpointError(
                f"{field_name}={getattr(c, field_name[6:])} does not fit {source}: the checkpoint has non-zero "
                f"biases ({name}); set {field_name}=true"
            )
        dropped.append(name)
    return dropped


def check_compatible(c: GPTConfig, fields: Mapping[str, Any], source: str) -> None:
    """Raise `CheckpointError` naming each model field that does not fit the checkpoint's ``fields``."""
    bad = [
        f"model.{k} is {getattr(c, k)!r}, the checkpoint needs {fields[k]!r}"
        for k in ("pos_emb", "vocab_size", "d_model", "n_heads", "n_layers", "mlp_ratio")
        if getattr(c, k) != fields[k]
    ]
    if not math.isclose(c.layer_norm_eps, fields["layer_norm_eps"], rel_tol=1e-6):
        bad.append(f"model.layer_norm_eps is {c.layer_norm_eps!r}, the checkpoint needs {fields['layer_norm_eps']!r}")
    if c.context_length > fields["context_length"]:
        bad.append(f"model.context_length is {c.context_length}, the checkpoint needs <= {fields['context_length']}")
    if c.tie_weights and not fields["tie_weights"]:
        bad.append("model.tie_weights is True, the checkpoint has a separate lm_head: it needs False")
    if bad:
        raise CheckpointError(
            f"the model config does not fit the checkpoint {source}: {'; '.join(bad)}. "
            f"Set these fields (e.g. --set model.d_model=...){_preset_hint(fields)}"
        )


def _preset_hint(fields: Mapping[str, Any]) -> str:
    shape = ("d_model", "n_heads", "n_layers")
    for name, preset in PRESETS.items():
        if name.startswith("gpt2") and all(preset[k] == fields[k] for k in shape):
            return f", or use model.preset={name}"
    return ""
