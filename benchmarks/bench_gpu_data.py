"""The data path on a GPU machine: preparing shards on its cores, then gptcore's whole loop reading them.

prepare  a generated corpus (text files of English-like words) tokenized into shards by `prepare_group`, one
         process per group on every core (what `orchestrator prepare` does with Ray tasks), against one process
         doing the first group alone (nanoGPT's single-process rate): tokens/s of each
loop     `gptcore.train.train(job, data_dir=...)` on those shards: gpt2-small, context 1024, batch 16, bf16,
         torch.compile, vocabulary padded to 50304, no evaluation until the end; tokens/s and MFU of its steps
         (median after the compile steps), beside `bench_gpu_mfu.py --side ours` (the same step on a random batch,
         no loader, no per-step host syncs) in the same run

    python benchmarks/bench_gpu_data.py [--quick] [--text-mb 400] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from common import Report, machine, run_side

_WORD_TEXT = (
    "the of and to in a is that for it as was with be by on not he I this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way "
    "down should because each just those people Mr how too little state good very make world still own see men "
    "work long get here between both life being under never day same another know while last might us great "
    "year off come since against go came right used take three painter effort moves canvas portrait well old"
)
WORDS = np.array(_WORD_TEXT.split())


def generate(folder: Path, megabytes: int, seed: int = 0) -> None:
    """JSONL files of about 4 MB: documents of a few hundred words, with punctuation and paragraphs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(max(1, megabytes // 4)):
        words = WORDS[rng.integers(0, len(WORDS), 700_000)]
        marks = rng.choice(np.array(["", ",", ".", ".\n\n", ".<doc>"]), len(words), p=[0.8, 0.08, 0.08, 0.037, 0.003])
        documents = " ".join(np.char.add(words, marks))[: 4 << 20].split("<doc>")
        (folder / f"{f:05d}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))


def prepare(corpus: Path, out: Path, workers: int) -> dict[str, float]:
    """The whole corpus on ``workers`` processes (one group each at a time), then group 0 again in this process."""
    import gptcore.corpus
    from gptcore.config import DataConfig
    from gptcore.corpus import finish_dataset, plan_corpus, prepare_group

    gptcore.corpus.GROUP_BYTES = 16 << 20  # enough groups for every core
    plan = plan_corpus(DataConfig(corpus=str(corpus)))
    folder = out / plan.key
    groups = range(len(plan.groups))
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(prepare_group, [plan] * len(groups), groups, [folder] * len(groups)))
    finish_dataset(plan, folder, results)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    single = prepare_group(plan, 0, out / "single")
    return {
        "folder": folder,
        "tokens": sum(r.tokens for r in results),
        "seconds": seconds,
        "single_tokens": single.tokens,
        "single_seconds": time.perf_counter() - start,
    }


def loop(folder: Path, steps: int) -> dict[str, float]:
    import torch

    from gptcore.accounting import training_flops_per_token
    from gptcore.config import JobConfig
    from gptcore.hardware import model_flops_utilisation, peak_flops
    from gptcore.hooks import Hooks
    from gptcore.train import train

    job = JobConfig.from_dict(
        {
            "model": {"preset": "gpt2-small", "pad_vocab_multiple": 64},
            "data": {"corpus": "unused", "val_tokens": 1 << 20},
            "train": {
                "batch_size": 16,
                "max_steps": steps,
                "eval_every": 0,
                "eval_iters": 2,
                "compile": True,
                "precision": "bf16",
                "sample_max_new_tokens": 0,
                "lr_schedule": "constant",
            },
        }
    )

    class Rates(Hooks):
        def __init__(self) -> None:
            self.rates: list[float] = []

        def on_step(self, ctx, state, metrics):
            self.rates.append(metrics["tokens_per_sec"])

    rates = Rates()
    result = train(job, rates, data_dir=folder, device="cuda")
    steady = statistics.median(rates.rates[10:])
    flops = training_flops_per_token(job.model)
    mfu = model_flops_utilisation(steady, flops, peak_flops(torch.device("cuda")))
    return {"tokens_per_sec": steady, "mfu": mfu, "final_loss": result.metrics.get("train_loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 MB of text, 30 steps")
    parser.add_argument("--text-mb", type=int, default=None, help="generated text (default 400)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 60)")
    args = parser.parse_args()
    text_mb, steps = args.text_mb or (100 if args.quick else 400), args.steps or (30 if args.quick else 60)
    print(f"machine: {machine()}", flush=True)
    import torch

    out = Report("gpu_data", quick=args.quick)
    loop_figure = "GPU: gptcore's loop on token shards vs the bare step (bench_gpu_mfu.py --side ours)"
    prepare_figure = "prepare on every core of a GPU machine vs one process"
    if not torch.cuda.is_available():  # both figures are a GPU machine's (its cores, its GPU)
        print("no CUDA device: unmeasured on this machine")
        out.unmeasured(loop_figure, "no GPU", ">= 90 % of the bare step")
        out.unmeasured(prepare_figure, "no GPU")
        out.save()
        return
    work = Path(tempfile.mkdtemp(prefix="gpu-data-"))
    t0 = time.perf_counter()
    generate(work / "corpus", text_mb)
    print(f"generated {text_mb} MB of text in {time.perf_counter() - t0:.1f} s", flush=True)
    cores = os.cpu_count() or 1
    p = prepare(work / "corpus", work / "datasets", cores)
    parallel, single = p["tokens"] / p["seconds"], p["single_tokens"] / p["single_seconds"]
    print(
        f"prepare, {cores} processes: {p['tokens'] / 1e6:.1f} M tokens in {p['seconds']:.1f} s, "
        f"{parallel / 1e6:.2f} M tokens/s"
    )
    print(f"prepare, one process (a group): {single / 1e6:.2f} M tokens/s -> {parallel / single:.1f}x", flush=True)
    out.figure(
        prepare_figure,
        f"{parallel / 1e6:.1f} M tokens/s on {cores} cores vs {single / 1e6:.2f} M in one process",
        ratio=parallel / single,
    )
    ours = loop(p["folder"], steps)
    print(f"gptcore.train loop on shards: {ours['tokens_per_sec']:,.0f} tokens/s, MFU {ours['mfu']:.1%}", flush=True)
    bare = run_side(Path(__file__).parent / "bench_gpu_mfu.py", ["--side", "ours"], timeout=400)
    share = ours["tokens_per_sec"] / bare["tok_s"]
    print(f"bench_gpu_mfu.py --side ours (the step alone, random batch): {bare['tok_s']:,.0f} tokens/s -> {share:.0%}")
    out.figure(
        loop_figure,
        f"{share:.0%} ({ours['tokens_per_sec']:,.0f} vs {bare['tok_s']:,.0f} tok/s; MFU {ours['mfu']:.1%})",
        ratio=share,
        goal=">= 90 % of the bare step",
        met=share >= 0.9,
    )
    out.save()


if __name__ == "__main__":
    main()
