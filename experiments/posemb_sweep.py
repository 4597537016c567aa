"""Positional embeddings: learned absolute positions (GPT-2) vs fixed sinusoidal vs rotary (RoPE).

Same data, seed, steps and optimizer for the three arms; only ``model.pos_emb`` changes. Compare
the validation loss curves (report: val_loss_vs_tokens.png) and tokens/s.

Default scale, a few minutes on a laptop CPU: the `tiny` preset (2 layers, d_model 64, context 64) on
the-verdict, batch 8, AdamW lr 3e-3, 10 epochs (90 steps per trial).

    python -m orchestrator run experiments/posemb_sweep.py
    # the book's size, e.g. on a GPU (gpt2-small, context 256, batch 2):
    python -m orchestrator run experiments/posemb_sweep.py --set model.preset=gpt2-small \\
        --set model.context_length=256 --set train.batch_size=2 --set train.lr=4e-4
"""

from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="posemb_sweep",
    description="learned vs sinusoidal vs RoPE positions",
    corpus="the-verdict",
    model="tiny",
    train={
        "batch_size": 8,
        "lr": 3e-3,  # a tiny model takes a large step size: at 4e-4, 90 steps barely move the loss
        "weight_decay": 0.1,
        "epochs": 10,
        "eval_every": 5,
        "eval_iters": 5,
        "sample_every": 30,
        "seed": 123,
    },
    grid={"model.pos_emb": grid("learned", "sinusoidal", "rope")},
    metric="val_loss",
    mode="min",
)
