"""gptcore's whole loop under FSDP on one GPU: gpt2-large / gpt2-xl, tokens/s and MFU (`benchmarks/gpu_fsdp.sh`).

`gptcore.train.train` with ``train.parallel=fsdp`` in a single process (train() starts a one-rank NCCL group),
activation checkpointing, bf16 (bf16 parameters for compute, fp32 reductions and AdamW state), ``torch.compile`` of
each block, vocabulary padded to 50304, context 1024, on a `SlidingWindowDataset` over random tokens (no tokenizer,
no corpus). One evaluation at the end, no samples, no checkpoint written. Tokens/s is the median over the steps after
``--skip`` (compilation); MFU counts the model's FLOPs (`training_flops_per_token`: 6 N + 12 L d T, not the recomputed
forward of activation checkpointing) against the GPU's datasheet bf16 peak (`gptcore.hardware`).

    python benchmarks/bench_gpu_fsdp.py --parallel fsdp --preset gpt2-xl [--batch 8] [--steps 30] [--no-ac]
    python benchmarks/bench_gpu_fsdp.py [--quick]     # the comparison

Compile scope differs between the sides: FSDP compiles each block (its hooks, the head and the loss stay eager),
DDP (one process: the plain model) compiles the whole model with the loss fused into it. Every result says its scope.
Without ``--parallel`` (as ``run_all.py`` runs it) the script compares, each in its own process: FSDP and DDP
compiled (the scopes differ: said in the row) and both eager (like-for-like), with activation checkpointing; the
ratio of each pair goes to ``benchmarks/results/gpu_fsdp.json``. Without CUDA that comparison is unmeasured.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import types


def stub_if_missing() -> None:
    """Import-time stand-ins for tiktoken / safetensors where the machine lacks them: this run encodes no text and
    writes no checkpoint, so nothing calls them."""

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("not installed on this machine (a stand-in of bench_gpu_fsdp.py)")

    stand_ins = {
        "tiktoken": {
            "tiktoken": {"Encoding": unavailable},
            "tiktoken.load": {"data_gym_to_mergeable_bpe_ranks": unavailable},
            "tiktoken_ext": {},
            "tiktoken_ext.openai_public": {"r50k_pat_str": ""},
        },
        "safetensors": {
            "safetensors": {"SafetensorError": type("SafetensorError", (Exception,), {}), "safe_open": unavailable},
            "safetensors.torch": {"load_file": unavailable, "save_file": unavailable},
        },
    }
    for package, modules in stand_ins.items():
        try:
            importlib.import_module(package)
        except ImportError:
            print(f"note: {package} is not installed; a stand-in is used (nothing here calls it)", flush=True)
            for name, attrs in modules.items():
                module = types.ModuleType(name)
                module.__dict__.update(attrs)
                sys.modules[name] = module


def compile_scope(parallel: str, compiled: bool) -> str:
    """What ``torch.compile`` covers in `gptcore.train.train` for ``parallel``."""
    if not compiled:
        return "nothing (eager)"
    return "each block (head and loss eager)" if parallel == "fsdp" else "the whole model (loss fused)"


def compare(args: argparse.Namespace) -> int:
    """FSDP against DDP on one GPU, compiled (scopes differ) and eager (like-for-like); the results file."""
    import torch
    from common import Report, machine, run_side, table

    out = Report("gpu_fsdp", quick=args.quick)
    figure = f"FSDP vs DDP on one GPU, {args.preset} x {args.context}, batch {args.batch}, activation checkpointing"
    print(f"machine: {machine()}", flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: unmeasured on this machine")
        out.unmeasured(figure, "no GPU")
        out.save()
        return 0
    steps, skip = (14, 6) if args.quick else (args.steps, args.skip)
    common = ["--preset", args.preset, "--batch", str(args.batch), "--context", str(args.context)]
    common += ["--steps", str(steps), "--skip", str(skip)]
    runs = {
        (parallel, compiled): run_side(
            __file__, [*common, "--parallel", parallel, *([] if compiled else ["--no-compile"])], timeout=600
        )
        for compiled in (True, False)
        for parallel in ("ddp", "fsdp")
    }
    rows = [
        [p, r["compile_scope"], f"{r['tokens_per_sec']:,}", f"{r['mfu']:.1%}", f"{r['max_memory_gib']:.1f} GiB"]
        for (p, _), r in runs.items()
    ]
    print(table(["parallel", "compiled", "tokens/s", "MFU", "peak memory"], rows))
    compiled, eager = (runs["fsdp", c]["tokens_per_sec"] / runs["ddp", c]["tokens_per_sec"] for c in (True, False))
    out.figure(
        figure,
        f"{compiled:.2f}x DDP's tokens/s compiled (FSDP: each block; DDP: the whole model, loss fused); FSDP MFU "
        f"{runs['fsdp', True]['mfu']:.1%}",
        ratio=compiled,
        like_for_like=f"{eager:.2f}x both eager",
    )
    out.save()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-xl")
    parser.add_argument("--batch", type=int, default=8, help="windows per step (one micro-batch)")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=8, help="first steps left out of the median (compilation)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--no-ac", action="store_true", help="no activation checkpointing")
    parser.add_argument("--parallel", choices=["fsdp", "ddp"], help="one run (ddp: the reference); none: compare")
    parser.add_argument("--quick", action="store_true", help="compare: 14 steps, the median after 6")
    parser.add_argument("--cpu-offload", action="store_true", help="train.fsdp_cpu_offload")
    parser.add_argument("--device", default="cuda", help="cpu: a check of this script itself (gloo, no MFU)")
    parser.add_argument("--precision", default="bf16")
    args = parser.parse_args()
    if args.parallel is None:
        return compare(args)
    stub_if_missing()

    import numpy as np
    import torch

    from gptcore.accounting import training_flops_per_token
    from gptcore.config import JobConfig
    from gptcore.data import SlidingWindowDataset
    from gptcore.hardware import model_flops_utilisation, peak_flops
    from gptcore.hooks import Hooks
    from gptcore.train import train

    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats()
    job = JobConfig.from_dict(
        {
            "model": {"preset": args.preset, "context_length": args.context, "pad_vocab_multiple": 64, "dropout": 0.0},
            "data": {"corpus": "random tokens"},
            "train": {
                "parallel": args.parallel,
                "activation_checkpointing": not args.no_ac,
                "fsdp_cpu_offload": args.cpu_offload,
                "precision": args.precision,
                "compile": not args.no_compile,
                "batch_size": args.batch,
                "max_steps": args.steps,
                "lr": 1e-4,
                "lr_schedule": "constant",
                "eval_every": 0,
                "eval_iters": 2,
                "sample_max_new_tokens": 0,
            },
        }
    )
    rng = np.random.default_rng(0)
    L = args.context
    train_tokens = rng.integers(0, job.model.vocab_size, (args.steps * args.batch + 1) * L + 1, dtype=np.uint16)
    val_tokens = rng.integers(0, job.model.vocab_size, 4 * args.batch * L + 1, dtype=np.uint16)
    datasets = (
        SlidingWindowDataset(train_tokens, L, L, name="train", key="random"),
        SlidingWindowDataset(val_tokens, L, L, name="validation", key="random"),
    )

    class Measure(Hooks):
        def __init__(self) -> None:
            self.rates: list[float] = []
            self.losses: list[float] = []
            self.flops = 0.0
            self.params = 0
            self.started = time.perf_counter()

        def on_train_start(self, ctx, state):
            self.flops = training_flops_per_token(ctx.config.model, L)
            self.params = ctx.model.num_params()
            took = time.perf_counter() - self.started
            print(f"set up in {took:.1f} s: {self.params / 1e6:.0f} M parameters", flush=True)

        def on_step(self, ctx, state, metrics):
            self.rates.append(metrics["tokens_per_sec"])
            self.losses.append(metrics["loss"])
            if state.step in (1, 2, args.skip) or state.step % 10 == 0:
                rate = metrics["tokens_per_sec"]
                print(f"step {state.step}: loss {metrics['loss']:.3f}, {rate:,.0f} tok/s", flush=True)

    measure = Measure()
    result = train(job, measure, datasets=datasets, device=device)
    steady = statistics.median(measure.rates[args.skip :] or measure.rates)
    mfu = model_flops_utilisation(steady, measure.flops, peak_flops(device))
    out = {
        "preset": args.preset,
        "parallel": args.parallel,
        "params": measure.params,
        "batch": args.batch,
        "context": L,
        "compile": not args.no_compile,
        "compile_scope": compile_scope(args.parallel, not args.no_compile),
        "activation_checkpointing": not args.no_ac,
        "status": result.status,
        "tokens_per_sec": round(steady),
        "mfu": mfu,
        "first_loss": measure.losses[0],
        "last_loss": measure.losses[-1],
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "wall_s": round(result.wall_time, 1),
    }
    mfu_text = f"MFU {mfu:.1%} (model FLOPs)" if mfu is not None else "no MFU (no datasheet peak for this device)"
    memory = f", peak memory {out['max_memory_gib']:.1f} GiB" if out["max_memory_gib"] is not None else ""
    print(
        f"{args.preset} ({args.parallel}, compiled: {out['compile_scope']}): {steady:,.0f} tokens/s, {mfu_text}"
        f"{memory}, loss {out['first_loss']:.2f} -> "
        f"{out['last_loss']:.2f}",
        flush=True,
    )
    print("BENCH_RESULT " + json.dumps(out), flush=True)
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
