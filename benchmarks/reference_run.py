"""The seed's reference run in plain gptcore (no Ray, no MLflow): prints the loss curve and wall time.

the-verdict, gpt2-small shape with context 256 (the book's variant: no QKV bias, untied head),
stride 256, batch 2, AdamW lr 4e-4 (betas 0.9/0.999), weight decay 0.1, constant LR, no clipping,
10 epochs, evaluation every 5 steps over 5 batches, seed 123.

    python benchmarks/reference_run.py [--precision auto|fp32]
"""

import argparse
import time

from gptcore.config import JobConfig
from gptcore.train import HookList, Hooks, PrintProgress, train

BOOK = {"final_train_loss": 0.569, "final_val_loss": 6.373, "best_val_loss": 6.123}


class Curve(Hooks):
    def __init__(self):
        self.points = []

    def on_eval(self, ctx, state, metrics, sample, save):
        self.points.append((state.step, state.tokens_seen, metrics["train_loss"], metrics["val_loss"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--init", default="torch", help="torch (the book's) or gpt2")
    args = parser.parse_args()
    config = JobConfig.from_dict(
        {
            "model": {
                "preset": "gpt2-small",
                "context_length": 256,
                "qkv_bias": False,
                "tie_weights": False,
                "init_scheme": args.init,
            },
            "data": {"corpus": "the-verdict", "stride": 256},
            "train": {
                "batch_size": 2,
                "lr": 4e-4,
                "weight_decay": 0.1,
                "beta2": 0.999,
                "lr_schedule": "constant",
                "grad_clip": 0.0,
                "epochs": 10,
                "eval_every": 5,
                "eval_iters": 5,
                "seed": 123,
                "sample_every": 0,
                "precision": args.precision,
            },
        }
    )
    curve = Curve()
    start = time.perf_counter()
    result = train(config, HookList(PrintProgress(), curve))
    wall = time.perf_counter() - start
    best = min(p[3] for p in curve.points)
    print(f"\nprecision={args.precision} steps={result.state.step} tokens={result.state.tokens_seen} wall={wall:.0f}s")
    print(f"final train loss {result.metrics['train_loss']:.3f} (book {BOOK['final_train_loss']})")
    print(f"final val loss   {result.metrics['val_loss']:.3f} (book {BOOK['final_val_loss']})")
    print(f"best val loss    {best:.3f} (book {BOOK['best_val_loss']})")


if __name__ == "__main__":
    main()
