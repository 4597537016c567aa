"""A scaling ladder: model sizes x compute budgets, each trial spending one budget (Chinchilla's question).

For each FLOP budget C (``train.flops_budget``, counted as `gptcore.accounting` counts them), every model size trains
for the optimizer steps C buys, its cosine schedule ending where the trial ends. `python -m orchestrator report
scaling_ladder` then fits L(N, D) and the iso-FLOP profiles (see README "Plan and scale"); the same fit on any CSV of
runs: ``python -m orchestrator scaling-fit RESULTS.csv``.

Default scale, on a 2-core CPU in minutes: four widths of a 2-layer model (context 64) on tinyshakespeare, three
budgets a factor of ~3 apart, one trial at a time.

    python -m orchestrator run experiments/scaling_ladder.py --dry-run   # the plan: steps, tokens, FLOPs per trial
    python -m orchestrator run experiments/scaling_ladder.py

At GPT-2 scale on a GPU cluster (``ray up cluster.yaml``), e.g. 6 sizes x 4 budgets on FineWeb shards:

    python -m orchestrator run experiments/scaling_ladder.py --address auto --workers 1 --use-gpu yes \\
        --set data.corpus=s3://bucket/fineweb/ --set model.context_length=1024 --set model.n_layers=12 \\
        --set train.batch_size=32 --set train.lr=6e-4
    # and widen the grid in this file: "model.d_model": grid(256, 384, 512, 640, 768, 1024),
    #                                   "train.flops_budget": grid(1e17, 3e17, 1e18, 3e18)
"""

from orchestrator import Experiment, grid

EXPERIMENT = Experiment(
    name="scaling_ladder",
    description="model sizes x FLOP budgets, each trial spending its budget",
    corpus="tinyshakespeare",
    model="tiny",
    model_overrides={"context_length": 64, "n_heads": 4, "n_layers": 2, "dropout": 0.0},
    train={
        "batch_size": 8,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "epochs": 1000,  # the budget ends each trial, not the epochs
        "eval_every": 0,  # one evaluation, at the end: the loss the fit uses
        "eval_iters": 10,
        "sample_every": 0,
        "seed": 123,
    },
    grid={
        "model.d_model": grid(32, 48, 64, 96),
        "train.flops_budget": grid(2e11, 6e11, 2e12),
    },
    metric="val_loss",
    mode="min",
    max_concurrent=1,
    cpus_per_worker=2,
)
