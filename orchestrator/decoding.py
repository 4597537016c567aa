"""Decoding sweeps' configuration: one trained checkpoint, a grid of decoding settings.

An experiment with ``kind="decode"`` has ``decode.*`` keys instead of model/data/train keys::

    EXPERIMENT = Experiment(
        name="decoding_sweep",
        kind="decode",
        decode={"checkpoint": "best:stride_sweep", "prompts": ["Every effort moves you"], "num_samples": 5},
        grid={"decode.temperature": grid(0.7, 1.0, 1.5), "decode.top_k": grid(10, None)},
        metric="distinct_2",
        mode="max",
    )

``decode.checkpoint`` is a checkpoint folder, an ``s3://`` URI, or ``best:<experiment>``: the best checkpoint
of that experiment's latest sweep in the tracking store. The rest of a decode sweep, one way round:

- `orchestrator.decoding` (here): `DecodeConfig`, its keys and the metrics a decode trial reports; light, no
  Ray, no MLflow (experiment files and trial actors import it);
- `orchestrator.decode_plan`: on the driver, before Ray starts: ``decode.checkpoint`` resolved and checked
  (``best:<experiment>`` looked up with `orchestrator.results`), the dry-run table;
- `orchestrator.decode_trial`: the Tune trial: sample, measure, log to the trial's MLflow run.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from gptcore.config import (
    PRECISIONS,
    ConfigError,
    Precision,
    build_section,
    finite_number,
    non_negative_int,
    positive_int,
    require,
)

BEST_PREFIX = "best:"
DECODE_KIND = "decode"  # Experiment(kind=...) of a decode sweep; the other kind is "train"
DECODE_METRICS = ("distinct_1", "distinct_2", "repetition_rate", "self_perplexity")


@dataclass(frozen=True)
class DecodeConfig:
    """One decoding setting: which checkpoint, which prompts, how many samples, and how to sample."""

    checkpoint: str = ""  # a checkpoint folder, an s3:// URI, or best:<experiment>
    prompts: list[str] = field(default_factory=lambda: ["Every effort moves you"])
    num_samples: int = 4  # per prompt
    max_new_tokens: int = 50
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 123
    device: str = "auto"
    precision: Precision = "auto"

    def __post_init__(self) -> None:
        require(
            isinstance(self.checkpoint, str) and self.checkpoint.strip() != "",
            "decode.checkpoint",
            "is not set; pass a checkpoint folder or best:<experiment>, e.g. --set decode.checkpoint=best:lr_sweep",
        )
        require(
            isinstance(self.prompts, (list, tuple)) and len(self.prompts) > 0 and all(self.prompts),
            "decode.prompts",
            f"must be a non-empty list of non-empty strings, got {self.prompts!r}",
        )
        require(all(isinstance(p, str) for p in self.prompts), "decode.prompts", "must hold strings")
        object.__setattr__(self, "prompts", list(self.prompts))
        for name in ("num_samples", "max_new_tokens"):
            positive_int(getattr(self, name), f"decode.{name}")
        non_negative_int(self.seed, "decode.seed")
        finite_number(self.temperature, "decode.temperature", low=0.0, high=100.0)
        if self.top_k is not None:
            positive_int(self.top_k, "decode.top_k")
        if self.top_p is not None:
            finite_number(self.top_p, "decode.top_p", low=0.0, high=1.0, low_open=True)
        require(
            self.precision in PRECISIONS,
            "decode.precision",
            f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )

    def flat(self) -> dict[str, Any]:
        """Every field as ``{"decode.field": value}`` (MLflow params)."""
        return {f"decode.{k}": v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DecodeConfig:
        return build_section(cls, raw, "decode")


def is_decode(kind: str) -> bool:
    """The one test of an experiment's or a sweep's kind: decode (sample from a checkpoint), else train."""
    return kind == DECODE_KIND


def decode_keys() -> list[str]:
    """All dotted keys a decode experiment's grid or ``--set`` may use."""
    return [f"decode.{f.name}" for f in dataclasses.fields(DecodeConfig)]


def decode_field_type(key: str) -> Any:
    hints = typing.get_type_hints(DecodeConfig)
    name = key.removeprefix("decode.")
    if not key.startswith("decode.") or name not in hints:
        raise ConfigError(f"{key}: unknown decode key; valid keys: {', '.join(decode_keys())}")
    return hints[name]
