"""GPU training MFU: gpt2-small at context 1024, bf16 autocast, torch.compile, fused AdamW, vocab padded to 50304.

ours    gptcore's `GPT` (``pad_vocab_multiple=64``), `configure_optimizer` (fused AdamW on CUDA), `autocast` at
        bf16, ``torch.compile``, gradient clipping at 1.0: the step `gptcore.train.train` takes
ours32  the same in fp32 (no autocast): the like-for-like comparison with the reference
ref     llms_from_scratch.ch04.GPTModel at the same shape (context 1024, QKV bias, vocab 50257), fp32,
        torch.optim.AdamW: tokens/s only

Both sides run with the same matmul settings: TF32 for fp32 matmuls and cuDNN on (``--no-tf32``: strict fp32 on
both), so that the fp32-vs-fp32 ratio measures the code, not a precision setting one side has and the other not.

MFU = tokens/s x `gptcore.accounting.training_flops_per_token` (6N + 12 L d T) / the device's dense bf16 peak
(`gptcore.hardware.peak_flops`, or ``--peak-tflops``). Without CUDA it prints that the figure is
unmeasured and exits 0. Each side in its own process.

    python benchmarks/bench_gpu_mfu.py [--quick] [--batch-size 16] [--steps 20] [--peak-tflops 989]
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from common import Report, book_step, emit, machine, our_step, random_batch, ratio, run_side, table, time_calls

CONTEXT = 1024
GOAL = ">= 50 % MFU (H100/H200)"


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


def matmul_settings(args: argparse.Namespace) -> None:
    """The fp32 matmul precision of both sides: TF32 (``--tf32``, the default) or strict fp32."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32


def measure_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from gptcore.accounting import training_flops_per_token
    from gptcore.config import JobConfig
    from gptcore.model import GPT
    from gptcore.optimizer import configure_optimizer
    from gptcore.runtime import resolve_precision

    device = torch.device(args.device)
    matmul_settings(args)
    job = JobConfig.from_dict(
        {
            "model": {
                "preset": args.preset,
                "context_length": args.context,
                "pad_vocab_multiple": args.pad_vocab,
                **({"dropout": args.dropout} if args.dropout is not None else {}),
            },
            "train": {"precision": args.precision, "compile": args.compile, "batch_size": args.batch_size},
        }
    )
    torch.manual_seed(123)
    model = GPT(job.model).to(device).train()
    optimizer = configure_optimizer(model, job, device)
    dtype = resolve_precision(job.train.precision, device, "train")
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
    matmul_settings(args)
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
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="strict fp32 matmuls on both sides")
    parser.add_argument("--precision", default="bf16", help="ours' train.precision (the parent adds an fp32 run)")
    parser.add_argument("--side", choices=["ours", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    args.steps = args.steps or (5 if args.quick else 20)
    if args.side:
        emit(measure_ours(args) if args.side == "ours" else measure_ref(args))
        return

    import torch

    out = Report("gpu_mfu", quick=args.quick)
    compiled = "compile" if args.compile else "eager"
    figure = f"GPU MFU, {args.preset} x {args.context}, batch {args.batch_size}, bf16, {compiled}, vs reference"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"machine: {machine()}")
        print("no CUDA device: the GPU MFU figure is unmeasured on this machine")
        out.unmeasured(figure, "no GPU", GOAL)
        out.save()
        return

    print(f"machine: {machine()}")
    print(
        f"{args.preset}, batch {args.batch_size} x context {args.context}, {args.warmup} warm-up + {args.steps} timed, "
        f"TF32 {'on' if args.tf32 else 'off'} on both sides\n"
    )
    passed = [
        *("--device", args.device, "--preset", args.preset, "--context", str(args.context)),
        *("--batch-size", str(args.batch_size), "--warmup", str(args.warmup), "--steps", str(args.steps)),
        *(["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else []),
        *([] if args.compile else ["--no-compile"]),
        *([] if args.tf32 else ["--no-tf32"]),
        *(["--compile-mode", args.compile_mode] if args.compile_mode else []),
        *(["--dropout", str(args.dropout)] if args.dropout is not None else []),
        *("--pad-vocab", str(args.pad_vocab)),
        *(["--sdpa-backend", args.sdpa_backend] if args.sdpa_backend else []),
    ]
    ref = run_side(__file__, ["--side", "ref", *passed])
    ours = run_side(__file__, ["--side", "ours", *passed, *(["--profile"] if args.profile else [])])
    ours32 = run_side(__file__, ["--side", "ours", *passed, "--precision", "fp32"])
    tf32 = "TF32" if args.tf32 else "strict fp32"
    reference = f"reference (fp32 with {tf32}, AdamW, eager)"
    rows = [
        [reference, f"{ref['step_s'] * 1000:,.0f}", f"{ref['tok_s']:,.0f}", "", "1.00x"],
        *(
            [
                f"ours ({name}, compile={args.compile}, fused AdamW, vocab {r['vocab']})",
                f"{r['step_s'] * 1000:,.0f}",
                f"{r['tok_s']:,.0f}",
                f"{r['mfu']:.1%} of {r['peak_tflops']:.0f} TFLOP/s",
                f"{ratio(r['tok_s'], ref['tok_s']):.2f}x",
            ]
            for name, r in (("bf16", ours), (f"fp32 with {tf32}", ours32))
        ),
    ]
    print(table(["side", "ms/step", "tok/s", "MFU", "vs ref"], rows))
    speedup, like = ratio(ours["tok_s"], ref["tok_s"]), ratio(ours32["tok_s"], ref["tok_s"])
    out.figure(
        figure,
        f"MFU {ours['mfu']:.1%} ({ours['tok_s']:,.0f} tok/s, {speedup:.1f}x the reference's {ref['tok_s']:,.0f})",
        ratio=speedup,
        like_for_like=f"{like:.2f}x fp32 vs fp32 (both {tf32}; ours compiled, the reference eager)",
        goal=GOAL,
        met=ours["mfu"] >= 0.5,
    )
    if args.device.startswith("cuda"):  # a run on the CPU checks this script, it measures no GPU figure
        out.save()


if __name__ == "__main__":
    main()
