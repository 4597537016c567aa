"""Experiment files: a declarative description of a sweep, loaded and validated before anything starts.

An experiment file is a Python file that defines ``EXPERIMENT = Experiment(...)``::

    from orchestrator import Experiment, grid

    EXPERIMENT = Experiment(
        name="stride_sweep",
        corpus="the-verdict",
        model="gpt2-small",
        model_overrides={"context_length": 256},
        train={"batch_size": 2, "lr": 4e-4, "epochs": 10},
        grid={"data.stride": grid(256, 128)},
    )

Grid keys and ``--set`` keys are dotted config keys (``model.pos_emb``, ``data.stride``, ``train.lr``).
A ``kind="decode"`` experiment samples from one trained checkpoint instead, over ``decode.*`` keys
(see `orchestrator.decoding`).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import runpy
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from gptcore.config import ConfigError, JobConfig, did_you_mean, field_type, nest, valid_keys
from orchestrator.decoding import DECODE_METRICS, DecodeConfig, decode_field_type, decode_keys, is_decode

TRAIN_METRICS = ("val_loss", "train_loss", "best_val_loss", "val_perplexity")


class ExperimentError(ValueError):
    """The experiment file or an override is invalid; the message says what and how to fix it."""


def grid(*values: Any) -> list[Any]:
    """The values of one grid axis: ``grid(256, 128)``."""
    if len(values) == 1 and isinstance(values[0], (list, tuple, range)):
        values = tuple(values[0])
    return list(values)


@dataclass(frozen=True)
class ASHA:
    """Asynchronous successive halving: stop trials whose metric lags at each rung.

    ``time_attr`` counts progress; ``max_t`` is its final value and ``grace_period`` the
    minimum before a trial may be stopped (both in units of ``time_attr``, e.g. optimizer steps).
    """

    max_t: int
    grace_period: int = 1
    reduction_factor: float = 3.0
    time_attr: str = "step"


@dataclass(frozen=True)
class Experiment:
    """A sweep: a base configuration, a grid over config keys, the metric and the resources per trial."""

    name: str = ""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    corpus: str | list[str] | None = None  # shorthand for data.corpus
    model: str = "gpt2-small"  # preset name (model.preset)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    # workers per trial: 1 trains in the Tune trial actor, > 1 on Ray Train workers (DDP); (min, max): elastic, as
    # many as the cluster has in that range, fewer when a node goes and more when nodes come (`worker_range`)
    workers: int | tuple[int, int] = 1
    # Trials may lose nodes to spot reclaims: each runs on Ray Train, which passes a node's drain notice to the loop
    # (a checkpoint at once; `orchestrator.preemption`), even a trial of one worker. Elastic trials always do.
    spot: bool = False
    elastic_resize_s: float = 60.0  # how often an elastic trial looks for more workers (each grow is a restart)
    use_gpu: bool | Literal["auto"] = "auto"  # auto: GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: 1 CPU per worker
    max_concurrent: int | None = None
    scheduler: ASHA | None = None
    max_failures: int = 2  # worker failures survived per trial (resume from the latest checkpoint)
    checkpoints_to_keep: int = 2  # best by metric plus the latest
    description: str = ""
    kind: Literal["train", "decode"] = "train"  # decode: sample from one checkpoint (orchestrator.decoding)
    decode: dict[str, Any] = field(default_factory=dict)  # decode.* settings of a decode experiment

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ExperimentError(
                f"Experiment needs a name made of letters, digits, '_', '-' or '.', got {self.name!r}; "
                'add name="my_sweep"'
            )
        if not isinstance(self.grid, dict) or not self.grid:
            raise ExperimentError(
                f'experiment {self.name!r} has no grid; add grid={{"data.stride": grid(256, 128)}} '
                "(a single run is a grid with one value)"
            )
        self._check_kind()
        decode = self.is_decode
        known = set(config_keys(self.kind))
        examples = "decode.temperature, decode.top_k" if decode else "data.stride, model.pos_emb, train.lr"
        for key, values in self.grid.items():
            if key not in known:
                raise ExperimentError(
                    f"grid key {key!r} is not a {'decode ' if decode else ''}config field; "
                    f"use a dotted key such as {examples} "
                    f"(all keys: {', '.join(sorted(known))})"
                )
            if not isinstance(values, (list, tuple)) or len(values) == 0:
                raise ExperimentError(f"grid axis {key!r} is empty; give it at least one value, e.g. grid(1, 2)")
        metrics = DECODE_METRICS if decode else TRAIN_METRICS
        if self.metric not in metrics:
            raise ExperimentError(
                f"metric {self.metric!r} is not reported by {self.kind} trials; use one of {', '.join(metrics)}"
            )
        if self.mode not in ("min", "max"):
            raise ExperimentError(f"mode must be 'min' or 'max', got {self.mode!r}")
        worker_range(self.workers)
        if self.spot not in (True, False):
            raise ExperimentError(f"spot must be true or false, got {self.spot!r}")
        if not isinstance(self.elastic_resize_s, (int, float)) or not self.elastic_resize_s > 0:
            raise ExperimentError(f"elastic_resize_s must be a number of seconds > 0, got {self.elastic_resize_s!r}")
        if self.use_gpu not in (True, False, "auto"):
            raise ExperimentError(f"use_gpu must be true, false or 'auto', got {self.use_gpu!r}")
        if self.max_concurrent is not None and (not isinstance(self.max_concurrent, int) or self.max_concurrent < 1):
            raise ExperimentError(f"max_concurrent must be a positive integer, got {self.max_concurrent!r}")
        if self.cpus_per_worker is not None and not (
            isinstance(self.cpus_per_worker, (int, float)) and self.cpus_per_worker > 0
        ):
            raise ExperimentError(f"cpus_per_worker must be > 0, got {self.cpus_per_worker!r}")

    def _check_kind(self) -> None:
        if self.kind not in ("train", "decode"):
            raise ExperimentError(f"kind must be 'train' or 'decode', got {self.kind!r}")
        if not self.is_decode and self.decode:
            raise ExperimentError(
                'decode={...} settings need kind="decode"; add it, or drop decode= from a training sweep'
            )
        if self.is_decode:
            if self.corpus is not None or self.model_overrides or self.data or self.train or self.scheduler:
                raise ExperimentError(
                    "a decode experiment samples from a trained checkpoint: drop corpus/model_overrides/data/train/"
                    'scheduler, and set decode={"checkpoint": ...} (train the model with a train experiment)'
                )
            unknown = sorted(set(self.decode) - {k.removeprefix("decode.") for k in decode_keys()})
            if unknown:
                raise ExperimentError(
                    f"decode={{...}} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(decode_keys())}"
                )

    @property
    def is_decode(self) -> bool:
        """A decode sweep (samples from one trained checkpoint) rather than a training sweep."""
        return is_decode(self.kind)

    def scheduler_settings(self) -> dict[str, Any] | None:
        """The scheduler's fields, as a sweep saves them (None without a scheduler)."""
        return asdict(self.scheduler) if self.scheduler else None

    def base_config(self) -> dict[str, dict[str, Any]]:
        """The nested raw config every trial starts from."""
        if self.is_decode:
            return {"decode": dict(self.decode)}
        data = dict(self.data)
        if self.corpus is not None:
            data["corpus"] = self.corpus
        return {"model": {"preset": self.model, **self.model_overrides}, "data": data, "train": dict(self.train)}


