"""Pretrained GPT-2 weights in and out: Hugging Face folders or ids, OpenAI TF checkpoints, HF export.

`load_pretrained_into` copies GPT-2 weights into a `GPT` whose config fits them (`config_from_pretrained`
gives the fields). Sources, in the order they are tried:

    a local Hugging Face folder   config.json + model.safetensors (or pytorch_model.bin, read with
                                  ``weights_only=True``: nothing arbitrary is unpickled)
    a local OpenAI TF folder      checkpoint, model.ckpt.*, hparams.json (needs TensorFlow, extra ``tf``)
    a Hugging Face model id       ``gpt2``, ``gpt2-medium``, ``openai-community/gpt2-xl``, ... downloaded
                                  with huggingface_hub (extra ``hub``; needs internet or a filled cache)

Every checkpoint is first mapped to gptcore names in nn.Linear layout (HF's Conv1D weights and
OpenAI's (1, in, out) weights are transposed; the fused c_attn keeps its q, k, v order, which is
gptcore's), then copied with `assign`, which checks every shape. A smaller ``model.context_length``
crops the position table; a padded vocabulary keeps its extra rows as initialised.

`export_hf` writes any gptcore checkpoint as a Hugging Face GPT-2 folder. Biases a gptcore model
does not have (``qkv_bias``/``bias`` false) are exported as zeros, which computes the same function;
importing such a folder back into a bias-free model accepts them because they are zero.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from gptcore.checkpoint import CheckpointError, _replace_dir, check_shape, init_source_kind, load_model
from gptcore.config import PRESETS, GPTConfig
from gptcore.model import GPT

HF_CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_BIN = "pytorch_model.bin"
TF_HPARAMS = "hparams.json"
SAFETENSORS_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
BIN_PATTERNS = ["config.json", "pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")

# HF GPT-2 module names -> gptcore module names, for the four Conv1D layers of a block.
_LINEARS = {"attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
_HF_BLOCK = re.compile(r"h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)")
_HF_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers of older transformers
_TF_BLOCK = re.compile(r"model/h(\d+)/(ln_1|ln_2|attn/c_attn|attn/c_proj|mlp/c_fc|mlp/c_proj)/(w|b|g)")


@dataclass
class Pretrained:
    """A checkpoint mapped to gptcore names (nn.Linear layout) plus the model fields it needs."""

    state: dict[str, torch.Tensor]
    fields: dict[str, Any]
    fmt: str  # "hf-safetensors", "hf-bin" or "openai-tf"
    path: str
    sources: dict[str, str] = field(default_factory=dict)  # gptcore name -> checkpoint key
    unused: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- shape-checked copy


def assign(name: str, target: torch.Tensor, value: torch.Tensor | np.ndarray) -> None:
    """Copy ``value`` into ``target`` in place; a shape mismatch raises `CheckpointError` naming ``name``."""
    value = torch.as_tensor(value)
    check_shape(name, target, value)
    with torch.no_grad():
        target.copy_(value)


# --------------------------------------------------------------------------- key mapping


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
    return f"blocks.{layer}.{_LINEARS.get(module, module)}.{kind}", module in _LINEARS and kind == "weight"


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
    if module in _LINEARS:
        if kind == "g":
            return None, False
        return f"blocks.{layer}.{_LINEARS[module]}.{'weight' if kind == 'w' else 'bias'}", kind == "w"
    if kind == "w":
        return None, False
    return f"blocks.{layer}.{module}.{'weight' if kind == 'g' else 'bias'}", False


# --------------------------------------------------------------------------- model fields


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
    return _fields(
        vocab_size=cfg.get("vocab_size", 50257),
        context_length=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
        d_model=d_model,
        n_heads=cfg.get("n_head", 12),
        n_layers=cfg.get("n_layer", 12),
        mlp_ratio=hidden // d_model,
        tie_weights=bool(cfg.get("tie_word_embeddings", True)),
        layer_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
    )


def fields_from_openai_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """GPTConfig fields from OpenAI's ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer)."""
    try:
        return _fields(
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


def _fields(**values: Any) -> dict[str, Any]:
    return {**values, "qkv_bias": True, "bias": True, "pos_emb": "learned"}


def config_from_pretrained(source: str) -> dict[str, Any]:
    """The model fields (GPTConfig keyword arguments) a checkpoint needs, e.g. for ``model.*`` overrides.

    For a model id only ``config.json`` is downloaded.
    """
    path = _resolve(source, weights=False)
    if _is_hf_folder(path, weights=False):
        return fields_from_hf_config(_read_json(path / HF_CONFIG), str(path / HF_CONFIG))
    if (path / TF_HPARAMS).is_file():
        return fields_from_openai_hparams(_read_json(path / TF_HPARAMS))
    raise _not_a_checkpoint(path)


# --------------------------------------------------------------------------- finding and reading


def _resolve(source: str, *, weights: bool) -> Path:
    """A local folder for ``source``: the folder itself, or a Hugging Face Hub download."""
    path = Path(source).expanduser()
    if init_source_kind(source) == "hub":
        return _download(source, weights=weights)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{source} is a file; pass the folder that holds the checkpoint files")
    raise CheckpointError(f"{source} does not exist; pass an existing folder or a Hugging Face model id")


def _download(model_id: str, *, weights: bool) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{model_id!r} is not a local folder, and downloading it from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'gpt-orchestrator[hub]'; offline, pass a local folder with "
            "config.json and model.safetensors instead (e.g. --set train.init_from=/path/to/gpt2)"
        ) from None
    try:
        folder = Path(snapshot_download(model_id, allow_patterns=SAFETENSORS_PATTERNS if weights else [HF_CONFIG]))
        if weights and not _weight_files(folder):
            folder = Path(snapshot_download(model_id, allow_patterns=BIN_PATTERNS))
    except Exception as exc:  # offline, unknown or gated id: huggingface_hub raises many types
        raise CheckpointError(
            f"could not download {model_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "this needs internet access (or the model in the local HF cache). Offline, pass a local folder "
            "with config.json and model.safetensors instead (e.g. --set train.init_from=/path/to/gpt2)"
        ) from None
    if weights and not _weight_files(folder):
        raise CheckpointError(f"{model_id!r} on the Hugging Face Hub has no model.safetensors or pytorch_model.bin")
    return folder


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of a HF folder: safetensors first, else pytorch_model.bin (single or sharded)."""
    for single, index in ((HF_SAFETENSORS, f"{HF_SAFETENSORS}.index.json"), (HF_BIN, f"{HF_BIN}.index.json")):
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            shards = sorted(set(_read_json(folder / index).get("weight_map", {}).values()))
            return [folder / s for s in shards]
    return []


def _is_hf_folder(path: Path, *, weights: bool) -> bool:
    return (path / HF_CONFIG).is_file() and (not weights or bool(_weight_files(path)))


def _is_tf_folder(path: Path) -> bool:
    return (path / "checkpoint").is_file() or any(path.glob("*.ckpt*.index"))


def _not_a_checkpoint(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a pretrained GPT-2 folder: expected a Hugging Face folder (config.json plus "
        "model.safetensors or pytorch_model.bin), an OpenAI TF checkpoint (checkpoint, model.ckpt.*, "
        "hparams.json) or a gptcore checkpoint (meta.json)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable or not JSON ({exc})") from None


def read_pretrained(source: str) -> Pretrained:
    """Read a checkpoint (folder or model id) and map it to gptcore names."""
    path = _resolve(source, weights=True)
    if _is_hf_folder(path, weights=True):
        return _read_hf(path)
    if _is_tf_folder(path):
        return _read_openai_tf(path)
    raise _not_a_checkpoint(path)


def _read_hf(path: Path) -> Pretrained:
    fields = fields_from_hf_config(_read_json(path / HF_CONFIG), str(path / HF_CONFIG))
    files = _weight_files(path)
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


def _read_openai_tf(path: Path) -> Pretrained:
    if not (path / TF_HPARAMS).is_file():
        raise CheckpointError(f"{path}: an OpenAI TF checkpoint folder needs {TF_HPARAMS} (n_head cannot be inferred)")
    fields = fields_from_openai_hparams(_read_json(path / TF_HPARAMS))
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


# --------------------------------------------------------------------------- loading into a model


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


# --------------------------------------------------------------------------- export


def gptcore_to_hf(model: GPT) -> dict[str, torch.Tensor]:
    """The model's weights as a HF ``GPT2LMHeadModel`` state dict (Conv1D layout, zeros for absent biases)."""
    c, sd = model.config, model.state_dict()
    V, D = c.vocab_size, c.d_model
    out = {"transformer.wte.weight": sd["tok_emb.weight"][:V], "transformer.wpe.weight": sd["pos_emb.weight"]}
    for i in range(c.n_layers):
        p, q = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{q}{ln}.weight"] = sd[f"{p}{ln}.weight"]
            out[f"{q}{ln}.bias"] = sd.get(f"{p}{ln}.bias", sd[f"{p}{ln}.weight"].new_zeros(D))
        for hf, ours in _LINEARS.items():
            weight = sd[f"{p}{ours}.weight"]
            out[f"{q}{hf}.weight"] = weight.t()
            out[f"{q}{hf}.bias"] = sd.get(f"{p}{ours}.bias", weight.new_zeros(weight.shape[0]))
    out["transformer.ln_f.weight"] = sd["ln_f.weight"]
    out["transformer.ln_f.bias"] = sd.get("ln_f.bias", sd["ln_f.weight"].new_zeros(D))
    if not c.tie_weights:
        out["lm_head.weight"] = sd["head.weight"][:V]
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def hf_config(c: GPTConfig) -> dict[str, Any]:
    """A HF GPT-2 ``config.json`` for ``c``."""
    eot = 50256 if c.vocab_size > 50256 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.context_length,
        "n_ctx": c.context_length,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": None if c.mlp_ratio == 4 else c.mlp_ratio * c.d_model,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": c.tie_weights,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "use_cache": True,
    }


