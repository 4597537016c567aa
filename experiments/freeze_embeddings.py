"""Cost saving: train the token embedding table, or freeze it at its initial values?

Freezing ``model.freeze_token_embeddings`` removes the largest matrix (vocab x d_model) from the
gradients and the AdamW state. The report shows what it costs in validation loss and what it
saves: trainable parameters and tokens/s per trial. The head is untied (as in the book's code):
with a tied head, freezing the embedding would freeze the output layer too.

Default scale, a few minutes on a laptop CPU: the `tiny` preset (2 layers, d_model 64, context 64),
untied head, on the-verdict, batch 8, AdamW lr 3e-3, 10 epochs (90 steps per trial).

    python -m orchestrator run experiments/freeze_embeddings.py
    # the book's size, e.g. on a GPU; frozen GPT-2 embeddings rather than random ones with train.init_from:
    python -m orchestrator run experiments/freeze_embeddings.py --set model.preset=gpt2-small \\
        --set model.context_length=256 --set train.batch_size=2 --set train.lr=4e-4 [--set train.init_from=gpt2]
"""

from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="freeze_embeddings",
    description="trainable vs frozen token embeddings: loss, trainable params, tokens/s",
    corpus="the-verdict",
    model="tiny",
    model_overrides={"tie_weights": False},
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
    grid={"model.freeze_token_embeddings": grid(False, True)},
    metric="val_loss",
    mode="min",
)
