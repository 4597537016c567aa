"""GPU training MFU: gpt2-small at context 1024, bf16 autocast, torch.compile, fused AdamW, vocab padded to 50304.

ours  gptcore's `GPT` (``pad_vocab_multiple=64``), `configure_optimizer` (fused AdamW on CUDA), `autocast` at
      bf16, ``torch.compile``, gradient clipping at 1.0: the step `gptcore.train.train` takes
ref   llms_from_scratch.ch04.GPTModel at the same shape (context 1024, QKV bias, vocab 50257), fp32,
      torch.optim.AdamW: tokens/s only

MFU = tokens/s x `gptcore.accounting.training_flops_per_token` (6N + 12 L d T) / the device's dense bf16 peak
(`gptcore.hardware.peak_flops`, or ``--peak-tflops``). Without CUDA it prints that the figure is
unmeasured and exits 0. Each side in its own process.

    python benchmarks/bench_gpu_mfu.py [--quick] [--batch-size 16] [--steps 20] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from common import book_step, emit, machine, our_step, random_batch, ratio, run_side, summary, table, time_calls

CONTEXT = 1024


def _timed(step: Any, device: Any, warmup: int, steps: int) -> float:
    """Seconds per step, the device synchronised around each."""
    import torch

    def synced() -> None:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return sum(time_calls(synced, warmup=warmup, repeats=steps)) / steps


def _profile(step: Any, device: Any, steps: int = 3, rows: int = 25) -> None:
    """Print the kernels that take the most device time over ``steps`` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70), flush=True)


def measure_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gptcore.accounting import training_flops_per_token
    from gptcore.config import JobConfig
    from gptcore.model import GPT
    from gptcore.optimizer import configure_optimizer
    from gptcore.runtime import resolve_precision

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    job = JobConfig.from_dict(
        {
            "model": {
                "preset": args.preset,
                "context_length": args.context,
                "pad_vocab_multiple": args.pad_vocab,
                **({"dropout": args.dropout} if args.dropout is not None else {}),
            },
            "train": {"precision": "bf16", "compile": args.compile, "batch_size": args.batch_size},
        }
    )
    torch.manual_seed(123)
    model = GPT(job.model).to(device).train()
    optimizer = configure_optimizer(model, job, device)
    dtype = resolve_precision(job.train.precision, device)
    compiled = torch.compile(model, mode=args.compile_mode) if job.train.compile else model
    batch = random_batch(args.batch_size, args.context, device)
    step = our_step(compiled, optimizer, batch, dtype, job.train.grad_clip)
    if args.sdpa_backend:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        plain_step, backend = step, getattr(SDPBackend, args.sdpa_backend.upper())

        def step() -> None:
            with sdpa_kernel(backend):
                plain_step()

    seconds = _timed(step, device, args.warmup, args.steps)
    tok_s = args.batch_size * args.context / seconds
    if args.profile:
        _profile(step, device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and device.type == "cuda":
        from gptcore.hardware import peak_flops

        peak = peak_flops(device)
    flops = tok_s * training_flops_per_token(job.model, args.context)
    return {
        "tok_s": tok_s,
        "step_s": seconds,
        "tflops": flops / 1e12,
        "mfu": flops / peak if peak else math.nan,
        "peak_tflops": peak / 1e12 if peak else math.nan,
        "params": model.num_params(),
        "vocab": model.config.padded_vocab_size,
    }


def measure_ref(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from llms_from_scratch.ch04 import GPTModel

    from gptcore.config import model_config

    device = torch.device(args.device)
    c = model_config(args.preset)
    cfg = {
        "vocab_size": c.vocab_size,
        "context_length": args.context,
        "emb_dim": c.d_model,
        "n_heads": c.n_heads,
        "n_layers": c.n_layers,
        "drop_rate": c.dropout,
        "qkv_bias": True,
    }
    torch.manual_seed(123)
    model = GPTModel(cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    step = book_step(model, optimizer, random_batch(args.batch_size, args.context, device))
    seconds = _timed(step, device, args.warmup, args.steps)
    return {"tok_s": args.batch_size * args.context / seconds, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 warm-up and 5 timed steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first, compilation included (5)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the code path (with --preset micro)")
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--context", type=int, default=CONTEXT)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--dropout", type=float, default=None, help="override the preset's dropout")
    parser.add_argument("--pad-vocab", type=int, default=64, help="pad the vocabulary to a multiple of this (1: off)")
    parser.add_argument("--sdpa-backend", help="force one SDPA kernel: flash_attention, cudnn_attention, ...")
    parser.add_argument("--profile", action="store_true", help="print ours' top kernels over 3 steps")
    parser.add_argument("--side", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    args.steps = args.steps or (5 if args.quick else 20)
    if args.side:
        emit(measure_ours(args) if args.side == "ours" else measure_ref(args))
        return

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"machine: {machine()}")
        print("no CUDA device: the GPU MFU figure is unmeasured on this machine")
        summary("gpu mfu", "unmeasured (no GPU)", "measure on a GPU", None)
        return

    print(f"machine: {machine()}")
    print(
        f"{args.preset}, batch {args.batch_size} x context {args.context}, {args.warmup} warm-up + {args.steps} timed\n"
    )
    passed = [
        *("--device", args.device, "--preset", args.preset, "--context", str(args.context)),
        *("--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)),
        *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
        *([] if args.compile else ["--no-compile"]),
        *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
        *(["--dropout", str(args.dropout)] if args.dropout is not None else []),
        *("--pad-vocab", str(args.pad_vocab)),
        *(["--sdpa-backend", args.sdpa_backend] if args.sdpa_backend else []),
        *(["--profile"] if args.profile else []),
    ]
    ref = run_side(__file__, ["--side", "ref", *passed])
    ours = run_side(__file__, ["--side", "ours", *passed])
    rows = [
        ["reference (fp32, AdamW)", f"{ref['step_s'] * 1000:,.0f}", f"{ref['tok_s']:,.0f}", "", "1.00x"],
        [
            f"ours (bf16, compile={args.compile}, fused AdamW, vocab {ours['vocab']})",
            f"{ours['step_s'] * 1000:,.0f}",
            f"{ours['tok_s']:,.0f}",
            f"{ours['mfu']:.1%} of {ours['peak_tflops']:.0f} TFLOP/s",
            f"{ratio(ours['tok_s'], ref['tok_s']):.2f}x",
        ],
    ]
    print(table(["side", "ms/step", "tok/s", "MFU", "vs ref"], rows))
    summary(
        "gpu mfu",
        f"MFU {ours['mfu']:.1%} ({ours['tok_s']:,.0f} tok/s, {ratio(ours['tok_s'], ref['tok_s']):.1f}x ref)",
        "measure on a GPU",
        None,
    )


if __name__ == "__main__":
    main()
