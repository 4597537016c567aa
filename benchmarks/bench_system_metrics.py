"""Training throughput of the micro model with and without MLflow's system-metrics monitor, in one process.

Blocks of training steps alternate: monitor off, monitor on (`orchestrator.system_metrics.TrialSystemMetrics` on a
run of a throw-away SQLite store, as a trial's rank-0 worker runs it), repeated; tokens/s of each block, then the
median of each side. Alternating blocks in one process cancel the drift of a shared machine. Training uses every
core (``--threads``, default all), as a trial's worker does, so that the monitor's sampling takes its CPU from the
training as it does in a trial, rather than from an idle core.

    python benchmarks/bench_system_metrics.py [--quick] [--blocks 3] [--seconds 12] [--interval 10] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import Report, machine

from gptcore.config import JobConfig
from gptcore.model import GPT


def train_block(model, optimizer, batch, seconds: float) -> tuple[int, float]:
    """Train for ``seconds``; returns (steps, tokens/s)."""
    x, y = batch
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
    elapsed = time.perf_counter() - start
    return steps, steps * x.numel() / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 pairs of 8 s blocks")
    parser.add_argument("--blocks", type=int, default=None, help="off/on pairs (3)")
    parser.add_argument("--seconds", type=float, default=None, help="length of a block (12)")
    parser.add_argument("--interval", type=float, default=10.0, help="the monitor's sampling interval, seconds")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    args.blocks = args.blocks or (2 if args.quick else 3)
    args.seconds = args.seconds or (8.0 if args.quick else 12.0)
    print(f"machine: {machine()}", flush=True)

    from mlflow import MlflowClient

    from orchestrator.system_metrics import TrialSystemMetrics

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    job = JobConfig.from_dict({"model": {"preset": "micro", "dropout": 0.0}})
    model = GPT(job.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    L = job.model.context_length
    batch = (torch.randint(0, 50257, (args.batch_size, L)), torch.randint(0, 50257, (args.batch_size, L)))
    train_block(model, optimizer, batch, 2.0)  # warm-up
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlruns.db'}"
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("bench")).info.run_id
        rates: dict[str, list[float]] = {"off": [], "on": []}
        samples = 0
        for block in range(args.blocks):
            for side in ("off", "on"):
                monitor = TrialSystemMetrics(run_id, uri, sampling_interval=args.interval) if side == "on" else None
                if monitor:
                    monitor.start()
                steps, rate = train_block(model, optimizer, batch, args.seconds)
                if monitor:
                    monitor.finish()
                rates[side].append(rate)
                print(f"block {block} monitor {side:3}: {steps} steps, {rate:,.0f} tokens/s", flush=True)
        samples = len(client.get_metric_history(run_id, "system/cpu_utilization_percentage"))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    out = Report("system_metrics", quick=args.quick)
    out.figure(
        f"MLflow system-metrics monitor every {args.interval:g} s: training tokens/s on {args.threads} thread(s)",
        f"{(on / off - 1) * 100:+.1f} % ({on:,.0f} with vs {off:,.0f} tokens/s without; micro model)",
        ratio=on / off,
        goal="no cost beyond the noise (>= -2 %)",
        met=on / off >= 0.98,
    )
    print(
        f"micro model, batch {args.batch_size} x {L}, {args.threads} thread(s): median {off:,.0f} tokens/s without "
        f"the monitor, {on:,.0f} with it (every {args.interval:g} s, {samples} samples logged): "
        f"{(on / off - 1) * 100:+.1f} %"
    )
    out.save()


if __name__ == "__main__":
    main()
