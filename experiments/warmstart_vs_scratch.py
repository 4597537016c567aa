"""Warm start from OpenAI's GPT-2 (124M) vs training the same model from scratch, at the same budget.

Both arms are gpt2-small exactly as GPT-2 has it (QKV bias, tied head, GPT-2 init), context 256
(the position table of GPT-2 is cropped to 256 rows), on the-verdict with the same steps, batch,
learning rate and seed; only ``train.init_from`` differs. MLflow records the load report of the
warm arm as ``init.*`` tags.

``train.init_from=gpt2`` downloads the weights from the Hugging Face Hub (pip install
'gpt-orchestrator[hub]'; needs internet or a filled HF cache). Offline, point the grid at a local
folder: --set 'train.init_from=["/models/gpt2","scratch"]'.

Default scale, a few minutes on a laptop CPU: batch 2, AdamW lr 1e-4, 3 epochs (27 steps per arm).

    python -m orchestrator run experiments/warmstart_vs_scratch.py
    # longer, e.g. on a GPU:
    python -m orchestrator run experiments/warmstart_vs_scratch.py --set train.epochs=10 --set train.batch_size=8
"""

from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="warmstart_vs_scratch",
    description="init from GPT-2 vs from scratch, same steps and budget",
    corpus="the-verdict",
    model="gpt2-small",  # qkv_bias=True, tie_weights=True, init_scheme="gpt2": GPT-2's own architecture
    model_overrides={"context_length": 256},
    train={
        "batch_size": 2,
        "lr": 1e-4,
        "weight_decay": 0.1,
        "epochs": 3,
        "eval_every": 5,
        "eval_iters": 5,
        "sample_every": 10,
        "seed": 123,
    },
    grid={"train.init_from": grid("gpt2", "scratch")},
    metric="val_loss",
    mode="min",
)
