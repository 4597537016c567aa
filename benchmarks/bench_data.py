"""Data path at scale (issue 18): generated corpora of 0.2, 1 and 2 GB prepared into token shards, then trained on.

Corpus: deterministic English-like text, one document per JSONL record in files of 64 MB: a vocabulary of 4,000
words (~190 English function words, then made-up words of one to three syllables) drawn with Zipf frequencies,
sentences of 4-25 words with commas and end marks, paragraphs of 3-8 sentences; documents of 15 to 30,000 words
(log-normal, ~3 KB on average). File ``i`` depends only on ``i``: the files are generated once under ``--work``
and hard-linked into one folder per size (``round(GB / 64 MB)`` files).

Each side runs in a fresh process; its memory is the summed RSS of the process and all its descendants, sampled
every 0.2 s in a thread (the driver plus every Ray process it starts), and the summed PSS (shared pages once):

  stream   the baseline: one process reads each record, tiktoken ``encode_ordinary`` (gptcore's GPT-2 encoding),
           and appends EOT + tokens as uint16 to one file (nanoGPT's prepare, streaming, no token list kept)
  prepare  ``orchestrator.prepare.prepare`` as ``python -m orchestrator prepare`` runs it: a local Ray started by
           ``connect_ray`` without its dashboard (as `cmd_prepare` starts it; the tasks import no torch), one task
           (1 CPU) per ~128 MB group of files; Ray's fixed cost is the tree's RSS right
           after ``ray.init`` (before any task), and the largest single Ray worker is reported too
  cluster  ``prepare --address`` of the 1 GB corpus (the largest in --quick) on a ``ray start --head --num-cpus 1``
           cluster, then on one with a second ``ray start --address ... --num-cpus 1`` node (same machine, storage
           a local folder): tokens/s with 1 and 2 nodes
  train    ``gptcore.train.train(job, data_dir=folder)`` on each prepared folder (micro model, context 256,
           batch 8, 20 steps, eval_iters 2, 1 thread), 3 times per corpus: the process's RSS once the data, model
           and optimizer are built, and its peak RSS (VmHWM)

Around each side the parent also measures the CPU other people's processes took meanwhile (the machine's busy
time less this script's process tree, in cores): on a shared machine, a rate taken while others ran is low.

    flock /tmp/ray.lock python benchmarks/bench_data.py [--quick] [--sizes 0.2 1 2] [--work /tmp/bench18] [--keep]

``--quick`` takes 0.2 and 0.3 GB (2 and 3 Ray tasks). Corpora stay under ``--work`` for the next run with
``--keep``; everything the script made there is removed otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import ROOT, Report, emit, machine, median, rss_bytes, run_side, table

FILE_BYTES = 64_000_000  # text bytes per JSONL file
SAMPLE_S = 0.2  # memory sampling period (RSS)
PSS_EVERY = 10  # PSS every 10th sample: reading smaps_rollup of ~20 Ray processes takes ~40 ms of CPU
SETTLE_S = 3.0  # after ray.init, before Ray's fixed cost is read (raylet starts its first idle workers)
TRAIN_REPEATS = 3  # a step's peak varies by a logits buffer (0.38 GiB) from run to run: heap fragmentation
TRAIN = {
    "model": {"preset": "micro", "context_length": 256, "dropout": 0.0},
    "train": {"batch_size": 8, "max_steps": 20, "eval_every": 10, "eval_iters": 2, "sample_every": 0, "num_threads": 1},
}

# --------------------------------------------------------------------------- the corpus

FUNCTION_WORDS = (  # the most frequent ranks
    "the of and to a in is that it was for on as with he be at by his this had not are but from or have an they "
    "which one you were her all she there would their we him been has when who will more no if out so said what up "
    "its about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way well "
    "down should because each just those people how too little state good very make world still own see men work "
    "long get here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three"
)
ONSETS = "b c d f g h j k l m n p r s t v w b c d f g h l m n p r s t bl br ch cr dr fl fr gr pl pr sh sp st th tr"
VOWELS = "a e i o u a e i o u a e i o ea ee oo ou"
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "rd", "st", "ck", "ss"]
MARKS = [".", ".", ".", ".", "?", "!", ";"]


def vocabulary(n: int = 4000) -> list[str]:
    """``n`` distinct words, English function words first (the most frequent ranks), then made-up ones."""
    rng = np.random.default_rng(18)
    onsets, vowels = ONSETS.split(), VOWELS.split()
    words = list(dict.fromkeys(FUNCTION_WORDS.split()))
    seen = set(words)
    while len(words) < n:
        syllables = int(rng.choice([1, 1, 2, 2, 2, 3]))
        word = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(syllables))
        word += CODAS[rng.integers(len(CODAS))]
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class Words:
    """The vocabulary as lookup tables: plain, with a comma, capitalised, and with each end mark."""

    def __init__(self) -> None:
        words = vocabulary()
        self.n = len(words)
        forms = [words, [w + "," for w in words], [w.capitalize() for w in words]]
        forms += [[w + mark for w in words] for mark in MARKS]
        self.table = np.array([w for form in forms for w in form], dtype=object)
        weights = 1.0 / (np.arange(self.n) + 3.7)  # Zipf, flattened at the top
        self.cdf = np.cumsum(weights) / weights.sum()

    def document(self, rng: np.random.Generator) -> str:
        n = int(np.clip(rng.lognormal(5.8, 1.0), 15, 30_000))
        ids = np.minimum(np.searchsorted(self.cdf, rng.random(n)), self.n - 1)
        form = (rng.random(n) < 0.07).astype(np.int64)  # a comma after 7 % of words
        ends = np.cumsum(rng.integers(4, 26, size=n // 4 + 1))
        ends = np.append(ends[ends < n], n)
        form[np.concatenate([[0], ends[:-1]])] = 2  # capitalised sentence starts
        form[ends - 1] = 3 + rng.integers(0, len(MARKS), size=len(ends))
        pieces = self.table[ids + self.n * form].tolist()
        breaks = ends[np.cumsum(rng.integers(3, 9, size=len(ends))).clip(max=len(ends)) - 1]
        bounds = [0, *sorted(set(breaks.tolist()) | {n})]
        return "\n\n".join(" ".join(pieces[a:b]) for a, b in itertools.pairwise(bounds))


def write_file(path: Path) -> None:
    """JSONL file ``part-<i>.jsonl`` of ~`FILE_BYTES`, from a generator seeded by ``i`` only."""
    words = Words()
    rng = np.random.default_rng([18, int(path.stem.split("-")[1])])
    tmp = path.with_suffix(".tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as out:
        while written < FILE_BYTES:
            written += out.write(json.dumps({"text": words.document(rng)}) + "\n")
    tmp.replace(path)


def corpus(work: Path, gb: float) -> Path:
    """The folder of the ``gb`` corpus: files generated once under ``work/files``, hard-linked here."""
    count = max(1, round(gb * 1e9 / FILE_BYTES))
    files = [work / "files" / f"part-{i:05d}.jsonl" for i in range(count)]
    missing = [f for f in files if not f.is_file()]
    if missing:
        files[0].parent.mkdir(parents=True, exist_ok=True)
        print(f"generating {len(missing)} file(s) of {FILE_BYTES / 1e6:.0f} MB under {files[0].parent}", flush=True)
        with multiprocessing.Pool(min(len(missing), os.cpu_count() or 1)) as pool:
            pool.map(write_file, missing)
    folder = work / f"corpus-{count}x64MB"
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        if not (folder / f.name).exists():
            os.link(f, folder / f.name)
    return folder


def text_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.jsonl"))


# --------------------------------------------------------------------------- memory of a process tree


def _psutil() -> Any:
    try:
        import psutil
    except ModuleNotFoundError:  # the copy Ray ships (ray/thirdparty_files), on sys.path once ray is imported
        import psutil
        import ray  # noqa: F401
    return psutil


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # titled like workers, but Ray's own processes


def is_ray_worker(cmdline: list[str]) -> bool:
    """A task or actor worker: titled ``ray::IDLE``, ``ray::<task>``..., or still starting (default_worker.py)."""
    if not cmdline or cmdline[0].startswith(RAY_AGENTS):
        return False
    return cmdline[0].startswith("ray::") or any("default_worker.py" in c for c in cmdline)


class TreeMemory:
    """Summed RSS of this process and all its descendants, sampled every `SAMPLE_S` in a thread: the peak sum,
    each process's own peak (to find the largest Ray worker), and the peak summed PSS (pages shared between
    processes, such as those of forked dashboard modules, counted once; sampled every `PSS_EVERY` samples)."""

    def __init__(self) -> None:
        self.psutil = _psutil()
        self.root = self.psutil.Process()
        self.peak = self.peak_pss = self.samples = 0
        self.kinds: dict[int, str] = {}
        self.peaks: dict[int, tuple[int, str]] = {}  # pid -> (peak RSS, "driver" / "worker" / "ray")
        self.last: dict[str, int] = {}  # kind -> summed RSS in the latest sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total, pss, last = 0, 0, {"driver": 0, "ray": 0, "worker": 0}
        with_pss = self.samples % PSS_EVERY == 0
        self.samples += 1
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                info = proc.memory_full_info() if with_pss else proc.memory_info()
                rss, kind = info.rss, self.kind(proc)
            except self.psutil.Error:
                continue
            total += rss
            pss += info.pss if with_pss else 0
            last[kind] += rss
            if rss > self.peaks.get(proc.pid, (0, ""))[0]:
                self.peaks[proc.pid] = (rss, kind)
        self.peak, self.peak_pss, self.last = max(self.peak, total), max(self.peak_pss, pss), last
        return total

    def kind(self, proc: Any) -> str:
        """``proc`` is the driver, a worker or ray (Ray's own processes); a worker stays one as its title changes."""
        if self.kinds.get(proc.pid) not in ("driver", "worker"):
            is_driver = proc.pid == self.root.pid
            self.kinds[proc.pid] = "driver" if is_driver else "worker" if is_ray_worker(proc.cmdline()) else "ray"
        return self.kinds[proc.pid]

    def largest(self, kind: str) -> int:
        return max((rss for rss, k in self.peaks.values() if k == kind), default=0)

    def count(self, kind: str) -> int:
        return sum(k == kind for _, k in self.peaks.values())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self.sample()

    def __enter__(self) -> TreeMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def busy_cpu_seconds(psutil: Any) -> float:
    """CPU seconds this machine has been busy (steal excluded: another VM's)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


class Watch:
    """While a side runs, from the parent: the CPU other people's processes took (machine busy time less this
    script's process tree, in cores: the machine is shared), and on a cluster the nodes that ran prepare tasks."""

    def __init__(self, cluster: Any = None) -> None:
        self.psutil = _psutil()
        self.root, self.cluster = self.psutil.Process(), cluster
        self.first: dict[int, float] = {}  # pid -> CPU seconds when first seen (0 for processes started later)
        self.last: dict[int, float] = {}
        self.nodes: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, initial: bool = False) -> None:
        for proc in [self.root, *self.root.children(recursive=True)]:
            with contextlib.suppress(self.psutil.Error):
                t = proc.cpu_times()
                self.first.setdefault(proc.pid, t.user + t.system if initial else 0.0)
                self.last[proc.pid] = t.user + t.system
        for proc in self.cluster.processes("ray::group_task") if self.cluster else []:
            if node := self.cluster.node_of(proc.pid):
                self.nodes.add(node)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def __enter__(self) -> Watch:
        self.sample(initial=True)
        self.busy, self.start = busy_cpu_seconds(self.psutil), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        own = sum(self.last.values()) - sum(self.first.values())
        wall = time.perf_counter() - self.start
        self.others = max(0.0, busy_cpu_seconds(self.psutil) - self.busy - own) / wall


