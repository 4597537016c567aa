"""The seed's data-redundancy study: non-overlapping windows (stride 256) vs half-overlapping (stride 128).

The book's setting: the-verdict, gpt2-small with context 256 (no QKV bias, untied head, PyTorch's
default init, as in the book's code), batch 2, AdamW lr 4e-4, weight decay 0.1, 10 epochs, an
evaluation every 5 steps with a sample from "Every effort moves you".

    python -m orchestrator run experiments/stride_sweep.py
    python -m orchestrator run experiments/stride_sweep.py --set model.preset=tiny --set train.epochs=1   # smoke run
"""

from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="stride_sweep",
    corpus="the-verdict",
    model="gpt2-small",
    model_overrides={"context_length": 256, "qkv_bias": False, "tie_weights": False, "init_scheme": "torch"},
    train={
        "batch_size": 2,
        "lr": 4e-4,
        "weight_decay": 0.1,
        "beta2": 0.999,
        "lr_schedule": "constant",
        "grad_clip": 0.0,
        "epochs": 10,
        "eval_every": 5,
        "eval_iters": 5,
        "sample_every": 10,
        # A checkpoint holds 1.9 GB (weights and AdamW moments), about 4.5 s to write on a laptop: every 50 steps
        # and at the end, not every epoch (9 or 17 steps here).
        "checkpoint_every": 50,
        "seed": 123,
    },
    grid={"data.stride": grid(256, 128)},
    # Both cores to one trial at a time: on a 2-core laptop this finishes sooner than two 1-thread trials side by
    # side (the stride-128 trial is twice as long). On bigger nodes trials still run side by side.
    cpus_per_worker=2,
    metric="val_loss",
    mode="min",
)
