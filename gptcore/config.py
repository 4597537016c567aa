"""Configuration as validated data: model presets, data and training settings.

A `JobConfig` is the whole description of one training run. It has three sections,
`model` (`GPTConfig`), `data` (`DataConfig`) and `train` (`TrainConfig`), and every field
is addressable by a dotted key such as ``model.pos_emb``, ``data.stride`` or ``train.lr``
(used by experiment grids and ``--set`` overrides). Validation happens once, at
construction, and raises `ConfigError` naming the offending field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

PosEmb = Literal["learned", "sinusoidal", "rope"]
POS_EMBS: tuple[str, ...] = typing.get_args(PosEmb)
InitScheme = Literal["gpt2", "torch"]
INIT_SCHEMES: tuple[str, ...] = typing.get_args(InitScheme)
Parallel = Literal["ddp", "fsdp"]
PARALLELS: tuple[str, ...] = typing.get_args(Parallel)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
#: Under FSDP the token embedding (and a tied head) is sharded by rows: its row count must be a multiple of this
#: (50257 -> 50304 with model.pad_vocab_multiple=64), so that every worker count that divides it shards evenly.
FSDP_VOCAB_MULTIPLE = 64


def resolved_precision(precision: str, device_type: str, bf16_faster: bool) -> str:
    """``train.precision`` as a run resolves it on a device: "fp32", "bf16" or "fp16".

    ``auto``: bf16 where it is the faster (``bf16_faster``: a GPU that supports it; a CPU where it measured faster
    for the workload, `gptcore.autoprecision`), fp16 (with a gradient scaler) on other GPUs, fp32 on other CPUs.
    """
    if precision != "auto":
        return precision
    if bf16_faster:
        return "bf16"
    return "fp16" if device_type == "cuda" else "fp32"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise `ConfigError` ``"key: message"`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def positive_int(value: Any, key: str) -> None:
    """``value`` of ``key`` must be an int > 0 (a bool is not an int here)."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        key,
        f"must be a positive integer, got {value!r}",
    )


def non_negative_int(value: Any, key: str) -> None:
    """``value`` of ``key`` must be an int >= 0 (a bool is not an int here)."""
    require(
        isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        key,
        f"must be an integer >= 0, got {value!r}",
    )


