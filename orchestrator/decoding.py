"""Decoding sweeps: one trained checkpoint, a grid of decoding settings, diversity and perplexity per setting.

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
of that experiment's latest sweep in the tracking store. It is resolved (and checked) before Ray starts.
Each trial is a plain Ray Tune function trial (inference only): it samples ``num_samples`` continuations per
prompt and logs distinct-1/2, the repetition rate and the model's own perplexity of its samples as metrics, and
the samples as ``samples.txt``, to its MLflow child run. Module-level imports stay light (trial actors unpickle
`run_decode_trial`).
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptcore.config import ConfigError, _build, _finite_number, _non_negative_int, _positive_int, _require

BEST_PREFIX = "best:"
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
    precision: str = "auto"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.checkpoint, str) and self.checkpoint.strip() != "",
            "decode.checkpoint",
            "is not set; pass a checkpoint folder or best:<experiment>, e.g. --set decode.checkpoint=best:lr_sweep",
        )
        _require(
            isinstance(self.prompts, (list, tuple)) and len(self.prompts) > 0 and all(self.prompts),
            "decode.prompts",
            f"must be a non-empty list of non-empty strings, got {self.prompts!r}",
        )
        _require(all(isinstance(p, str) for p in self.prompts), "decode.prompts", "must hold strings")
        object.__setattr__(self, "prompts", list(self.prompts))
        for name in ("num_samples", "max_new_tokens"):
            _positive_int(getattr(self, name), f"decode.{name}")
        _non_negative_int(self.seed, "decode.seed")
        _finite_number(self.temperature, "decode.temperature", low=0.0, high=100.0)
        if self.top_k is not None:
            _positive_int(self.top_k, "decode.top_k")
        if self.top_p is not None:
            _finite_number(self.top_p, "decode.top_p", low=0.0, high=1.0, low_open=True)
        _require(
            self.precision in ("auto", "fp32", "bf16", "fp16"),
            "decode.precision",
            f"must be one of auto, fp32, bf16, fp16, got {self.precision!r}",
        )

    def flat(self) -> dict[str, Any]:
        """Every field as ``{"decode.field": value}`` (MLflow params)."""
        return {f"decode.{k}": v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DecodeConfig:
        return _build(cls, raw, "decode")


def decode_keys() -> list[str]:
    """All dotted keys a decode experiment's grid or ``--set`` may use."""
    return [f"decode.{f.name}" for f in dataclasses.fields(DecodeConfig)]


def decode_field_type(key: str) -> Any:
    hints = typing.get_type_hints(DecodeConfig)
    name = key.removeprefix("decode.")
    if not key.startswith("decode.") or name not in hints:
        raise ConfigError(f"{key}: unknown decode key; valid keys: {', '.join(decode_keys())}")
    return hints[name]


# --------------------------------------------------------------------------- the checkpoint, before Ray starts


def best_checkpoint(experiment: str, tracking_uri: str) -> str:
    """The best checkpoint (lowest best val loss) of ``experiment``'s latest sweep in the tracking store."""
    from gptcore.checkpoint import CheckpointError
    from orchestrator.report import ReportError, find_parent_run, trial_results
    from orchestrator.tracking import SWEEP_TAG, client_for

    client = client_for(tracking_uri)
    try:
        parent = find_parent_run(client, experiment)
    except ReportError as exc:
        raise CheckpointError(
            f"decode.checkpoint {BEST_PREFIX}{experiment}: {exc} (tracking store {tracking_uri}; pass "
            "--tracking-uri of the store that has it, or a checkpoint folder)"
        ) from None
    for result in trial_results(client, parent.info.run_id):
        if result.best_checkpoint:
            return result.best_checkpoint
    raise CheckpointError(
        f"decode.checkpoint {BEST_PREFIX}{experiment}: no trial of its latest sweep "
        f"{parent.data.tags.get(SWEEP_TAG, parent.info.run_name)} has a best checkpoint; let the sweep finish "
        "(python -m orchestrator run ... --resume) or pass a checkpoint folder"
    )


def resolve_checkpoint(spec: str, tracking_uri: str) -> str:
    """``decode.checkpoint`` as a checked folder path or object-store URI (``best:<experiment>`` looked up)."""
    import pyarrow.fs as pafs

    from gptcore.checkpoint import META_FILE, CheckpointError, read_meta
    from orchestrator.storage import is_uri, local_path

    if spec.startswith(BEST_PREFIX):
        spec = best_checkpoint(spec.removeprefix(BEST_PREFIX), tracking_uri)
    if is_uri(spec):
        fs, path = pafs.FileSystem.from_uri(spec)
        if fs.get_file_info(f"{path.rstrip('/')}/{META_FILE}").type != pafs.FileType.File:
            raise CheckpointError(f"decode.checkpoint {spec} is not a gptcore checkpoint (no {META_FILE} there)")
        return spec
    path = local_path(spec)
    try:
        read_meta(path)
    except CheckpointError as exc:
        raise CheckpointError(f"decode.checkpoint: {exc}") from None
    return str(path)


