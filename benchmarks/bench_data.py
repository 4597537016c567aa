"""Dataset build time and memory: tinyshakespeare, context 256, stride 1, 64 and 256.

ref          llms_from_scratch.ch02.GPTDatasetV1: tokenizes, then copies every window into two tensors
             (input, target): 2 x 256 x 8 bytes per window, i.e. O(tokens x context / stride)
ours         gptcore: `tokenize_corpus` (no cache) + one int64 token tensor + `SlidingWindowDataset`,
             whose windows are views (``unfold``) of that tensor: 8 bytes per token at any stride
ours-cached  `build_datasets` as training calls it (token cache warm, train/validation split)

Both tokenize the whole text from scratch with the same GPT-2 BPE. Each (side, stride) runs in its own
process; memory is the peak resident-set growth over the build (VmHWM, reset before it), the tensor
bytes the dataset holds, and tracemalloc's peak (Python objects and NumPy buffers, not torch's).

    python benchmarks/bench_data.py [--quick] [--strides 1 64 256]
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from pathlib import Path
from typing import Any

from common import emit, machine, ratio, rss_bytes, run_side, size, summary, table

CONTEXT = 256
SIDES = {"ref": "reference GPTDatasetV1", "ours": "ours SlidingWindowDataset", "ours-cached": "ours build_datasets"}


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _storage_bytes(tensors: Any) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure(side: str, corpus: str, stride: int) -> dict[str, Any]:
    import torch

    from gptcore.config import JobConfig
    from gptcore.data import SlidingWindowDataset, build_datasets, resolve_corpus, tokenize_corpus
    from gptcore.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    text = resolve_corpus(corpus)[0].read_text(encoding="utf-8")
    tokenizer.encode("warm up")
    if side == "ours-cached":
        job = JobConfig.from_dict({"model.context_length": CONTEXT, "data.corpus": corpus, "data.stride": stride})
        build_datasets(job)  # fills the token cache
    gc.collect()
    rss0, _ = rss_bytes()
    reset_peak_rss()
    tracemalloc.start()
    start = time.perf_counter()
    if side == "ref":
        from llms_from_scratch.ch02 import GPTDatasetV1

        ds = GPTDatasetV1(text, tokenizer, CONTEXT, stride)
        held = _storage_bytes([*ds.input_ids, *ds.target_ids])
        windows, first = len(ds), ds[len(ds) // 2]
    elif side == "ours":
        tokens = torch.from_numpy(tokenize_corpus(corpus, use_cache=False).tokens.astype("int64"))
        ds = SlidingWindowDataset(tokens, CONTEXT, stride)
        held = _storage_bytes([ds.tokens])
        windows, first = len(ds), ds[len(ds) // 2]
    else:
        train, val = build_datasets(job)
        held = _storage_bytes([train.tokens, val.tokens])
        windows, first = len(train) + len(val), train[len(train) // 2]
    seconds = time.perf_counter() - start
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss1, peak = rss_bytes()
    return {
        "seconds": seconds,
        "windows": windows,
        "tokens": len(tokenizer.encode(text, allowed_special={"<|endoftext|>"})),
        "held": held,
        "rss_delta": rss1 - rss0,
        "rss_peak_delta": peak - rss0,
        "py_peak": py_peak,
        "middle": [first[0][:4].tolist(), first[1][:4].tolist()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the-verdict instead of tinyshakespeare")
    parser.add_argument("--strides", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    corpus = args.corpus or ("the-verdict" if args.quick else "tinyshakespeare")
    if args.side:
        emit(measure(args.side, corpus, args.strides[0]))
        return

    print(f"machine: {machine()}")
    print(f"{corpus}, context {CONTEXT}\n")
    rows, worst_ratio = [], 0.0
    for stride in args.strides:
        results = {
            side: run_side(__file__, ["--side", side, "--corpus", corpus, "--strides", str(stride)]) for side in SIDES
        }
        ref = results["ref"]
        for side, r in results.items():
            rows.append(
                [
                    stride,
                    SIDES[side],
                    f"{r['windows']:,}",
                    f"{r['seconds']:.3f}",
                    size(r["held"]),
                    f"{r['held'] / r['tokens']:.1f}",
                    size(r["rss_peak_delta"]),
                    size(r["py_peak"]),
                ]
            )
            if side == "ours" and (r["windows"], r["middle"]) != (ref["windows"], ref["middle"]):
                raise SystemExit(f"stride {stride}: {side} windows differ from the reference's")
        ours = results["ours"]
        worst_ratio = max(worst_ratio, ours["held"] / ours["tokens"])
        summary(
            f"data stride {stride}",
            f"{ratio(ref['seconds'], ours['seconds']):.1f}x faster, {ratio(ref['held'], ours['held']):.0f}x less "
            f"held ({size(ours['held'])} vs {size(ref['held'])})",
            "O(tokens) at any stride",
            ours["held"] <= 8 * ours["tokens"] + 64,
        )
    headers = ["stride", "side", "windows", "build s", "held", "B/token", "peak RSS +", "tracemalloc peak"]
    print(table(headers, rows))
    print(f"\nours holds at most {worst_ratio:.1f} bytes per token at every stride (one int64 token tensor)")


if __name__ == "__main__":
    main()