def watched(args: list[str], env: dict | None = None, cluster: Any = None) -> dict[str, Any]:
    """`run_side` with others' CPU use (cores) and the nodes that ran tasks added to its result."""
    with Watch(cluster) as watch:
        result = run_side(__file__, args, timeout=3600, env=env)
    return {**result, "others": watch.others, "nodes": sorted(watch.nodes)}


# --------------------------------------------------------------------------- sides


def side_stream(folder: Path, out: Path) -> dict[str, Any]:
    """The baseline: every record of every file, encode_ordinary, EOT + tokens appended as uint16."""
    from gptcore.tokenizer import EOT_ID, get_tokenizer

    enc = get_tokenizer()
    eot = np.array([EOT_ID], dtype=np.uint16).tobytes()
    tokens = documents = 0
    with TreeMemory() as memory:
        start = time.perf_counter()
        with open(out, "wb") as sink:
            for path in sorted(folder.glob("*.jsonl")):
                with open(path, "rb") as src:
                    for line in src:
                        ids = enc.encode_ordinary(json.loads(line)["text"])
                        sink.write(eot)
                        sink.write(np.array(ids, dtype=np.uint16).tobytes())
                        tokens += 1 + len(ids)
                        documents += 1
        seconds = time.perf_counter() - start
    out.unlink()
    return {"tokens": tokens, "documents": documents, "seconds": seconds, "peak": memory.peak, "pss": memory.peak_pss}


