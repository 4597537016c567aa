"""Generation speed: 200 greedy tokens from "Every effort moves you" with gpt2-small (book shapes), batch 1.

ref        llms_from_scratch.ch04.generate_text_simple: fp32, the whole sequence re-run for every token
ours       gptcore.sampling.generate: KV cache (one position per token), head on the last position only
ours-amp   the same under gptcore.train's ``autocast(device, torch.bfloat16)`` (bf16 copies of the
           weights made once per generate call, as training's samples are made)
ours-auto  the same at ``precision=auto`` as sampling resolves it (`resolve_precision(..., "sample")`: the
           faster of fp32 and bf16 autocast in its cached micro-benchmark on this CPU), as ``orchestrator sample``
           and decode sweeps run
ours-bf16  the same with the weights stored in bf16 (``model.to(torch.bfloat16)``) and
           ``torch.set_flush_denormal(True)``
ours-bf16-raw  bf16 weights without flushing denormals: on this torch (2.13 CPU) some bf16 matmuls of a
           single row hit denormal slow paths and run ~20-40x slower (shown, not a goal)

bf16 halves the bytes read per token, which is what batch-1 decoding on a CPU is bound by.

Every side loads the same weights: the book's GPTModel built with seed 123, copied into gptcore's GPT with
`book_to_gptcore`. The fp32 token ids of ours must equal the reference's. Each side in its own process.

    python benchmarks/bench_generate.py [--quick] [--new-tokens N]
"""

from __future__ import annotations

import argparse
from typing import Any

from common import BOOK_CONFIG, OUR_MODEL, Report, cpu_model, emit, machine, ratio, run_side, table, time_calls

PROMPT, GOAL = "Every effort moves you", 10.0
SIDES = {
    "ref": "reference (generate_text_simple, fp32)",
    "ours": "ours (KV cache, fp32)",
    "ours-amp": "ours (KV cache, autocast bf16)",
    "ours-auto": "ours (KV cache, precision=auto)",
    "ours-bf16": "ours (KV cache, bf16 weights, flush denormals)",
    "ours-bf16-raw": "ours (KV cache, bf16 weights)",
}


def book_model() -> Any:
    """The book's GPTModel with seed-123 weights, in eval mode."""
    import torch
    from llms_from_scratch.ch04 import GPTModel

    torch.manual_seed(123)
    return GPTModel(BOOK_CONFIG).eval()


def book_to_gptcore(book: Any) -> dict[str, Any]:
    """The book GPTModel's weights under gptcore names (q, k, v fused in that order into ``attn.qkv``)."""
    import torch

    sd = book.state_dict()
    out = {
        "tok_emb.weight": sd["tok_emb.weight"],
        "pos_emb.weight": sd["pos_emb.weight"],
        "ln_f.weight": sd["final_norm.scale"],
        "ln_f.bias": sd["final_norm.shift"],
        "head.weight": sd["out_head.weight"],
    }
    renames = {"att.out_proj": "attn.proj", "ff.layers.0": "mlp.fc", "ff.layers.2": "mlp.proj"}
    for i in range(BOOK_CONFIG["n_layers"]):
        b, o = f"trf_blocks.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [sd.get(f"{b}att.W_{n}.{part}") for n in ("query", "key", "value")]
            if qkv[0] is not None:
                out[f"{o}attn.qkv.{part}"] = torch.cat(qkv)
            for theirs, ours in renames.items():
                out[f"{o}{ours}.{part}"] = sd[f"{b}{theirs}.{part}"]
        for theirs, ours in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[f"{o}{ours}.weight"], out[f"{o}{ours}.bias"] = sd[f"{b}{theirs}.scale"], sd[f"{b}{theirs}.shift"]
    return out


