"""Corpora, the token cache, train/val split and the sliding-window dataset.

A corpus is a named corpus (``the-verdict``, ``tinyshakespeare``), a text file, a folder of
text files or a list of files. Documents are joined by ``<|endoftext|>``. Token ids are cached
on disk (``.npy``) under a key that hashes the texts, so a sweep tokenizes each corpus once.
Windows are strided views into one token tensor: memory is O(tokens) whatever the stride.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from gptcore.config import JobConfig
from gptcore.tokenizer import EOT_ID, get_tokenizer

MIRROR_ENV = "GPTCORE_DATA_DIR"  # a folder holding copies of the named corpora (offline use, CI)
CACHE_ENV = "GPTCORE_CACHE_DIR"  # downloads and token cache; default ~/.cache/gptcore
TOKENIZER_ID = "tiktoken-gpt2"


class DataError(ValueError):
    """A corpus cannot be found, read or used; the message says how to fix it."""


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


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gptcore"
    return Path(os.environ.get(CACHE_ENV) or default).expanduser().absolute()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def resolve_corpus(corpus: str | Sequence[str]) -> list[Path]:
    """The files of a corpus spec: a name, a file, a folder (its *.txt files) or a list of files."""
    if not isinstance(corpus, str):
        return [p for item in corpus for p in resolve_corpus(item)]
    if corpus in CORPORA:
        return [fetch_named_corpus(corpus)]
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path.absolute()]
    if path.is_dir():
        files = sorted(p.absolute() for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"corpus folder {path} contains no .txt files; add some or point to a file")
        return files
    raise DataError(
        f"corpus {corpus!r} not found: it is neither a named corpus ({', '.join(CORPORA)}) "
        "nor an existing file or folder; check the path (relative paths are resolved from "
        f"{Path.cwd()})"
    )


def read_documents(paths: Sequence[Path]) -> list[str]:
    """Each file's text, decoded strictly as UTF-8."""
    docs = []
    for path in paths:
        data = Path(path).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}: not valid UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
                "convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"
            ) from None
        if not text.strip():
            raise DataError(f"{path}: the file is empty (or only whitespace); remove it from the corpus or add text")
        docs.append(text)
    return docs


# --------------------------------------------------------------------------- tokens


@dataclass(frozen=True)
class TokenizedCorpus:
    """All token ids of a corpus plus where each document starts."""

    tokens: np.ndarray  # uint16, documents separated by EOT_ID
    doc_starts: np.ndarray  # int64, index of each document's first token
    key: str  # content hash: identifies the corpus and tokenizer


def tokenize_corpus(corpus: str | Sequence[str], *, use_cache: bool = True) -> TokenizedCorpus:
    """Tokenize a corpus spec, reading and writing the on-disk token cache."""
    paths = resolve_corpus(corpus)
    texts = read_documents(paths)
    hasher = hashlib.sha256(TOKENIZER_ID.encode())
    for text in texts:
        hasher.update(hashlib.sha256(text.encode()).digest())
    key = hasher.hexdigest()[:32]
    tokens_path = cache_dir() / "tokens" / f"{key}.npy"
    starts_path = cache_dir() / "tokens" / f"{key}.docs.npy"
    if use_cache and tokens_path.is_file() and starts_path.is_file():
        try:
            return TokenizedCorpus(np.load(tokens_path), np.load(starts_path), key)
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    encoded = get_tokenizer().encode_ordinary_batch(texts, num_threads=min(8, len(texts)))
    pieces, starts, offset = [], [], 0
    for i, ids in enumerate(encoded):
        if i:
            pieces.append([EOT_ID])
            offset += 1
        starts.append(offset)
        pieces.append(ids)
        offset += len(ids)
    tokens = np.fromiter((t for piece in pieces for t in piece), dtype=np.uint16, count=offset)
    doc_starts = np.asarray(starts, dtype=np.int64)
    if use_cache:
        for path, array in ((tokens_path, tokens), (starts_path, doc_starts)):
            atomic_write_bytes(path, _npy_bytes(array))
    return TokenizedCorpus(tokens, doc_starts, key)


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def split_tokens(
    corpus: TokenizedCorpus, val_fraction: float = 0.1, by: str = "tokens"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and validation token tensors (int64).

    ``by="tokens"`` cuts at ``(1 - val_fraction)`` of the tokens; ``by="documents"`` keeps
    whole documents on each side, the last ones going to validation.
    """
    tokens = corpus.tokens
    n = len(tokens)
    if by == "tokens":
        cut = round(n * (1.0 - val_fraction))
    elif by == "documents":
        if len(corpus.doc_starts) < 2:
            raise DataError(
                "data.split='documents' needs at least 2 documents, the corpus has 1; "
                "use data.split='tokens' or a folder/list of files"
            )
        target = n * (1.0 - val_fraction)
        starts = corpus.doc_starts[1:]  # a cut at a document start keeps documents whole
        cut = int(starts[np.argmin(np.abs(starts - target))])  # the separating EOT stays in train
    else:
        raise DataError(f"data.split: unknown split {by!r}; use 'tokens' or 'documents'")
    as_long = torch.from_numpy(tokens.astype(np.int64))
    return as_long[:cut], as_long[cut:]


# --------------------------------------------------------------------------- windows


class SlidingWindowDataset(Dataset):
    """(x, y) pairs with ``x = t[i:i+L]`` and ``y = t[i+1:i+1+L]`` for ``i = 0, stride, 2*stride, ...``.

    Every item is a view into ``tokens``; nothing is copied per window.
    """

    def __init__(self, tokens: torch.Tensor, context_length: int, stride: int, *, name: str = "dataset"):
        if stride <= 0:
            raise DataError(f"data.stride must be a positive integer, got {stride}")
        if tokens.ndim != 1:
            raise DataError(f"{name}: expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
        if len(tokens) < context_length + 1:
            raise DataError(
                f"{name} split has {len(tokens)} tokens, fewer than context_length + 1 = {context_length + 1}; "
                "use a smaller model.context_length, a different data.val_fraction, or a larger corpus"
            )
        self.tokens = tokens
        self.context_length = context_length
        self.stride = stride
        # (n_windows, L + 1) strided view of the same storage
        self.windows = tokens.unfold(0, context_length + 1, stride)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.windows[index]
        return window[:-1], window[1:]

    @property
    def tokens_per_epoch(self) -> int:
        return len(self) * self.context_length


def build_datasets(config: JobConfig) -> tuple[SlidingWindowDataset, SlidingWindowDataset]:
    """Train and validation datasets for a job, tokenizing (or reading the cache) once."""
    corpus = tokenize_corpus(config.data.corpus)
    train, val = split_tokens(corpus, config.data.val_fraction, config.data.split)
    L = config.model.context_length
    return (
        SlidingWindowDataset(train, L, config.stride, name="train"),
        SlidingWindowDataset(val, L, config.stride, name="validation"),
    )


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch); sharded across ``world_size`` ranks.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch. The loader has its own generator, so
    iterating it never draws from torch's global one: how often a run evaluates, or where it resumed,
    does not change the dropout masks of its training steps.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last and world_size > 1
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
