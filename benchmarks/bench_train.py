"""Training throughput: gpt2-small at the book's shapes (context 256, no QKV bias, untied head), batch 2, AdamW.

ours     gptcore's `GPT`, `configure_optimizer` (fused AdamW), `autocast` at ``precision=auto`` (what
         `resolve_precision` picks on this CPU: the faster of bf16 and fp32 in its cached micro-benchmark) and
         `keep_freed_memory_mapped`, one step as `train` takes it
ours32   the same at ``precision=fp32``: the like-for-like comparison with the reference (fp32 on both sides)
ours16   the same at ``precision=bf16``: with ours32, whether auto picked the faster on this CPU
ref      llms_from_scratch.ch04.GPTModel, fp32, torch.optim.AdamW, the book's `calc_loss_batch`

Both sides use every core (torch's default threads). ``--threads`` adds ours run in a second thread, as Ray Train
runs the loop: with a malloc arena of its own (glibc's default) and with ``MALLOC_ARENA_MAX=1`` (what the
orchestrator sets for its workers).

Each side runs in its own process (the malloc tuning is process-wide), on the same random batch shape,
with untimed warm-up steps first; tokens/s is batch x context / the median step time.

    python benchmarks/bench_train.py [--quick] [--warmup N] [--steps N] [--threads]
"""

from __future__ import annotations

import argparse
import threading
from typing import Any

from common import (
    BOOK_CONFIG,
    OUR_MODEL,
    Report,
    book_step,
    cpu_model,
    emit,
    machine,
    median,
    our_step,
    random_batch,
    ratio,
    run_side,
    table,
    time_calls,
)

BATCH, CONTEXT, LR, WEIGHT_DECAY, GOAL = 2, 256, 4e-4, 0.1, 3.0
BUDGET_S = 90.0  # per side: bf16 emulated (no native bf16) takes ~90 s a step here; its first steps say enough
PRECISIONS = {"ours": "auto", "ours32": "fp32", "ours16": "bf16"}  # side -> train.precision


def _result(step_times: list[float], params: int, precision: str) -> dict[str, Any]:
    step = median(step_times)  # robust to other processes' bursts on a shared machine
    return {
        "tok_s": BATCH * CONTEXT / step,
        "step_s": step,
        "steps_s": step_times,  # fewer than asked where a side ran out of its time budget
        "params": params,
        "precision": precision,
    }


def measure_ours(precision: str, warmup: int, steps: int) -> dict[str, Any]:
    import torch

    from gptcore.config import JobConfig
    from gptcore.model import GPT
    from gptcore.optimizer import configure_optimizer
    from gptcore.runtime import keep_freed_memory_mapped, resolve_precision

    device = torch.device("cpu")
    keep_freed_memory_mapped()  # as train() does on CPU
    job = JobConfig.from_dict(
        {"model": OUR_MODEL, "train": {"lr": LR, "weight_decay": WEIGHT_DECAY, "precision": precision}}
    )
    torch.manual_seed(123)
    model = GPT(job.model).to(device).train()
    optimizer = configure_optimizer(model, job, device)
    dtype = resolve_precision(job.train.precision, device, "train")
    step = our_step(model, optimizer, random_batch(BATCH, CONTEXT), dtype)  # grad_clip 0, as the book
    times = time_calls(step, warmup=warmup, repeats=steps, budget_s=BUDGET_S)
    return _result(times, model.num_params(), str(dtype).replace("torch.", "") if dtype else "fp32")