def worker_range(workers: Any) -> tuple[int, int]:
    """The (fewest, most) workers of a trial: ``workers`` as an experiment or ``--workers`` gives it, a count (the
    same twice) or an elastic (min, max)."""
    if isinstance(workers, int) and not isinstance(workers, bool):
        if workers < 1:
            raise ExperimentError(f"workers must be an integer >= 1, got {workers!r}")
        return workers, workers
    if not (
        isinstance(workers, (tuple, list))
        and len(workers) == 2
        and all(isinstance(w, int) and not isinstance(w, bool) for w in workers)
    ):
        raise ExperimentError(f"workers must be an integer >= 1 or a (min, max) pair of them, got {workers!r}")
    low, high = workers
    if low < 1:
        raise ExperimentError(
            f"workers=({low}, {high}): a trial needs at least one worker; give a minimum of 1 or more, e.g. (1, {high})"
        )
    if low > high:
        raise ExperimentError(f"workers=({low}, {high}): the minimum is above the maximum; write it as ({high}, {low})")
    return low, high


@dataclass(frozen=True)
class Trial:
    """One point of the grid: a deterministic name, its grid values and its validated job."""

    index: int
    name: str
    params: dict[str, Any]  # grid values, by dotted key
    job: JobConfig | DecodeConfig
    preset: str = ""  # a training trial's model preset, the name its job's model was built from

    @property
    def tags(self) -> dict[str, str]:
        """MLflow tags of the trial's run that come from its configuration."""
        if isinstance(self.job, DecodeConfig):
            return {"seed": str(self.job.seed), "kind": "decode"}
        return {"seed": str(self.job.train.seed), "model.preset": self.preset}