def finite_number(value: Any, key: str, *, low: float, high: float, low_open: bool = False) -> None:
    """``value`` of ``key`` must be a finite number in [low, high], or (low, high] with ``low_open``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if math.isinf(high):
        expected = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        expected = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}]"
    require(ok, key, f"must be {expected}, got {value!r}")


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class GPTConfig:
    """Shape and options of the decoder-only Transformer."""

    vocab_size: int = 50257
    context_length: int = 1024
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    dropout: float = 0.1
    qkv_bias: bool = True
    bias: bool = True  # biases of the other linear layers and LayerNorms (GPT-2: True)
    pos_emb: PosEmb = "learned"
    tie_weights: bool = True
    freeze_token_embeddings: bool = False
    layer_norm_eps: float = 1e-5
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    pad_vocab_multiple: int = 1  # e.g. 64 pads 50257 -> 50304 for faster matmuls on GPU
    # "gpt2": N(0, 0.02) weights, residual projections scaled by 1/sqrt(2 n_layers) (GPT-2, nanoGPT).
    # "torch": PyTorch's layer defaults (embeddings N(0, 1)), as the seed's book code does.
    init_scheme: InitScheme = "gpt2"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "n_layers", "mlp_ratio"):
            positive_int(getattr(self, name), f"model.{name}")
        positive_int(self.pad_vocab_multiple, "model.pad_vocab_multiple")
        require(
            self.d_model % self.n_heads == 0,
            "model.d_model",
            f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}; "
            f"set model.d_model to a multiple of {self.n_heads} or change model.n_heads",
        )
        require(
            self.pos_emb in POS_EMBS,
            "model.pos_emb",
            f"unknown positional embedding {self.pos_emb!r}; choose one of {', '.join(POS_EMBS)}",
        )
        require(
            self.init_scheme in INIT_SCHEMES,
            "model.init_scheme",
            f"unknown init scheme {self.init_scheme!r}; choose one of {', '.join(INIT_SCHEMES)}",
        )
        if self.pos_emb == "rope":
            require(
                self.head_dim % 2 == 0,
                "model.d_model",
                f"RoPE needs an even head dimension, got d_model/n_heads={self.head_dim}",
            )
        finite_number(self.dropout, "model.dropout", low=0.0, high=1.0)
        require(self.dropout < 1.0, "model.dropout", "must be < 1")
        finite_number(self.layer_norm_eps, "model.layer_norm_eps", low=0.0, high=1.0, low_open=True)
        finite_number(self.rope_base, "model.rope_base", low=1.0, high=1e9, low_open=True)
        for name in ("qkv_bias", "bias", "tie_weights", "freeze_token_embeddings"):
            require(isinstance(getattr(self, name), bool), f"model.{name}", "must be true or false")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m


_GPT2 = dict(vocab_size=50257, context_length=1024, qkv_bias=True, tie_weights=True, dropout=0.1)

#: Model presets. ``gpt2-*`` are OpenAI's GPT-2 shapes (tied head, biases everywhere);
#: ``tiny``/``micro`` are for tests and smoke runs (real tokenizer vocabulary, tiny width).
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": {**_GPT2, "d_model": 768, "n_heads": 12, "n_layers": 12},
    "gpt2-medium": {**_GPT2, "d_model": 1024, "n_heads": 16, "n_layers": 24},
    "gpt2-large": {**_GPT2, "d_model": 1280, "n_heads": 20, "n_layers": 36},
    "gpt2-xl": {**_GPT2, "d_model": 1600, "n_heads": 25, "n_layers": 48},
    "tiny": {**_GPT2, "context_length": 64, "d_model": 64, "n_heads": 4, "n_layers": 2},
    "micro": {**_GPT2, "context_length": 32, "d_model": 32, "n_heads": 2, "n_layers": 1},
}


def model_config(preset: str = "gpt2-small", **overrides: Any) -> GPTConfig:
    """A `GPTConfig` from a preset name plus field overrides."""
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return build_section(GPTConfig, {**PRESETS[preset], **overrides}, "model")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes (input, target) windows."""

    corpus: str | list[str] = "the-verdict"  # a named corpus, a file, a folder, a glob, or a list of those
    stride: int | None = None  # None: stride = context_length (non-overlapping windows)
    val_fraction: float = 0.1
    # auto: a single-document corpus (one text file) gives its last val_fraction of tokens to validation; a corpus
    # of many documents gives whole documents, drawn by a hash of their text (documents)
    split: Literal["auto", "tokens", "documents"] = "auto"
    val_tokens: int | None = None  # at most this many validation tokens are read (evaluation cost stays bounded)
    text_field: str = "text"  # the field holding the text in JSONL and Parquet corpora

    def __post_init__(self) -> None:
        corpus_ok = (isinstance(self.corpus, str) and self.corpus.strip() != "") or (
            isinstance(self.corpus, (list, tuple))
            and len(self.corpus) > 0
            and all(isinstance(c, str) and c for c in self.corpus)
        )
        require(corpus_ok, "data.corpus", f"must be a corpus name, a path or a list of paths, got {self.corpus!r}")
        if isinstance(self.corpus, tuple):
            object.__setattr__(self, "corpus", list(self.corpus))
        if self.stride is not None:
            positive_int(self.stride, "data.stride")
        finite_number(self.val_fraction, "data.val_fraction", low=0.0, high=1.0, low_open=True)
        require(self.val_fraction < 1.0, "data.val_fraction", "must be < 1 (some tokens must be left to train on)")
        require(
            self.split in ("auto", "tokens", "documents"),
            "data.split",
            f"must be 'auto', 'tokens' or 'documents', got {self.split!r}",
        )
        if self.val_tokens is not None:
            positive_int(self.val_tokens, "data.val_tokens")
        require(
            isinstance(self.text_field, str) and self.text_field != "",
            "data.text_field",
            f"must be a field name, got {self.text_field!r}",
        )


