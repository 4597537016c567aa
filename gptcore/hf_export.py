"""gptcore checkpoints written as Hugging Face GPT-2 folders (config.json, model.safetensors, tokenizer files).

Biases a gptcore model does not have (``qkv_bias``/``bias`` false) are exported as zeros, which computes the
same function; `gptcore.load_pretrained` accepts them back into a bias-free model because they are zero.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from gptcore.checkpoint import load_model
from gptcore.checkpoint_format import CheckpointError
from gptcore.config import GPTConfig
from gptcore.files import replace_dir
from gptcore.gpt2_layout import HF_CONFIG, HF_SAFETENSORS, LINEARS
from gptcore.model import GPT


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
        for hf, ours in LINEARS.items():
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
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer(folder: Path) -> None:
    """GPT-2's BPE files, which HF names vocab.json (encoder.json) and merges.txt (vocab.bpe)."""
    from gptcore import tokenizer as tok

    try:
        shutil.copyfile(tok.bpe_file("encoder.json", tok.ENCODER_JSON_SHA256), folder / "vocab.json")
        shutil.copyfile(tok.bpe_file("vocab.bpe", tok.VOCAB_BPE_SHA256), folder / "merges.txt")
    except tok.TokenizerError as exc:
        warnings.warn(f"exported without tokenizer files: {exc}", stacklevel=3)