def side_prepare(folder: Path, storage: Path, address: str | None) -> dict[str, Any]:
    """``orchestrator prepare`` (cmd_prepare's steps): plan, connect_ray (no dashboard, as cmd_prepare), prepare,
    shutdown."""
    import ray

    from gptcore.config import DataConfig
    from gptcore.corpus import plan_corpus
    from orchestrator.cluster import connect_ray
    from orchestrator.prepare import needs_ray, prepare, read_dataset_manifest

    with TreeMemory() as memory:
        before = memory.sample()
        start = time.perf_counter()
        plan = plan_corpus(DataConfig(corpus=str(folder)))
        assert needs_ray(plan), f"{folder}: {plan.total_bytes / 1e6:.0f} MB, too small for Ray tasks"
        connect_ray(address, dashboard=False)
        started = time.perf_counter() - start
        time.sleep(SETTLE_S)
        fixed = memory.sample()
        parts = dict(memory.last)
        start = time.perf_counter()
        location = prepare(plan, str(storage), out=sys.stderr)
        seconds = time.perf_counter() - start
        ray.shutdown()
    manifest = read_dataset_manifest(location)
    return {
        "tokens": manifest.tokens("train") + manifest.tokens("val"),
        "documents": sum(manifest.documents.values()),
        "groups": len(plan.groups),
        "start_s": started,
        "seconds": seconds,
        "peak": memory.peak,
        "pss": memory.peak_pss,
        "before": before,
        "fixed": fixed,
        "fixed_parts": parts,
        "driver": memory.largest("driver"),
        "worker": memory.largest("worker"),
        "workers": memory.count("worker"),
        "folder": location,
    }