# --------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, evaluation, sampling and checkpoint cadence."""

    batch_size: int = 8  # windows per worker per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step (or derived from global_batch_size)
    # Windows per optimizer step across every worker (nanoGPT's and llm.c's total batch size): the micro-batches a
    # step accumulates are then global_batch_size / (batch_size x workers), whatever the number of workers, so a run
    # resumed on another count continues the same optimisation (`accumulation_steps`)
    global_batch_size: int | None = None
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (whatever the epochs)
    # Train on this many FLOPs (gptcore.accounting): as many optimizer steps as the budget buys, the LR schedule
    # ending where the run ends (a scaling ladder's trials each spend one budget)
    flops_budget: float | None = None
    lr: float = 4e-4
    min_lr: float = 0.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 50  # steps; 0 evaluates only at the end
    eval_iters: int = 5
    sample_every: int | None = None  # steps; None: at every evaluation; 0: never
    sample_prompt: str = "Every effort moves you"
    sample_max_new_tokens: int = 50
    sample_temperature: float = 0.0  # 0 = greedy
    sample_top_k: int | None = None
    checkpoint_every: int = 0  # steps; 0: once an epoch, at the first evaluation from its end (and at the end)
    seed: int = 123
    precision: Precision = "auto"
    compile: bool = False
    init_from: str = "scratch"  # "scratch", a GPT-2 model id ("gpt2", ...) or a local checkpoint path
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    num_threads: int = 0  # torch intra-op threads on CPU; 0 = torch's default
    # "ddp": every worker holds the whole model, gradients are all-reduced. "fsdp": FSDP2, parameters, gradients
    # and optimizer state sharded across the workers (each block, then the rest of the model, one group each)
    parallel: Parallel = "ddp"
    fsdp_cpu_offload: bool = False  # fsdp: keep the sharded parameters, gradients and optimizer state in host memory
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass (less memory)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum_steps", "epochs", "eval_iters"):
            positive_int(getattr(self, name), f"train.{name}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "sample_max_new_tokens", "num_threads"):
            non_negative_int(getattr(self, name), f"train.{name}")
        if self.max_steps is not None:
            positive_int(self.max_steps, "train.max_steps")
        if self.flops_budget is not None:
            finite_number(self.flops_budget, "train.flops_budget", low=0.0, high=math.inf, low_open=True)
        if self.global_batch_size is not None:
            positive_int(self.global_batch_size, "train.global_batch_size")
            require(
                self.grad_accum_steps == 1,
                "train.global_batch_size",
                "sets the gradient accumulation itself (global batch / (batch_size x workers)); leave "
                "train.grad_accum_steps out",
            )
            self.accumulation_steps(1)  # a single worker at least must divide it
        if self.sample_every is not None:
            non_negative_int(self.sample_every, "train.sample_every")
        if self.sample_top_k is not None:
            positive_int(self.sample_top_k, "train.sample_top_k")
        non_negative_int(self.seed, "train.seed")
        finite_number(self.lr, "train.lr", low=0.0, high=math.inf, low_open=True)
        finite_number(self.min_lr, "train.min_lr", low=0.0, high=self.lr)
        finite_number(self.weight_decay, "train.weight_decay", low=0.0, high=math.inf)
        finite_number(self.beta1, "train.beta1", low=0.0, high=1.0)
        finite_number(self.beta2, "train.beta2", low=0.0, high=1.0)
        finite_number(self.grad_clip, "train.grad_clip", low=0.0, high=1e6)
        finite_number(self.sample_temperature, "train.sample_temperature", low=0.0, high=100.0)
        require(
            self.lr_schedule in ("cosine", "constant"),
            "train.lr_schedule",
            f"must be 'cosine' or 'constant', got {self.lr_schedule!r}",
        )
        require(
            self.precision in PRECISIONS,
            "train.precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        require(isinstance(self.compile, bool), "train.compile", "must be true or false")
        require(
            self.parallel in PARALLELS,
            "train.parallel",
            f"unknown data parallelism {self.parallel!r}; choose one of {', '.join(PARALLELS)}",
        )
        for name in ("fsdp_cpu_offload", "activation_checkpointing"):
            require(isinstance(getattr(self, name), bool), f"train.{name}", "must be true or false")
        require(
            not self.fsdp_cpu_offload or self.parallel == "fsdp",
            "train.fsdp_cpu_offload",
            "only applies with train.parallel=fsdp (DDP keeps the whole model on each device); set both or neither",
        )
        require(
            not (self.parallel == "fsdp" and self.precision == "fp16"),
            "train.precision",
            "fp16 (with its gradient scaler) is not supported with train.parallel=fsdp; use bf16 or fp32",
        )
        require(
            isinstance(self.init_from, str) and self.init_from != "", "train.init_from", "must be a non-empty string"
        )
        require(isinstance(self.sample_prompt, str), "train.sample_prompt", "must be a string")

    def accumulation_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on ``world_size`` workers: ``grad_accum_steps``, or what
        ``global_batch_size`` takes there (a worker count whose batches do not divide it is refused, naming those
        that do)."""
        if self.global_batch_size is None:
            return self.grad_accum_steps
        per_micro_step = self.batch_size * world_size
        if self.global_batch_size % per_micro_step:
            windows = self.global_batch_size
            counts = ", ".join(str(w) for w in range(1, windows + 1) if windows % (self.batch_size * w) == 0)
            fits = f"worker counts that divide it: {counts}" if counts else "no worker count divides it"
            raise ConfigError(
                f"train.global_batch_size: {self.global_batch_size} is not a multiple of train.batch_size="
                f"{self.batch_size} x {world_size} worker(s) = {per_micro_step}; {fits} (or change train.batch_size)"
            )
        return self.global_batch_size // per_micro_step

    def windows_per_step(self, world_size: int = 1) -> int:
        """Windows one full optimizer step takes across ``world_size`` workers."""
        return self.batch_size * world_size * self.accumulation_steps(world_size)


# --------------------------------------------------------------------------- job


SECTIONS: dict[str, type] = {"model": GPTConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class JobConfig:
    """Everything one training run needs: model, data and training sections."""

    model: GPTConfig = field(default_factory=lambda: model_config("gpt2-small"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.parallel == "fsdp" and self.model.padded_vocab_size % FSDP_VOCAB_MULTIPLE:
            m = self.model
            padded = -(-m.vocab_size // FSDP_VOCAB_MULTIPLE) * FSDP_VOCAB_MULTIPLE
            raise ConfigError(
                f"model.pad_vocab_multiple: train.parallel=fsdp shards the {m.padded_vocab_size}-row token embedding "
                f"by rows, and {m.padded_vocab_size} rows do not split evenly across workers (with a tied head the "
                "last worker's rows are then never updated, pytorch#176076); set model.pad_vocab_multiple="
                f"{FSDP_VOCAB_MULTIPLE} ({padded} rows; padding rows are "
                "never a target, generation ignores them)"
            )

    @property
    def stride(self) -> int:
        return self.data.stride or self.model.context_length

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def flat(self) -> dict[str, Any]:
        """Every field as ``{"section.field": value}``."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobConfig:
        """Build from nested or dotted keys; ``model.preset`` picks the starting preset.

        ``{"model": {"preset": "tiny", "context_length": 32}, "train.lr": 1e-3}`` is valid.
        """
        nested = nest(raw)
        unknown = set(nested) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: unknown config section; valid sections are {', '.join(SECTIONS)}")
        model_raw = dict(nested.get("model", {}))
        preset = model_raw.pop("preset", "gpt2-small")
        return cls(
            model=model_config(preset, **_check_keys(GPTConfig, model_raw, "model")),
            data=build_section(DataConfig, nested.get("data", {}), "data"),
            train=build_section(TrainConfig, nested.get("train", {}), "train"),
        )


def nest(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Turn ``{"a.b": 1, "c": {"d": 2}}`` into ``{"a": {"b": 1}, "c": {"d": 2}}``."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.setdefault(key, {}).update(value)
            continue
        section, dot, name = key.partition(".")
        if not dot or not name:
            raise ConfigError(f"{key}: expected a dotted key 'section.field' (e.g. train.lr) or a section dict")
        out.setdefault(section, {})[name] = value
    return out


def valid_keys() -> list[str]:
    """All dotted keys a grid or ``--set`` may use."""
    keys = ["model.preset"]
    for section, cls in SECTIONS.items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def field_type(key: str) -> Any:
    """The annotated type of a dotted key (``model.preset`` is a str)."""
    if key == "model.preset":
        return str
    section, _, name = key.partition(".")
    cls = SECTIONS.get(section)
    hints = typing.get_type_hints(cls) if cls else {}
    if name not in hints:
        raise ConfigError(f"{key}: unknown config key; valid keys: {', '.join(valid_keys())}")
    return hints[name]


def did_you_mean(key: str, keys: Sequence[str]) -> str:
    """``"did you mean <k>?"`` for the one of ``keys`` that ``key`` most likely misspells, else ``""``.

    A key equal to ``key`` but for underscores wins (``train.batchsize``); else the closest by `difflib`.
    """
    bare = key.replace("_", "")
    close = [k for k in keys if k.replace("_", "") == bare] or difflib.get_close_matches(key, keys, n=1, cutoff=0.85)
    return f"did you mean {close[0]}?" if close else ""


def _check_keys(cls: type, values: dict[str, Any], section: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            suggestion = did_you_mean(f"{section}.{key}", [f"{section}.{n}" for n in sorted(names)])
            hint = f" ({suggestion})" if suggestion else ""
            raise ConfigError(
                f"{section}.{key}: unknown config key{hint}; valid keys in '{section}': {', '.join(sorted(names))}"
            )
    return values


def build_section(cls: type, values: dict[str, Any], section: str) -> Any:
    """``cls(**values)``: an unknown key or a value of the wrong type raises `ConfigError` naming ``section``."""
    try:
        return cls(**_check_keys(cls, values, section))
    except TypeError as exc:  # e.g. comparisons on a value of the wrong type
        raise ConfigError(f"{section}: invalid value ({exc})") from None
