"""Learning rate: AdamW at 1e-4 ... 5e-4, with ASHA stopping the laggards early.

ASHA compares trials at rungs of 20, 60 steps (grace period 20, reduction factor 3) and stops
those whose validation loss is not in the top third; the survivors run the full 90 steps.
``time_attr="step"`` counts optimizer steps, so ``max_t`` is the step budget ``train.max_steps``:
change both together.

Default scale, a few minutes on a laptop CPU: the `tiny` preset (2 layers, d_model 64, context 64)
on the-verdict, batch 8, 90 steps (10 epochs) per trial, at most 5 trials.

    python -m orchestrator run experiments/lr_sweep.py
    # the book's size, e.g. on a GPU (gpt2-small, context 256, batch 2: also 9 steps per epoch):
    python -m orchestrator run experiments/lr_sweep.py --set model.preset=gpt2-small \\
        --set model.context_length=256 --set train.batch_size=2
    # fewer arms: --set 'train.lr=[1e-4,5e-4]'
"""

from orchestrator import ASHA, Experiment, grid

STEPS = 90

EXPERIMENT = Experiment(
    name="lr_sweep",
    description="AdamW learning rate 1e-4 ... 5e-4 with ASHA early stopping",
    corpus="the-verdict",
    model="tiny",
    train={
        "batch_size": 8,
        "weight_decay": 0.1,
        "epochs": 10,
        "max_steps": STEPS,
        "eval_every": 5,
        "eval_iters": 5,
        "sample_every": 30,
        "seed": 123,
    },
    grid={"train.lr": grid(1e-4, 2e-4, 3e-4, 4e-4, 5e-4)},
    scheduler=ASHA(max_t=STEPS, grace_period=20, reduction_factor=3, time_attr="step"),
    metric="val_loss",
    mode="min",
)
