"""OpenAI's TF GPT-2 checkpoints read into gptcore names: hparams.json fields and the variables, transposed.

A folder holds ``checkpoint``, ``model.ckpt.*`` and ``hparams.json``. Reading the variables needs TensorFlow
(extra ``tf``), imported only here and only then; the key mapping is a pure function of the arrays.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptcore.checkpoint_format import CheckpointError
from gptcore.gpt2_layout import LINEARS, Pretrained, gpt2_fields, read_json

TF_HPARAMS = "hparams.json"

_TF_BLOCK = re.compile(r"model/h(\d+)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/(w|b|g)")


def openai_tf_to_gptcore(
    params: Mapping[str, np.ndarray],
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Map OpenAI's TF GPT-2 variables (``model/wte``, ``model/h0/attn/c_attn/w`` (1, D, 3D), ...) to gptcore.

    A pure function of ``{variable name: array}``; returns (state, gptcore -> TF name, unused names).
    """
    state, sources, unused = {}, {}, []
    for key, array in params.items():
        name, transpose = _tf_name(key)
        if name is None:
            unused.append(key)
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if transpose:
            tensor = (tensor[0] if tensor.dim() == 3 and tensor.shape[0] == 1 else tensor).t()
        state[name] = tensor
        sources[name] = key + (" ((1, in, out), transposed)" if transpose else "")
    return state, sources, sorted(unused)


def _tf_name(key: str) -> tuple[str | None, bool]:
    fixed = {"model/wte": "tok_emb.weight", "model/wpe": "pos_emb.weight"}
    fixed |= {"model/ln_f/g": "ln_f.weight", "model/ln_f/b": "ln_f.bias"}
    if key in fixed:
        return fixed[key], False
    m = _TF_BLOCK.fullmatch(key)
    if m is None:
        return None, False
    layer, module, kind = m.groups()
    module = module.replace("/", ".")
    if module in LINEARS:
        if kind == "g":
            return None, False
        return f"blocks.{layer}.{LINEARS[module]}.{'weight' if kind == 'w' else 'bias'}", kind == "w"
    if kind == "w":
        return None, False
    return f"blocks.{layer}.{module}.{'weight' if kind == 'g' else 'bias'}", False


def fields_from_openai_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """GPTConfig fields from OpenAI's ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
    try:
        return gpt2_fields(
            vocab_size=hparams["n_vocab"],
            context_length=hparams["n_ctx"],
            d_model=hparams["n_embd"],
            n_heads=hparams["n_head"],
            n_layers=hparams["n_layer"],
            mlp_ratio=4,
            tie_weights=True,
            layer_norm_eps=1e-5,
        )
    except KeyError as exc:
        raise CheckpointError(f"{TF_HPARAMS} lacks {exc}; it needs n_vocab, n_ctx, n_embd, n_head, n_layer") from None


def read_openai_fields(path: Path) -> dict[str, Any]:
    """GPTConfig fields from the hparams.json of TF checkpoint folder ``path``."""
    return fields_from_openai_hparams(read_json(path / TF_HPARAMS))


def is_tf_folder(path: Path) -> bool:
    """``path`` holds a TF checkpoint (a ``checkpoint`` file or ``*.ckpt*.index`` files)."""
    return (path / "checkpoint").is_file() or any(path.glob("*.ckpt*.index"))


def read_openai_tf(path: Path) -> Pretrained:
    """The OpenAI TF checkpoint folder ``path`` mapped to gptcore names."""
    if not (path / TF_HPARAMS).is_file():
        raise CheckpointError(f"{path}: an OpenAI TF checkpoint folder needs {TF_HPARAMS} (n_head cannot be inferred)")
    fields = read_openai_fields(path)
    state, sources, unused = openai_tf_to_gptcore(read_tf_variables(path))
    return Pretrained(state, fields, "openai-tf", str(path), sources, unused)


def read_tf_variables(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of the latest TF checkpoint in folder ``path`` (imports TensorFlow lazily)."""
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
    except ImportError:
        raise CheckpointError(
            "reading OpenAI TF checkpoints needs TensorFlow: pip install 'gpt-orchestrator[tf]' "
            "(or convert the checkpoint to a Hugging Face folder elsewhere and pass that)"
        ) from None
    prefix = tf.train.latest_checkpoint(str(path))
    if prefix is None:
        raise CheckpointError(f"{path}: no TF checkpoint found (expected a 'checkpoint' file and model.ckpt.*)")
    try:
        reader = tf.train.load_checkpoint(prefix)
        return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}
    except Exception as exc:  # tf.errors.* (missing or corrupt shards)
        raise CheckpointError(f"{prefix}: unreadable TF checkpoint ({type(exc).__name__}: {exc})") from None