def load_experiment(path: str | Path) -> Experiment:
    """Execute an experiment file and return its validated ``EXPERIMENT``."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} not found; pass a path such as experiments/stride_sweep.py")
    try:
        namespace = runpy.run_path(str(path), run_name="__experiment__")
    except SyntaxError as exc:
        raise ExperimentError(f"{path}:{exc.lineno}: syntax error: {exc.msg}; fix the file and run again") from None
    except (ExperimentError, ConfigError) as exc:
        raise ExperimentError(f"{path}: {exc}") from None
    except TypeError as exc:  # e.g. Experiment(nme=...)
        raise ExperimentError(f"{path}: {exc}; see the Experiment fields in orchestrator/experiment.py") from None
    except Exception as exc:
        raise ExperimentError(
            f"{path}: the file raised {type(exc).__name__}: {exc}; fix the file and run again"
        ) from None
    experiment = namespace.get("EXPERIMENT")
    if not isinstance(experiment, Experiment):
        raise ExperimentError(f"{path} does not define EXPERIMENT = Experiment(...); add it (see experiments/)")
    return experiment


# --------------------------------------------------------------------------- overrides


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON (numbers, true/false, null, lists) or else a plain string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def config_keys(kind: str = "train") -> list[str]:
    """The dotted keys an experiment of ``kind`` may use in its grid and ``--set``."""
    return decode_keys() if is_decode(kind) else valid_keys()


def _field_type(key: str) -> Any:
    return decode_field_type(key) if key.startswith("decode.") else field_type(key)


def _coerce(key: str, value: Any) -> Any:
    """Ints given for float fields become floats (``--set train.lr=1`` is fine)."""
    kinds = typing.get_args(_field_type(key)) or (_field_type(key),)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_overrides(items: Sequence[str], kind: str = "train") -> dict[str, Any]:
    """``["train.lr=1e-3", "model.preset=tiny"]`` -> ``{"train.lr": 0.001, "model.preset": "tiny"}``.

    ``kind`` is the experiment's: a decode experiment takes ``decode.*`` keys only.
    """
    out: dict[str, Any] = {}
    keys = config_keys(kind)
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ExperimentError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-3")
        if key not in keys:
            which = "decode config key" if is_decode(kind) else "config key"
            suggestion = did_you_mean(key, keys)
            hint = f"{suggestion} " if suggestion else ""
            raise ExperimentError(f"--set {key}: unknown {which}; {hint}valid keys: {', '.join(keys)}")
        out[key] = _coerce(key, parse_value(text))
    return out


# --------------------------------------------------------------------------- trials


def _merge(base: dict[str, dict[str, Any]], dotted: dict[str, Any]) -> dict[str, dict[str, Any]]:
    merged = copy.deepcopy(base)
    for section, values in nest(dotted).items():
        merged.setdefault(section, {}).update(values)
    return merged


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return re.sub(r"[^A-Za-z0-9.+-]", "-", str(value))


def trial_name(index: int, params: dict[str, Any]) -> str:
    """Deterministic, filesystem-safe: ``003_stride=128_lr=0.0004``."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_format(v)}" for key, v in params.items()]
    return "_".join([f"{index:03d}", *parts])[:120]


def _takes_list(key: str) -> bool:
    return any(typing.get_origin(t) is list for t in typing.get_args(_field_type(key)))


def expand_trials(experiment: Experiment, overrides: dict[str, Any] | None = None) -> list[Trial]:
    """Every grid point as a validated `Trial`.

    ``--set`` on a grid key pins that axis to one value, or to several with a list
    (``--set train.lr=[1e-4,5e-4]``; not for keys whose values are lists, such as data.corpus).
    """
    overrides = dict(overrides or {})
    axes = {key: list(values) for key, values in experiment.grid.items()}
    for key in list(axes):
        if key in overrides:
            value = overrides.pop(key)
            axes[key] = list(value) if isinstance(value, list) and value and not _takes_list(key) else [value]
    base = _merge(experiment.base_config(), {k: _coerce(k, v) for k, v in overrides.items()})
    trials = []
    for index, combo in enumerate(itertools.product(*axes.values())):
        params = {key: _coerce(key, value) for key, value in zip(axes, combo, strict=True)}
        config = _merge(base, params)
        name = trial_name(index, params)
        try:
            job = DecodeConfig.from_dict(config["decode"]) if experiment.is_decode else JobConfig.from_dict(config)
        except ConfigError as exc:
            raise ExperimentError(f"trial {name}: {exc}") from None
        preset = "" if experiment.is_decode else str(config["model"].get("preset", ""))
        trials.append(Trial(index, name, params, job, preset))
    return trials
