"""A decode sweep's Tune trial: load the checkpoint, sample every prompt, measure, log to the trial's MLflow run.

Each trial is a plain Ray Tune function trial (inference only): it samples ``num_samples`` continuations per
prompt and logs distinct-1/2, the repetition rate and the model's own perplexity of its samples as metrics, and
the samples as ``samples.txt``, to its MLflow child run (created by the driver beforehand). Module-level imports
stay light (trial actors unpickle `run_decode_trial`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.decoding import DECODE_METRICS, DecodeConfig

if TYPE_CHECKING:
    from orchestrator.settings import SweepSettings
    from orchestrator.trial_spec import TrialSpec


def sample_and_measure(
    model, config: DecodeConfig, on_prompt: Callable[[int, float], None] | None = None
) -> tuple[dict[str, float], str]:
    """Sample ``num_samples`` continuations of every prompt; returns (metrics, the samples as text).

    Metrics: distinct_1, distinct_2, repetition_rate (4-grams), self_perplexity (the model's perplexity
    of its own continuations, untempered), mean_new_tokens, tokens_per_sec, wall_time_s.
    """
    import torch

    from gptcore.metrics import distinct_n, repetition_rate, self_perplexity
    from gptcore.runtime import autocast, resolve_precision
    from gptcore.sampling import generate
    from gptcore.tokenizer import EOT_ID, decode, encode

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed)
    dtype = resolve_precision(config.precision, device, "sample")
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


def decode_trainable(specs: dict[str, TrialSpec], settings: SweepSettings):
    """`run_decode_trial` with its specs and resources (the trial itself samples: a CPU, or a GPU)."""
    import ray.tune

    return ray.tune.with_resources(
        ray.tune.with_parameters(run_decode_trial, specs=specs, settings=settings), settings.worker_resources()
    )


def run_decode_trial(config: dict[str, Any], specs: dict[str, TrialSpec], settings: SweepSettings) -> None:
    """Load the checkpoint, sample and measure, log to the trial's MLflow run, report to Tune."""
    import socket
    import tempfile

    import ray.tune
    import torch

    from gptcore.checkpoint import load_model
    from gptcore.runtime import resolve_device
    from orchestrator.settings import torch_threads
    from orchestrator.storage import local_copy
    from orchestrator.tracking import STATUS_TAG, RunLogger

    spec = specs[config["trial"]]
    name, decode = spec.name, spec.job
    device = resolve_device(decode.device)
    if device.type == "cpu":
        torch.set_num_threads(torch_threads(settings.cpus_per_worker))
    logger = RunLogger(settings.tracking_uri, spec.run_id)
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
