"""Corpora and their preparation into token shards, without torch (Ray's preparation tasks import only this).

A corpus is a named corpus (``the-verdict``, ``tinyshakespeare``), a file, a folder (recursive), a glob, a list
of those, or a folder of llm.c shards; its files are read as documents by `gptcore.documents`. `plan_corpus`
resolves it to files and fingerprints them; `prepare_dataset` tokenizes it once, group by group
(`gptcore.tokenizing`), into shards under its key (`gptcore.shards`); `gptcore.data` reads windows from them.
The orchestrator prepares the same groups in parallel on a Ray cluster.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.cache import cache_dir
from gptcore.config import DataConfig, JobConfig
from gptcore.documents import CORPUS_SUFFIXES, check_parquet_field, has_corpus_suffix, is_parquet_file, is_text_file
from gptcore.files import atomic_write_bytes
from gptcore.shards import (
    FORMAT_VERSION,
    SHARD_TOKENS,
    TOKENIZER_ID,
    DataError,
    Manifest,
    manifest_for_llmc_shards,
    read_manifest,
    write_manifest,
)
from gptcore.tokenizing import GroupResult, group_record, merge_groups, tokenize_group, write_group_record

MIRROR_ENV = "GPTCORE_DATA_DIR"  # a folder holding copies of the named corpora (offline use, CI)
GROUP_BYTES = 128 << 20  # input bytes per preparation task


@dataclass(frozen=True)
class NamedCorpus:
    filename: str
    url: str
    sha256: str


CORPORA: dict[str, NamedCorpus] = {
    "the-verdict": NamedCorpus(
        "the-verdict.txt",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f",
    ),
    "tinyshakespeare": NamedCorpus(
        "tinyshakespeare.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- locating corpora


def fetch_named_corpus(name: str, *, timeout: float = 30.0) -> Path:
    """Path of a named corpus: the mirror folder, else the download cache, else download it."""
    spec = CORPORA[name]
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        candidate = Path(mirror).expanduser() / spec.filename
        if candidate.is_file():
            digest = _sha256(candidate.read_bytes())
            if digest != spec.sha256:
                raise DataError(
                    f"{candidate}: sha256 {digest} is not the expected {spec.sha256} for corpus {name!r}; "
                    f"replace the file with a fresh copy of {spec.url}"
                )
            return candidate.absolute()
    cached = cache_dir() / "corpora" / spec.filename
    if cached.is_file() and _sha256(cached.read_bytes()) == spec.sha256:
        return cached
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as response:
            data = response.read()
    except OSError as exc:
        where = f"{MIRROR_ENV}={mirror} (no {spec.filename} there)" if mirror else f"{MIRROR_ENV} is not set"
        raise DataError(
            f"corpus {name!r} is not available offline and downloading {spec.url} failed ({exc}); "
            f"put {spec.filename} in {cached.parent} or in a folder named by {MIRROR_ENV} ({where})"
        ) from None
    digest = _sha256(data)
    if digest != spec.sha256:
        raise DataError(f"downloaded {spec.url} has sha256 {digest}, expected {spec.sha256}; try again later")
    atomic_write_bytes(cached, data)
    return cached


@dataclass(frozen=True)
class Source:
    """One input file and what identifies its content (size and modification time, or a known hash)."""

    path: str
    size: int
    version: str

    @classmethod
    def of(cls, path: Path, version: str | None = None) -> Source:
        stat = path.stat()
        return cls(str(path.absolute()), stat.st_size, version or f"mtime:{stat.st_mtime_ns}")


def find_sources(spec: str, named: Sequence[str] = ()) -> list[Source]:
    """The files of one corpus path: a file, a folder (recursive, corpus formats only) or a glob."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [Source.of(path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and has_corpus_suffix(p))
        if not files:
            raise DataError(
                f"corpus folder {path} holds no {', '.join(CORPUS_SUFFIXES)} files; add some or point to a file"
            )
        return [Source.of(p) for p in files]
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"corpus glob {spec!r} matches no file; check the pattern (relative to {Path.cwd()})")
        return [Source.of(p) for p in files]
    raise DataError(
        f"corpus {spec!r} not found: it is neither a named corpus ({', '.join(named)}) nor an existing file, folder "
        "or glob; check the "
        f"path (relative paths are resolved from {Path.cwd()})"
    )