def measure_ref(warmup: int, steps: int) -> dict[str, Any]:
    import torch
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(123)
    model = GPTModel(BOOK_CONFIG).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    step = book_step(model, optimizer, random_batch(BATCH, CONTEXT))
    times = time_calls(step, warmup=warmup, repeats=steps)
    return _result(times, sum(p.numel() for p in model.parameters()), "fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 3 timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8)")
    parser.add_argument("--threads", action="store_true", help="also ours in a second thread, with and without")
    parser.add_argument("--side", choices=[*PRECISIONS, "ours-thread", "ref"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps or (3 if args.quick else 8)
    if args.side == "ref":
        emit(measure_ref(warmup, steps))
        return
    if args.side == "ours-thread":
        results: list[dict[str, Any]] = []
        worker = threading.Thread(target=lambda: results.append(measure_ours("auto", warmup, steps)))
        worker.start()
        worker.join()
        emit(results[0])
        return
    if args.side is not None:
        emit(measure_ours(PRECISIONS[args.side], warmup, steps))
        return

    print(f"machine: {machine()}")
    print(f"gpt2-small (book shapes), batch {BATCH} x context {CONTEXT}, {warmup} warm-up + {steps} timed steps\n")
    side_args = ["--warmup", str(warmup), "--steps", str(steps)]
    results = {side: run_side(__file__, ["--side", side, *side_args]) for side in ("ref", *PRECISIONS)}
    names = {
        "ref": "reference (llms_from_scratch, fp32 AdamW)",
        "ours": "ours (gptcore, fused AdamW), precision=auto",
        "ours32": "ours, precision=fp32",
        "ours16": "ours, precision=bf16",
        "thread": "ours in a thread, MALLOC_ARENA_MAX=8",
        "thread1": "ours in a thread, MALLOC_ARENA_MAX=1",
    }
    if args.threads:
        thread_args = ["--side", "ours-thread", *side_args]
        results["thread"] = run_side(__file__, thread_args, env={"MALLOC_ARENA_MAX": "8"})
        results["thread1"] = run_side(__file__, thread_args, env={"MALLOC_ARENA_MAX": "1"})
    ref = results["ref"]["tok_s"]
    rows = [
        [
            names[side],
            r["precision"],
            f"{r['params'] / 1e6:.1f}M",
            f"{r['step_s'] * 1000:,.0f}",
            len(r["steps_s"]),
            f"{r['tok_s']:,.0f}",
            f"{ratio(r['tok_s'], ref):.2f}x",
        ]
        for side, r in results.items()
    ]
    print(table(["side", "precision", "params", "ms/step", "steps timed", "tok/s", "vs ref"], rows))
    report(results, Report("train", quick=args.quick))


def report(results: dict[str, dict[str, Any]], out: Report) -> None:
    """The figures: ours (auto) and ours in fp32 against the reference, and whether auto picked the faster."""
    from gptcore.autoprecision import cpu_timings

    ref, auto, fp32, bf16 = (results[side] for side in ("ref", "ours", "ours32", "ours16"))
    speedup, like = ratio(auto["tok_s"], ref["tok_s"]), ratio(fp32["tok_s"], ref["tok_s"])
    print(f"\nspeed-up {speedup:.2f}x (goal >= {GOAL:.0f}x): {'met' if speedup >= GOAL else 'NOT met'}")
    out.figure(
        f"training, gpt2-small, batch {BATCH} x {CONTEXT}, precision=auto vs reference",
        f"{speedup:.2f}x ({auto['tok_s']:.0f} vs {ref['tok_s']:.0f} tok/s; auto = {auto['precision']})",
        ratio=speedup,
        like_for_like=f"{like:.2f}x fp32 vs fp32 ({fp32['tok_s']:.0f} vs {ref['tok_s']:.0f} tok/s)",
        goal=f">= {GOAL:.0f}x",
        met=speedup >= GOAL,
    )
    probe = cpu_timings("train")  # what auto decided from (cached per machine; measured here if it was not)
    faster = "bfloat16" if bf16["tok_s"] > fp32["tok_s"] else "fp32"
    print(
        f"precision=auto on {cpu_model()}: {auto['precision']} (its micro-benchmark: fp32 "
        f"{probe['fp32_s'] * 1e3:.0f} ms, bf16 {probe['bf16_s'] * 1e3:.0f} ms); the step here: fp32 "
        f"{fp32['tok_s']:.0f} tok/s, bf16 {bf16['tok_s']:.0f} tok/s"
    )
    out.figure(
        "training: precision=auto picks the faster of fp32 and bf16 on this CPU",
        f"auto = {auto['precision']}; the step: fp32 {fp32['tok_s']:.0f}, bf16 {bf16['tok_s']:.0f} tok/s",
        ratio=ratio(bf16["tok_s"], fp32["tok_s"]),
        goal="auto = the faster",
        met=auto["precision"] == faster,
    )
    out.save()


if __name__ == "__main__":
    main()