def measure(side: str, new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch

    from gptcore.tokenizer import encode

    prompt = encode(PROMPT)
    book = book_model()
    if side == "ref":
        from llms_from_scratch.ch04 import generate_text_simple

        idx = torch.tensor([prompt])
        ctx = BOOK_CONFIG["context_length"]

        def run(n: int) -> list[int]:
            return generate_text_simple(book, idx, n, ctx)[0, len(prompt) :].tolist()

    else:
        from gptcore.config import model_config
        from gptcore.model import GPT
        from gptcore.runtime import autocast, resolve_precision
        from gptcore.sampling import generate

        model = GPT(model_config(**OUR_MODEL))
        model.load_state_dict(book_to_gptcore(book))
        del book
        if side.startswith("ours-bf16"):
            model = model.to(torch.bfloat16)
            torch.set_flush_denormal(side == "ours-bf16")
        dtype = torch.bfloat16 if side == "ours-amp" else None
        if side == "ours-auto":
            dtype = resolve_precision("auto", torch.device("cpu"), "sample")

        def run(n: int) -> list[int]:
            with autocast(torch.device("cpu"), dtype):
                return generate(model, [prompt], n)[0]

    tokens: list[int] = []

    def timed() -> None:
        tokens[:] = run(new_tokens)

    run(4)  # warm-up: first-call allocations and kernel selection
    times = time_calls(timed, warmup=0, repeats=repeats)
    best = min(times)
    precision = "bfloat16" if side == "ours-amp" or (side == "ours-auto" and dtype is not None) else "fp32"
    return {"tok_s": new_tokens / best, "s": best, "tokens": tokens, "precision": precision}


def _agreement(a: list[int], b: list[int]) -> str:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return "identical" if a == b else f"first {same} of {len(b)} equal"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="50 new tokens instead of 200")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="timed generations per side, best counts (2)")
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    new_tokens = args.new_tokens or (50 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 2)
    if args.side:
        emit(measure(args.side, new_tokens, repeats))
        return

    print(f"machine: {machine()}")
    print(f"gpt2-small (book shapes), {new_tokens} new tokens from {PROMPT!r}, greedy, batch 1\n")
    results = {}
    for side in SIDES:  # the slow bf16 path once: it is shown, not compared against a goal
        times = 1 if side == "ours-bf16-raw" else repeats
        results[side] = run_side(__file__, ["--side", side, "--new-tokens", str(new_tokens), "--repeats", str(times)])
    ref = results["ref"]
    rows = [
        [
            SIDES[side],
            f"{r['s']:.1f}",
            f"{r['tok_s']:.1f}",
            f"{ratio(r['tok_s'], ref['tok_s']):.1f}x",
            _agreement(r["tokens"], ref["tokens"]),
        ]
        for side, r in results.items()
    ]
    print(table(["side", "seconds", "tok/s", "vs ref", "tokens vs ref"], rows))
    report(results, new_tokens, Report("generate", quick=args.quick))


def report(results: dict[str, dict[str, Any]], new_tokens: int, out: Report) -> None:
    """The figures: ours at auto (as sampling runs) and in fp32 against the reference; ours with bf16 weights (the
    fastest way, not the default); whether auto picked the faster of fp32 and bf16 autocast."""
    from gptcore.autoprecision import cpu_timings

    ref, auto, fp32, amp = (results[side] for side in ("ref", "ours-auto", "ours", "ours-amp"))
    speedup, like = ratio(auto["tok_s"], ref["tok_s"]), ratio(fp32["tok_s"], ref["tok_s"])
    print(f"\nprecision=auto vs reference: {speedup:.1f}x (goal >= {GOAL:.0f}x); fp32 vs fp32 {like:.1f}x")
    out.figure(
        f"generation, 1 x {new_tokens} greedy tokens, KV cache, precision=auto vs reference",
        f"{speedup:.1f}x ({auto['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s; auto = {auto['precision']})",
        ratio=speedup,
        like_for_like=f"{like:.1f}x fp32 vs fp32 ({fp32['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s), tokens "
        + _agreement(fp32["tokens"], ref["tokens"]),
        goal=f">= {GOAL:.0f}x",
        met=speedup >= GOAL,
    )
    if "ours-bf16" in results:
        weights = ratio(results["ours-bf16"]["tok_s"], ref["tok_s"])
        out.figure(
            "generation, bf16 weights (model.to(bfloat16)) vs reference",
            f"{weights:.1f}x ({results['ours-bf16']['tok_s']:.1f} vs {ref['tok_s']:.1f} tok/s; fp32 reference)",
            ratio=weights,
            like_for_like=f"{like:.1f}x fp32 vs fp32",
            goal=f">= {GOAL:.0f}x",
            met=weights >= GOAL,
        )
    probe = cpu_timings("sample")
    faster = "bfloat16" if amp["tok_s"] > fp32["tok_s"] else "fp32"
    print(
        f"precision=auto on {cpu_model()}: {auto['precision']} (its micro-benchmark: fp32 "
        f"{probe['fp32_s'] * 1e3:.0f} ms, bf16 {probe['bf16_s'] * 1e3:.0f} ms); generation here: fp32 "
        f"{fp32['tok_s']:.1f} tok/s, bf16 autocast {amp['tok_s']:.1f} tok/s"
    )
    out.figure(
        "generation: precision=auto picks the faster of fp32 and bf16 autocast on this CPU",
        f"auto = {auto['precision']}; fp32 {fp32['tok_s']:.1f}, bf16 autocast {amp['tok_s']:.1f} tok/s",
        ratio=ratio(amp["tok_s"], fp32["tok_s"]),
        goal="auto = the faster",
        met=auto["precision"] == faster,
    )
    out.save()


if __name__ == "__main__":
    main()