def llmc_shard_folder(spec: str) -> list[Path] | None:
    """The ``*.bin`` files of a folder of llm.c shards (e.g. the published FineWeb ones), else None."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    bins = sorted(p for p in path.glob("*.bin") if p.is_file())
    if not bins or any(has_corpus_suffix(p) for p in path.rglob("*") if p.is_file()):
        return None
    return bins


# --------------------------------------------------------------------------- planning a dataset


@dataclass(frozen=True)
class CorpusPlan:
    """A corpus resolved to files and fingerprinted: what `prepare_dataset` will make, and under which key."""

    key: str
    corpus: Any  # the spec, as the user wrote it
    sources: tuple[Source, ...]
    split: str  # "documents", "tokens" or "given" (a folder of llm.c shards)
    val_fraction: float
    text_field: str
    groups: tuple[tuple[str, ...], ...]  # input files per preparation task
    shard_files: tuple[str, ...] = ()  # llm.c shards used where they are

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.sources)


def dataset_key(sources: Sequence[Source], *, split: str, val_fraction: float, text_field: str) -> str:
    """Identifies a prepared dataset: its sources' paths, sizes and versions, the split, tokenizer, format and shard
    size."""
    digest = hashlib.sha256(f"{TOKENIZER_ID}|{FORMAT_VERSION}|{split}|{val_fraction!r}|{text_field}".encode())
    digest.update(str(SHARD_TOKENS).encode())
    for s in sources:
        digest.update(f"\n{s.path}|{s.size}|{s.version}".encode())
    return digest.hexdigest()[:24]


def _sources(spec: str) -> list[Source]:
    if spec in CORPORA:
        return [Source.of(fetch_named_corpus(spec), f"sha256:{CORPORA[spec].sha256}")]
    return find_sources(spec, named=list(CORPORA))


def plan_corpus(data: DataConfig) -> CorpusPlan:
    """Resolve ``data.corpus`` to its files, check them cheaply, and fix the dataset key and the groups."""
    specs = [data.corpus] if isinstance(data.corpus, str) else list(data.corpus)
    if len(specs) == 1 and (bins := llmc_shard_folder(specs[0])):
        sources = tuple(Source.of(p) for p in bins)
        key = dataset_key(sources, split="given", val_fraction=0.0, text_field="")
        return CorpusPlan(key, data.corpus, sources, "given", 0.0, "", (), tuple(str(p) for p in bins))
    sources = tuple(s for spec in specs for s in _sources(spec))
    for source in sources:
        if not os.access(source.path, os.R_OK):
            raise DataError(f"{source.path}: cannot be read (permission denied); check its permissions")
        if is_parquet_file(source.path):
            check_parquet_field(source.path, data.text_field)
    single_document = len(sources) == 1 and is_text_file(sources[0].path)
    split = data.split if data.split != "auto" else ("tokens" if single_document else "documents")
    key = dataset_key(sources, split=split, val_fraction=data.val_fraction, text_field=data.text_field)
    return CorpusPlan(key, data.corpus, sources, split, data.val_fraction, data.text_field, _groups(sources, split))


def _groups(sources: Sequence[Source], split: str) -> tuple[tuple[str, ...], ...]:
    """Consecutive files of about `GROUP_BYTES` each; one group for a token-fraction split (a single stream)."""
    if split == "tokens":
        return (tuple(s.path for s in sources),)
    groups: list[list[str]] = [[]]
    size = 0
    for source in sources:
        if groups[-1] and size + source.size > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(source.path)
        size += source.size
    return tuple(tuple(g) for g in groups)


# --------------------------------------------------------------------------- preparing a dataset


def prepare_group(plan: CorpusPlan, group: int, folder: Path) -> GroupResult:
    """Tokenize one group into ``folder`` (shards, then its record); a finished group is left as it is."""
    done = group_record(folder, group)
    if done is not None:
        return done
    result = tokenize_group(
        group, plan.groups[group], folder, split=plan.split, val_fraction=plan.val_fraction, text_field=plan.text_field
    )
    write_group_record(folder, result)
    return result


def finish_dataset(plan: CorpusPlan, folder: Path, results: Sequence[GroupResult]) -> Manifest:
    """Merge the groups' records into the manifest, written last (the commit marker)."""
    if plan.split == "given":
        manifest = manifest_for_llmc_shards(plan.key, [Path(p) for p in plan.shard_files])
    else:
        manifest = merge_groups(plan.key, results, split=plan.split, val_fraction=plan.val_fraction, corpus=plan.corpus)
    write_manifest(folder, manifest)
    return manifest


def prepare_dataset(plan: CorpusPlan, root: str | Path) -> Path:
    """Prepare ``plan`` under ``root/<key>`` in this process (the orchestrator does the groups on Ray instead).

    Idempotent: a folder with a manifest is returned as it is; finished groups of an interrupted run are kept.
    """
    folder = Path(root) / plan.key
    if read_manifest(folder) is not None:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder / ".lock"):
        if read_manifest(folder) is None:
            try:
                results = [prepare_group(plan, g, folder) for g in range(len(plan.groups))]
                finish_dataset(plan, folder, results)
            except DataError:
                shutil.rmtree(folder, ignore_errors=True)  # bad input: nothing half-written is left
                raise
    return folder


def dataset_folder(config: JobConfig, data_root: str | Path | None = None) -> Path:
    """The prepared dataset of ``config``'s corpus, prepared here (under the cache) if it is not yet."""
    plan = plan_corpus(config.data)
    root = Path(data_root) if data_root else cache_dir() / "datasets"
    if plan.split == "given" or read_manifest(root / plan.key) is None:
        return prepare_dataset(plan, root)
    return root / plan.key


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on a file, across processes of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- checking a dataset against a job


def window_count(n_tokens: int, context_length: int, stride: int) -> int:
    """The windows of ``context_length`` tokens (and their next-token targets) that start every ``stride`` tokens."""
    return (n_tokens - context_length - 1) // stride + 1


def check_split_length(name: str, n_tokens: int, context_length: int) -> None:
    """A `DataError` unless a split of ``n_tokens`` tokens holds one window of ``context_length`` (and its target)."""
    if n_tokens < context_length + 1:
        raise DataError(
            f"{name} split has {n_tokens} tokens, fewer than context_length + 1 = {context_length + 1}; "
            "use a smaller model.context_length, a different data.val_fraction, or a larger corpus"
        )


def check_windows(config: JobConfig, manifest: Manifest) -> None:
    """Both splits of a prepared dataset hold at least one window of ``config`` (from the manifest alone)."""
    val = manifest.tokens("val")
    check_split_length("train", manifest.tokens("train"), config.model.context_length)
    check_split_length("validation", min(val, config.data.val_tokens or val), config.model.context_length)