def check_exportable(c: GPTConfig) -> None:
    """GPT-2 has learned absolute positions; other position schemes cannot be exported."""
    if c.pos_emb != "learned":
        raise CheckpointError(
            f"model.pos_emb={c.pos_emb!r} cannot be exported as Hugging Face GPT-2, which only has learned "
            "absolute positions; export checkpoints trained with model.pos_emb=learned"
        )


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the gptcore checkpoint ``checkpoint_dir`` as a HF GPT-2 folder ``out_dir`` (atomically).

    The folder holds config.json, model.safetensors and, for GPT-2's vocabulary, the tokenizer files
    (vocab.json, merges.txt), so ``GPT2LMHeadModel.from_pretrained(out_dir)`` and
    ``AutoTokenizer.from_pretrained(out_dir)`` load it. An existing non-empty ``out_dir`` is replaced
    only with ``overwrite=True``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CheckpointError(f"{out} exists and is not empty; pick another folder or pass overwrite=True")
    model, _ckpt = load_model(checkpoint_dir)
    check_exportable(model.config)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(gptcore_to_hf(model), tmp / HF_SAFETENSORS, metadata={"format": "pt"})
        (tmp / HF_CONFIG).write_text(json.dumps(hf_config(model.config), indent=2))
        if model.config.vocab_size == 50257:
            _write_tokenizer(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer(folder: Path) -> None:
    """GPT-2's BPE files, which HF names vocab.json (encoder.json) and merges.txt (vocab.bpe)."""
    from gptcore import tokenizer as tok

    try:
        shutil.copyfile(tok._bpe_file("encoder.json", tok.ENCODER_JSON_SHA256), folder / "vocab.json")
        shutil.copyfile(tok._bpe_file("vocab.bpe", tok.VOCAB_BPE_SHA256), folder / "merges.txt")
    except tok.TokenizerError as exc:
        warnings.warn(f"exported without tokenizer files: {exc}", stacklevel=3)