def side_train(folder: Path, corpus_folder: Path) -> dict[str, Any]:
    """A few training steps on a prepared folder: RSS once the data, model and optimizer are built, and at peak."""
    from gptcore.config import JobConfig
    from gptcore.hooks import Hooks
    from gptcore.train import train

    class AtStart(Hooks):
        def on_train_start(self, ctx: Any, state: Any) -> None:
            self.rss, self.windows = rss_bytes()[0], ctx.train_windows

    job = JobConfig.from_dict({**TRAIN, "data": {"corpus": str(corpus_folder)}})
    at_start = AtStart()
    imports, _ = rss_bytes()
    start = time.perf_counter()
    result = train(job, at_start, data_dir=folder)
    seconds = time.perf_counter() - start
    _, peak = rss_bytes()
    return {
        "steps": result.state.step,
        "seconds": seconds,
        "windows": at_start.windows,
        "imports_rss": imports,
        "start_rss": at_start.rss,
        "peak": peak,
    }


# --------------------------------------------------------------------------- the parent


def cluster(work: Path, nodes: int) -> contextlib.AbstractContextManager:
    """tests.servers' cluster: ``ray start --head --num-cpus 1`` and ``nodes - 1`` joined nodes of 1 CPU."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.servers import ray_cluster

    logs = work / f"cluster-{nodes}"
    logs.mkdir(parents=True, exist_ok=True)
    return ray_cluster(logs, workers=nodes - 1, head_cpus=1)


def prepare_side(folder: Path, storage: Path, cluster: Any = None) -> dict[str, Any]:
    shutil.rmtree(storage, ignore_errors=True)
    args = ["--side", "prepare", "--corpus", str(folder), "--storage", str(storage)]
    if cluster is None:
        return watched(args)
    return watched([*args, "--address", cluster.address], cluster.env, cluster)


def measure_size(work: Path, gb: float) -> dict[str, Any]:
    folder = corpus(work, gb)
    print(f"{folder.name}: {text_bytes(folder) / 1e6:,.0f} MB of text", flush=True)
    args = ["--side", "stream", "--corpus", str(folder), "--out", str(work / "stream.bin")]
    stream = watched(args)
    prep = prepare_side(folder, work / f"storage-{folder.name}")
    if (prep["tokens"], prep["documents"]) != (stream["tokens"], stream["documents"]):
        raise SystemExit(f"{folder.name}: prepare made {prep['tokens']:,} tokens, the baseline {stream['tokens']:,}")
    args = ["--side", "train", "--corpus", str(folder), "--storage", prep["folder"]]
    trained = [watched(args) for _ in range(TRAIN_REPEATS)]
    sides = {"stream": stream, "prepare": prep, "train": trained}
    return {"gb": gb, "bytes": text_bytes(folder), "folder": folder, **sides}


def measure_cluster(work: Path, folder: Path) -> dict[int, dict[str, Any]]:
    results = {}
    for nodes in (1, 2):
        with cluster(work, nodes) as c:
            results[nodes] = prepare_side(folder, work / f"storage-cluster-{nodes}", c)
        shutil.rmtree(work / f"storage-cluster-{nodes}", ignore_errors=True)
    return results


def rate(r: dict[str, Any], with_start: bool = False) -> float:
    return r["tokens"] / (r["seconds"] + (r.get("start_s", 0.0) if with_start else 0.0))


RATE_HEADERS = ["tokens", "s", "ray.init s", "tokens/s", "others' CPU (cores)"]


def rate_cells(r: dict[str, Any]) -> list[str]:
    """Tokens, seconds, ray.init seconds (if any), tokens/s of one side, and the CPU others took meanwhile."""
    start = f"{r['start_s']:.1f}" if "start_s" in r else ""
    return [f"{r['tokens'] / 1e6:.1f} M", f"{r['seconds']:.1f}", start, f"{rate(r) / 1e6:.2f} M", f"{r['others']:.2f}"]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def goal(out: Report, bench: str, figure: str, target: str, met: bool, ratio: float | None = None) -> None:
    """A pass/fail line, and the figure in ``out``."""
    print(f"{'PASS' if met else 'FAIL'}  {bench}: {figure} (goal: {target})", flush=True)
    out.figure(bench, figure, ratio=ratio, goal=target, met=met)


def report_prepare(runs: list[dict[str, Any]], out: Report) -> None:
    speed, memory = [], []
    for run in runs:
        s, p = run["stream"], run["prepare"]
        name = f"{run['bytes'] / 1e9:.2f} GB"
        speed += [
            [name, "stream (1 process)", *rate_cells(s)],
            [name, f"prepare ({p['groups']} tasks)", *rate_cells(p)],
        ]
        memory.append([name, "stream (1 process)", gib(s["peak"]), gib(s["pss"]), "", "", ""])
        tree = [gib(p["peak"]), gib(p["pss"]), gib(p["fixed"]), gib(p["peak"] - p["fixed"]), gib(p["worker"])]
        memory.append([name, "prepare", *tree])
    print(table(["corpus", "side", *RATE_HEADERS], speed) + "\n")
    headers = ["corpus", "side", "peak RSS GiB", "peak PSS GiB", "Ray fixed GiB", "peak - fixed GiB"]
    print(table([*headers, "largest worker GiB"], memory))
    for run in runs:
        p = run["prepare"]
        parts = {k: gib(v) for k, v in p["fixed_parts"].items()}
        print(
            f"Ray's fixed cost, {run['bytes'] / 1e9:.2f} GB: driver {parts['driver']} GiB ({gib(p['before'])} before "
            f"ray.init), Ray's own processes {parts['ray']} GiB, idle workers {parts['worker']} GiB; "
            f"{p['workers']} worker processes in all"
        )
    small, large = runs[0], runs[-1]
    growth = [r["prepare"]["peak"] - r["prepare"]["fixed"] for r in (small, large)]
    span = f"{small['bytes'] / 1e9:.2f} -> {large['bytes'] / 1e9:.2f} GB"
    goal(
        out,
        "data prepare memory flat",
        f"peak beyond Ray's fixed cost {gib(growth[0])} -> {gib(growth[1])} GiB ({span})",
        "largest <= 1.2x smallest + 64 MiB",
        growth[1] <= 1.2 * growth[0] + (64 << 20),
    )
    base = large["stream"]["peak"]
    goal(
        out,
        "data prepare memory vs baseline",
        f"peak beyond Ray's fixed cost {gib(growth[1])} GiB, largest worker {gib(large['prepare']['worker'])} GiB, "
        f"baseline {gib(base)} GiB",
        "beyond fixed <= 2x baseline",
        growth[1] <= 2 * base,
    )
    fast, slow = rate(large["prepare"], with_start=True), rate(large["stream"])
    goal(
        out,
        "data prepare tokens/s",
        f"{fast / 1e6:.2f} M (ray.init included) vs baseline {slow / 1e6:.2f} M tokens/s ({fast / slow:.2f}x)",
        ">= baseline on 2 cores",
        fast >= slow,
        fast / slow,
    )


def report_cluster(results: dict[int, dict[str, Any]], name: str, out: Report) -> None:
    rows = [[n, n, *rate_cells(r), ", ".join(r["nodes"])] for n, r in results.items()]
    print(table(["nodes", "CPUs", *RATE_HEADERS, "tasks ran on"], rows))
    speedup = rate(results[2]) / rate(results[1])
    figure = f"{speedup:.2f}x the tokens/s of 1 node"
    goal(out, f"data prepare 2 nodes ({name})", figure, ">= 1.5x", speedup >= 1.5, speedup)


def report_train(runs: list[dict[str, Any]], out: Report) -> None:
    rows = []
    for run in runs:
        t = run["train"]
        peaks = sorted(r["peak"] for r in t)
        memory = [gib(t[0]["imports_rss"]), gib(max(r["start_rss"] for r in t)), ", ".join(map(gib, peaks))]
        seconds = f"{median([r['seconds'] for r in t]):.1f}"
        others = f"{max(r['others'] for r in t):.2f}"
        rows.append([f"{run['bytes'] / 1e9:.2f} GB", f"{t[0]['windows']:,}", t[0]["steps"], seconds, others, *memory])
    headers = ["corpus", "train windows", "steps", "s (median)", "others' CPU (max)", "RSS after imports GiB"]
    print(table([*headers, "RSS at train start GiB", f"peak RSS (VmHWM) GiB, {TRAIN_REPEATS} runs"], rows))
    start = [max(r["start_rss"] for r in run["train"]) for run in (runs[0], runs[-1])]
    goal(
        out,
        "data train start memory flat",
        f"RSS with the data, model and optimizer built {gib(start[0])} -> {gib(start[1])} GiB",
        "largest <= smallest + 32 MiB",
        start[1] <= start[0] + (32 << 20),
    )
    small, large = (min(r["peak"] for r in run["train"]) for run in (runs[0], runs[-1]))
    goal(
        out,
        "data train memory flat",
        f"peak RSS (least of {TRAIN_REPEATS} runs) {gib(small)} -> {gib(large)} GiB",
        "largest <= 1.2x smallest + 32 MiB",
        large <= 1.2 * small + (32 << 20),
    )


def run_side_from_args(args: argparse.Namespace) -> None:
    folder = Path(args.corpus)
    if args.side == "stream":
        emit(side_stream(folder, Path(args.out)))
    elif args.side == "prepare":
        emit(side_prepare(folder, Path(args.storage), args.address))
    else:
        emit(side_train(Path(args.storage), folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.2 and 0.3 GB: a smoke run")
    parser.add_argument("--sizes", type=float, nargs="+", default=None, help="corpus sizes in GB (default 0.2 1 2)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench18"), help="corpora and prepared datasets")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora under --work")
    parser.add_argument("--side", choices=["stream", "prepare", "train"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        run_side_from_args(args)
        return
    sizes = sorted(args.sizes or ([0.2, 0.3] if args.quick else [0.2, 1.0, 2.0]))
    work = args.work.absolute()
    print(f"machine: {machine()}\n", flush=True)
    out = Report("data", quick=args.quick or args.sizes is not None)
    try:
        runs = [measure_size(work, gb) for gb in sizes]
        middle = min(runs, key=lambda r: abs(r["gb"] - 1.0))
        nodes = measure_cluster(work, middle["folder"])
        print(f"\n## prepare vs the streaming baseline (JSONL files of {FILE_BYTES / 1e6:.0f} MB)\n")
        report_prepare(runs, out)
        print(f"\n## prepare --address on a local cluster of 1-CPU nodes, {middle['bytes'] / 1e9:.2f} GB corpus\n")
        report_cluster(nodes, f"{middle['bytes'] / 1e9:.2f} GB", out)
        print("\n## training on the prepared folder (micro model, context 256, batch 8, 20 steps)\n")
        report_train(runs, out)
        print("\nload average at the end: {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))
        out.save()
    finally:
        for path in work.glob("storage-*") if work.is_dir() else []:
            shutil.rmtree(path, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
