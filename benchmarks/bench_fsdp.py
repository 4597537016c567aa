"""FSDP vs DDP, side by side: per-worker memory of parameters + gradients + optimizer state, and the step time.

gpt2-medium (355 M parameters, vocabulary padded to 50304, fp32, fused AdamW) on 2 workers: two processes spawned
with torch.multiprocessing, gloo over loopback, one thread each. Each side runs in a fresh parent process:

ddp    `DistributedDataParallel` (``gradient_as_bucket_view=True``: gradients live in its buckets, no second copy)
fsdp   `gptcore.parallel.shard_model` (FSDP2: each block, then the root group)

Both take optimizer steps as `gptcore.train.train` does (`gptcore.train.optimizer_step`, gradient clipping on) on
the same random batch of ``--batch`` x ``--context`` tokens per worker. Memory is counted from the tensors each
worker holds at its peak (after a backward, the optimizer state allocated): parameters, gradients and AdamW moments
(its shards under FSDP). Beside them, the process's resident set at that point ("RSS then": also Python, torch,
gloo's buffers) and its peak over the run ("peak RSS": also activations, the blocks FSDP all-gathers for their
forward and backward, gloo's emulation of reduce-scatter by a full-size all-reduce, and the whole model every rank
builds before it is sharded).

    python benchmarks/bench_fsdp.py [--quick] [--preset gpt2-medium] [--steps N] [--batch B] [--context T]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from common import Report, emit, machine, median, ratio, rss_bytes, run_side, size, table, time_calls

WORLD = 2


def _local_bytes(tensors: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _rank(rank: int, init: str, args: argparse.Namespace, out: str) -> None:
    import json

    import torch
    import torch.distributed as dist
    from common import random_batch

    from gptcore.config import JobConfig
    from gptcore.model import GPT
    from gptcore.optimizer import configure_optimizer
    from gptcore.parallel import leave_process_group, shard_model
    from gptcore.train import forward_backward_step, optimizer_step

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    job = JobConfig.from_dict(
        {
            "model": {"preset": args.preset, "context_length": args.context, "dropout": 0.0, "pad_vocab_multiple": 64},
            "train": {"parallel": args.side, "precision": "fp32", "lr": 1e-4},
        }
    )
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = GPT(job.model)
    params = model.num_params()
    if args.side == "fsdp":
        model = shard_model(model, device=device, dtype=None)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
    optimizer = configure_optimizer(model, job, device)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = random_batch(args.batch * WORLD, args.context, vocab_size=job.model.vocab_size)
    batch = (x[rank * args.batch : (rank + 1) * args.batch], y[rank * args.batch : (rank + 1) * args.batch])

    def step() -> None:
        optimizer_step(wrapped, optimizer, scaler, [batch], device=device, dtype=None, grad_clip=1.0)

    times = time_calls(step, warmup=1, repeats=args.steps)
    # the peak of the three: gradients of a backward while the optimizer state exists
    forward_backward_step(wrapped, scaler, *batch, n_micro=1, sync=True, device=device, dtype=None)
    held = {
        "params": _local_bytes(model.parameters()),
        "grads": _local_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer": _local_bytes(
            v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
        ),
    }
    rss_now, rss_peak = rss_bytes()
    mine = {**held, "rss": rss_now, "rss_peak": rss_peak, "step_s": median(times), "steps_s": times}
    every: list[Any] = [None] * WORLD
    dist.all_gather_object(every, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"ranks": every, "params": params}, f)
    leave_process_group()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_rank, args=(os.path.join(tmp, "init"), args, out), nprocs=WORLD)
        with open(out) as f:
            result = json.load(f)
    ranks = result["ranks"]
    worst = {k: max(r[k] for r in ranks) for k in ("params", "grads", "optimizer", "rss", "rss_peak", "step_s")}
    worst["state"] = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks)
    worst["fastest_s"] = max(min(r["steps_s"]) for r in ranks)  # a step ends when the slower rank's does
    return {**worst, "model_params": result["params"], "steps_s": [r["steps_s"] for r in ranks]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="gpt2-small, 2 steps")
    parser.add_argument("--preset", default="gpt2-medium")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=1, help="windows per worker")
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()
    if args.side:
        emit(measure(args))
        return 0
    if args.quick:
        args.preset, args.steps = "gpt2-small", 2
    print(f"machine: {machine()}")
    common = ["--preset", args.preset, "--steps", str(args.steps), "--batch", str(args.batch)]
    common += ["--context", str(args.context)]
    sides = {side: run_side(__file__, ["--side", side, *common], timeout=1800) for side in ("ddp", "fsdp")}
    ddp, fsdp = sides["ddp"], sides["fsdp"]
    print(
        f"\n{args.preset} ({ddp['model_params'] / 1e6:.0f} M parameters), {WORLD} workers (gloo, 1 thread each), "
        f"batch {args.batch} x {args.context} per worker, fp32, median of {args.steps} steps; per worker, the "
        "larger of the two:\n"
    )
    rows = []
    for name, r in sides.items():
        rows.append(
            [
                name,
                size(r["params"]),
                size(r["grads"]),
                size(r["optimizer"]),
                size(r["state"]),
                size(r["rss"]),
                size(r["rss_peak"]),
                f"{r['step_s']:.2f} / {r['fastest_s']:.2f}",
            ]
        )
    rows.append(
        [
            "fsdp / ddp",
            f"{ratio(fsdp['params'], ddp['params']):.2f}",
            f"{ratio(fsdp['grads'], ddp['grads']):.2f}",
            f"{ratio(fsdp['optimizer'], ddp['optimizer']):.2f}",
            f"{ratio(fsdp['state'], ddp['state']):.2f}",
            f"{ratio(fsdp['rss'], ddp['rss']):.2f}",
            f"{ratio(fsdp['rss_peak'], ddp['rss_peak']):.2f}",
            f"{ratio(fsdp['step_s'], ddp['step_s']):.2f} / {ratio(fsdp['fastest_s'], ddp['fastest_s']):.2f}",
        ]
    )
    headers = ["side", "parameters", "gradients", "AdamW state", "sum", "RSS then", "peak RSS"]
    headers.append("step s (median / fastest)")
    print(table(headers, rows))
    share = ratio(fsdp["state"], ddp["state"])
    out = Report("fsdp", quick=args.quick)
    out.figure(
        f"FSDP vs DDP on CPU, {args.preset} on {WORLD} workers (gloo): memory per worker",
        f"params+grads+AdamW {size(fsdp['state'])} vs {size(ddp['state'])} ({share:.2f}x); step time "
        f"{ratio(fsdp['step_s'], ddp['step_s']):.2f}x DDP's",
        ratio=share,
        goal="~1/2 of DDP's memory",
        met=share <= 0.55,
    )
    out.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
