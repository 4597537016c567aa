"""The seed's reference run in plain gptcore (no Ray, no MLflow): prints the loss curve and wall time.

The stride-256 trial of `experiments/stride_sweep.py` (the book's chapter-5 run: the-verdict, gpt2-small shape
with context 256, no QKV bias, untied head, batch 2, AdamW lr 4e-4, betas 0.9/0.999, weight decay 0.1, constant
LR, no clipping, 10 epochs, evaluation every 5 steps over 5 batches, seed 123), read from that file so the two
cannot drift apart, trained by `gptcore.train.train` alone.

    python benchmarks/reference_run.py [--precision auto|fp32] [--init torch|gpt2] [--compile]
"""

import argparse
import time
from pathlib import Path

from gptcore.hooks import HookList, Hooks, PrintProgress
from gptcore.train import train
from orchestrator.experiment import expand_trials, load_experiment

BOOK = {"final_train_loss": 0.569, "final_val_loss": 6.373, "best_val_loss": 6.123}
STRIDE_SWEEP = Path(__file__).resolve().parents[1] / "experiments" / "stride_sweep.py"


class Curve(Hooks):
    def __init__(self):
        self.points = []
        self.device = None

    def on_train_start(self, ctx, state):
        self.device = ctx.device

    def on_eval(self, ctx, state, metrics, sample, save):
        self.points.append((state.step, state.tokens_seen, metrics["train_loss"], metrics["val_loss"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--init", default="torch", help="torch (the book's) or gpt2")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (torch.compile)")
    args = parser.parse_args()
    overrides = {
        "data.stride": 256,
        "model.init_scheme": args.init,
        "train.sample_every": 0,
        "train.precision": args.precision,
        "train.compile": args.compile,
    }
    (trial,) = expand_trials(load_experiment(STRIDE_SWEEP), overrides)
    config = trial.job
    curve = Curve()
    start = time.perf_counter()
    result = train(config, HookList(PrintProgress(), curve))
    wall = time.perf_counter() - start
    best = min(p[3] for p in curve.points)
    run = f"device={curve.device} precision={args.precision} compile={args.compile} steps={result.state.step}"
    print(f"\n{run} tokens={result.state.tokens_seen} wall={wall:.0f}s")
    print(f"final train loss {result.metrics['train_loss']:.3f} (book {BOOK['final_train_loss']})")
    print(f"final val loss   {result.metrics['val_loss']:.3f} (book {BOOK['final_val_loss']})")
    print(f"best val loss    {best:.3f} (book {BOOK['best_val_loss']})")


if __name__ == "__main__":
    main()
