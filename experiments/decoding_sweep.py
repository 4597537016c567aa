"""Decoding: temperature x top-k on ONE trained checkpoint, measuring diversity and the model's own perplexity.

No training: each trial loads the checkpoint and samples 5 continuations of each prompt, then logs
distinct-1 / distinct-2 (unique n-grams over all samples), the repetition rate (4-grams repeating
within a sample) and the model's perplexity of its own samples (untempered), plus the samples as
``samples.txt``. The report plots distinct-2 against self-perplexity: the diversity/quality trade-off.

``decode.checkpoint`` is ``best:stride_sweep``, the best checkpoint of the latest stride_sweep in the
tracking store (run ``python -m orchestrator run experiments/stride_sweep.py`` first), or any
checkpoint folder: --set decode.checkpoint=ray_results/.../checkpoint_000009.

Default scale, a minute or two on a laptop CPU: 6 settings x 2 prompts x 5 samples x 50 tokens.

    python -m orchestrator run experiments/decoding_sweep.py
    # with nucleus sampling, on a GPU, longer samples:
    python -m orchestrator run experiments/decoding_sweep.py --set decode.top_p=0.9 \\
        --set decode.max_new_tokens=200 --set decode.num_samples=20
"""

from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="decoding_sweep",
    description="temperature x top-k on one checkpoint: distinct-n, repetition, self-perplexity",
    kind="decode",
    decode={
        "checkpoint": "best:stride_sweep",
        "prompts": ["Every effort moves you", "I had always thought Jack Gisburn"],
        "num_samples": 5,
        "max_new_tokens": 50,
        "seed": 123,
    },
    grid={"decode.temperature": grid(0.7, 1.0, 1.5), "decode.top_k": grid(40, None)},
    metric="distinct_2",
    mode="max",
)