def resolve_checkpoints(trials: list, tracking_uri: str) -> list:
    """The trials with ``decode.checkpoint`` resolved (each distinct value once)."""
    resolved: dict[str, str] = {}
    out = []
    for trial in trials:
        spec = trial.job.checkpoint
        if spec not in resolved:
            resolved[spec] = resolve_checkpoint(spec, tracking_uri)
        job = dataclasses.replace(trial.job, checkpoint=resolved[spec])
        out.append(dataclasses.replace(trial, config={"decode": dataclasses.asdict(job)}, job=job))
    return out


def decode_rows(trials: list, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    """The dry-run table of a decode sweep."""
    header = ["trial", *keys, "checkpoint", "samples"]
    rows = []
    for trial in trials:
        d = trial.job
        samples = f"{len(d.prompts)} prompt(s) x {d.num_samples}, {d.max_new_tokens} tokens"
        rows.append([trial.name, *[str(trial.params[k]) for k in keys], d.checkpoint, samples])
    return header, rows


# --------------------------------------------------------------------------- sampling and measuring


def sample_and_measure(
    model, config: DecodeConfig, on_prompt: Callable[[int, float], None] | None = None
) -> tuple[dict[str, float], str]:
    """Sample ``num_samples`` continuations of every prompt; returns (metrics, the samples as text).

    Metrics: distinct_1, distinct_2, repetition_rate (4-grams), self_perplexity (the model's perplexity
    of its own continuations, untempered), mean_new_tokens, tokens_per_sec, wall_time_s.
    """
    import torch

    from gptcore.metrics import distinct_n, repetition_rate, self_perplexity
    from gptcore.sampling import generate
    from gptcore.tokenizer import EOT_ID, decode, encode
    from gptcore.train import autocast, resolve_precision

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    dtype = resolve_precision(config.precision, device)
    started = time.perf_counter()
    prompts, continuations, lines = [], [], []
    for i, prompt in enumerate(config.prompts):
        ids = encode(prompt)
        with autocast(device, dtype):
            new = generate(
                model,
                [ids] * config.num_samples,
                config.max_new_tokens,
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                eos_id=EOT_ID,
                generator=generator,
            )
        prompts += [ids] * len(new)
        continuations += new
        lines += [f"--- prompt {i + 1}, sample {j + 1}\n{prompt}{decode(n)}\n" for j, n in enumerate(new)]
        if on_prompt:
            on_prompt(i + 1, time.perf_counter() - started)
    elapsed = time.perf_counter() - started
    tokens = sum(map(len, continuations))
    metrics = {
        "distinct_1": distinct_n(continuations, 1),
        "distinct_2": distinct_n(continuations, 2),
        "repetition_rate": repetition_rate(continuations, 4),
        "self_perplexity": self_perplexity(model, prompts, continuations),
        "mean_new_tokens": tokens / len(continuations),
        "tokens_per_sec": tokens / max(elapsed, 1e-9),
        "wall_time_s": time.perf_counter() - started,
    }
    return metrics, "".join(lines)


# --------------------------------------------------------------------------- the Tune trial


def decode_trainable(specs: dict[str, dict[str, Any]], settings: dict[str, Any]):
    """`run_decode_trial` with its specs and resources (the trial itself samples: a CPU, or a GPU)."""
    import ray.tune

    resources = {"CPU": settings["cpus_per_worker"], **({"GPU": 1} if settings["use_gpu"] else {})}
    return ray.tune.with_resources(
        ray.tune.with_parameters(run_decode_trial, specs=specs, settings=settings), resources
    )


def run_decode_trial(config: dict[str, Any], specs: dict[str, dict[str, Any]], settings: dict[str, Any]) -> None:
    """Load the checkpoint, sample and measure, log to the trial's MLflow run, report to Tune."""
    import socket
    import tempfile

    import ray.tune
    import torch

    from gptcore.checkpoint import load_model
    from gptcore.train import resolve_device
    from orchestrator.storage import local_copy
    from orchestrator.tracking import STATUS_TAG, RunLogger

    name = config["trial"]
    decode = DecodeConfig.from_dict(specs[name]["config"]["decode"])
    device = resolve_device(decode.device)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(settings["cpus_per_worker"])))
    logger = RunLogger(settings["tracking_uri"], specs[name]["run_id"])
    try:
        logger.set_tags(
            {
                STATUS_TAG: "running",
                "host": socket.gethostname(),
                "device": str(device),
                "checkpoint": decode.checkpoint,
                "ray_trial_id": ray.tune.get_context().get_trial_id(),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            model, ckpt = load_model(local_copy(decode.checkpoint, Path(tmp)), device=device)
        logger.set_tags({"checkpoint.step": str(ckpt.state.step), "checkpoint.model": _shape(ckpt.config.model)})
        total = len(decode.prompts)

        def progress(done: int, elapsed: float) -> None:
            eta = elapsed / done * (total - done)
            print(f"[{name}] prompt {done}/{total}, {decode.num_samples} samples each, ETA {eta:.0f}s", flush=True)

        metrics, text = sample_and_measure(model, decode, progress)
        logger.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=0)
        logger.log_text(text, "samples.txt")
    finally:
        logger.close()
    summary = ", ".join(f"{k} {metrics[k]:.3f}" for k in DECODE_METRICS)
    print(f"[{name}] finished: {summary}", flush=True)
    ray.tune.report({**metrics, "final": True, "status": "finished"})


def _shape(model) -> str:
    return f"{model.n_layers}x{model.d_model} ctx {model.context_length} {model.pos_emb}"
