"""Hugging Face GPT-2 folders read into gptcore names: config.json fields and the weights, Conv1D transposed.

A folder holds config.json plus model.safetensors or pytorch_model.bin (single or sharded). A .bin file is
read with ``weights_only=True``: nothing arbitrary is unpickled.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from gptcore.checkpoint_format import CheckpointError
from gptcore.gpt2_layout import HF_CONFIG, LINEARS, Pretrained, gpt2_fields, read_json, weight_files

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")

_HF_BLOCK = re.compile(r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)")
_HF_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers of older transformers


def hf_to_gptcore(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Map a HF GPT-2 state dict to gptcore names: (state, gptcore -> HF key, unused HF keys).

    Accepts keys with or without the ``transformer.`` prefix; Conv1D weights (in, out) are transposed;
    causal-mask buffers (``attn.bias``, ``attn.masked_bias``) are dropped.
    """
    state, sources, unused = {}, {}, []
    for key, tensor in sd.items():
        short = key.removeprefix("transformer.")
        name, transpose = _hf_name(short)
        if name is None:
            if not _HF_BUFFER.fullmatch(short):
                unused.append(key)
            continue
        state[name] = tensor.t() if transpose else tensor
        sources[name] = key + (" (Conv1D, transposed)" if transpose else "")
    return state, sources, sorted(unused)


def _hf_name(key: str) -> tuple[str | None, bool]:
    fixed = {"wte.weight": "tok_emb.weight", "wpe.weight": "pos_emb.weight", "lm_head.weight": "head.weight"}
    if key in fixed:
        return fixed[key], False
    if key in ("ln_f.weight", "ln_f.bias"):
        return key, False
    m = _HF_BLOCK.fullmatch(key)
    if m is None:
        return None, False
    layer, module, kind = m.groups()
    return f"blocks.{layer}.{LINEARS.get(module, module)}.{kind}", module in LINEARS and kind == "weight"


def fields_from_hf_config(cfg: Mapping[str, Any], where: str = HF_CONFIG) -> dict[str, Any]:
    """GPTConfig fields from a HF GPT-2 ``config.json``; unsupported variants raise `CheckpointError`."""
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"{where}: model_type {cfg['model_type']!r} is not GPT-2; gptcore loads gpt2 only")
    act = cfg.get("activation_function", "gelu_new")
    problems = []
    if act not in TANH_GELUS:
        problems.append(f"activation_function {act!r} (gptcore uses tanh-GELU, gelu_new)")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("non-standard attention scaling (scale_attn_weights / scale_attn_by_inverse_layer_idx)")
    if cfg.get("add_cross_attention", False):
        problems.append("cross-attention layers")
    d_model = cfg.get("n_embd", 768)
    hidden = cfg.get("n_inner") or 4 * d_model
    if hidden % d_model:
        problems.append(f"n_inner={hidden}, not a multiple of n_embd={d_model}")
    if problems:
        raise CheckpointError(f"{where}: gptcore cannot represent this GPT-2 variant: {'; '.join(problems)}")
    return gpt2_fields(
        vocab_size=cfg.get("vocab_size", 50257),
        context_length=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
        d_model=d_model,
        n_heads=cfg.get("n_head", 12),
        n_layers=cfg.get("n_layer", 12),
        mlp_ratio=hidden // d_model,
        tie_weights=bool(cfg.get("tie_word_embeddings", True)),
        layer_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
    )


def read_hf_fields(path: Path) -> dict[str, Any]:
    """GPTConfig fields from the config.json of HF folder ``path``."""
    return fields_from_hf_config(read_json(path / HF_CONFIG), str(path / HF_CONFIG))


def read_hf(path: Path) -> Pretrained:
    """The HF GPT-2 folder ``path`` (config.json and weight files) mapped to gptcore names."""
    fields = read_hf_fields(path)
    files = weight_files(path)
    sd: dict[str, torch.Tensor] = {}
    for file in files:
        sd.update(_load_hf_file(file))
    state, sources, unused = hf_to_gptcore(sd)
    if fields["tie_weights"] and "head.weight" in state:  # a tied head saved anyway: it is the embedding
        state.pop("head.weight")
    fmt = "hf-safetensors" if files[0].name.endswith(".safetensors") else "hf-bin"
    return Pretrained(state, fields, fmt, str(path), sources, unused)


def _load_hf_file(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing; the checkpoint folder is incomplete")
    try:
        if file.name.endswith(".safetensors"):
            return load_file(file)
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors
        raise CheckpointError(
            f"{file} is corrupt or not a plain tensor file ({type(exc).__name__}: {exc}); "
            "only tensors are read (weights_only=True), convert it to model.safetensors"
        ) from None
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file} holds a {type(sd).__name__}, not a state dict")
    return {k: v for k, v in sd.items() if torch.is_tensor(v)}
