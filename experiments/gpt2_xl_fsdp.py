"""gpt2-xl (1.56 B parameters) pretrained on FineWeb with FSDP: one trial on 8 GPU workers, for a GPU cluster.

Needs 8 GPUs with 40 GB or more each, bf16-capable (A100 40/80 GB, H100, H200; e.g. one p4d.24xlarge, the
large-run worker type of ``cluster.yaml``). FSDP shards the parameters, gradients and AdamW moments across the 8
workers (25 GB in all, ~3.1 GB per GPU), each block one FSDP group; activation checkpointing keeps one block's
activations at a time. Per GPU: batch 8 x 1024 tokens, 8 micro-steps: 8 x 8 x 8 x 1024 = 524,288 tokens an
optimizer step (GPT-2's batch), 19,073 steps = one pass over FineWeb 10B (~9 hours on 8 H100s at ~40 % MFU).

Corpus: llm.c's GPT-2-tokenized FineWeb 10B shards (``fineweb_train_*.bin``, ``fineweb_val_*.bin``, from llm.c's
``dev/data/fineweb.py``), read where they are, at the same path on every node: ``/data/fineweb10B/``.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
      python -m orchestrator run experiments/gpt2_xl_fsdp.py --address auto --wait-for-resources \\
        --storage s3://YOUR-BUCKET/gpt-orchestrator/sweeps --tracking-uri http://127.0.0.1:5000

Smaller:

    # 4 GPUs, the same tokens a step:          --workers 4 --set train.grad_accum_steps=16
    # 24 GB GPUs (A10G, L4):                    --set model.preset=gpt2-large --set train.batch_size=4
    # locally on a CPU: FSDP over gloo on 2 workers, the micro preset, the-verdict, 20 steps (~1 minute):
    python -m orchestrator run experiments/gpt2_xl_fsdp.py --workers 2 --use-gpu no --cpus-per-worker 1 \\
        --set model.preset=micro --set data.corpus=the-verdict --set train.precision=fp32 \\
        --set train.compile=false --set train.batch_size=2 --set train.grad_accum_steps=1 \\
        --set train.warmup_steps=0 --set train.max_steps=20 --set train.eval_every=10 --set train.eval_iters=2
"""

from orchestrator import Experiment, grid

STEPS = 19_073

EXPERIMENT = Experiment(
    name="gpt2_xl_fsdp",
    description="gpt2-xl on FineWeb 10B, FSDP on 8 GPUs, bf16, compiled, activation checkpointing",
    corpus="/data/fineweb10B/",
    model="gpt2-xl",
    # 50304 rows: the embedding (and tied head) shards evenly; FSDP refuses 50257
    model_overrides={"pad_vocab_multiple": 64, "dropout": 0.0},
    data={"val_tokens": 10_000_000},
    train={
        "parallel": "fsdp",
        "activation_checkpointing": True,
        "precision": "bf16",  # bf16 parameters for compute, fp32 gradient reductions and optimizer state
        "compile": True,
        "batch_size": 8,
        "grad_accum_steps": 8,
        "epochs": 1,
        "max_steps": STEPS,
        "lr": 6e-4,
        "min_lr": 6e-5,
        "warmup_steps": 700,
        "weight_decay": 0.1,
        "beta2": 0.95,
        "grad_clip": 1.0,
        "eval_every": 250,
        "eval_iters": 20,
        "checkpoint_every": 1000,
        "sample_every": 1000,
        "seed": 123,
    },
    grid={"train.lr": grid(6e-4)},
    workers=8,
    use_gpu=True,
    cpus_per_worker=4,
    max_failures=3,
    metric="val_loss",
    mode="min",
)
