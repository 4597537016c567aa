"""The four studies at once, for a cluster: stride x positional embedding x frozen embeddings x learning rate.

36 trials (2 x 3 x 2 x 3), at most 8 at a time, with ASHA stopping the laggards at 30 and 90 steps.
Every trial has the same budget of 180 optimizer steps (``train.max_steps``; ASHA's ``max_t``), whatever
its stride: overlapping windows give more steps per epoch, not more steps. Untied head, so that
freezing the token embedding leaves the output layer trainable.

Default sizes are valid anywhere (the `tiny` preset, context 64, on the-verdict: about 22 minutes on a
2-core laptop CPU); on a GPU cluster, join it and size up (strides follow the context: 256 and 128 at 256):

    python -m orchestrator run experiments/full_grid.py --address auto --set model.preset=gpt2-small \\
        --set model.context_length=256 --set 'data.stride=[256,128]' --set train.batch_size=8
    # one slice of it: --set model.pos_emb=rope --set model.freeze_token_embeddings=false
"""

from orchestrator import ASHA, Experiment, grid

STEPS = 180

EXPERIMENT = Experiment(
    name="full_grid",
    description="stride x pos_emb x frozen embeddings x lr, ASHA, for a cluster",
    corpus="the-verdict",
    model="tiny",
    model_overrides={"tie_weights": False},
    train={
        "batch_size": 8,
        "weight_decay": 0.1,
        "epochs": 20,
        "max_steps": STEPS,
        "eval_every": 10,
        "eval_iters": 5,
        "sample_every": 60,
        "seed": 123,
    },
    grid={
        "data.stride": grid(64, 32),
        "model.pos_emb": grid("learned", "sinusoidal", "rope"),
        "model.freeze_token_embeddings": grid(False, True),
        "train.lr": grid(1e-4, 3e-4, 5e-4),
    },
    max_concurrent=8,
    scheduler=ASHA(max_t=STEPS, grace_period=30, reduction_factor=3, time_attr="step"),
    metric="val_loss",
    mode="min",
)
