"""Token shards on disk: the llm.c shard file, the dataset manifest, and reading a split's tokens without loading it.

A prepared dataset is a folder::

    manifest.json           written last, atomically: the commit marker (tokenizer, dtype, EOT, shards, split)
    train_g00000_000.bin    llm.c format: 256 x int32 header (magic 20240520, version 1, token count), uint16 tokens
    val_g00000_000.bin
    parts/g00000.json       one per group of input files, written when the group's shards are all in place

`gptcore.tokenizing` writes the shards and group records; this module reads them back (`open_split`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptcore.tokenizer import EOT_ID

MAGIC = 20240520  # llm.c's shard magic number
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 100_000_000  # llm.c's shard size (~200 MB)
FORMAT_VERSION = 1  # of the manifest and of how text becomes tokens: part of every dataset key
TOKENIZER_ID = "tiktoken-gpt2"
MANIFEST = "manifest.json"


class DataError(ValueError):
    """A corpus cannot be found, read or used; the message says how to fix it."""


# --------------------------------------------------------------------------- the shard file


def shard_bytes(n_tokens: int) -> int:
    """The size of a shard file holding ``n_tokens`` tokens."""
    return HEADER_BYTES + 2 * n_tokens


def shard_header(n_tokens: int) -> bytes:
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[0], header[1], header[2] = MAGIC, SHARD_VERSION, n_tokens
    return header.tobytes()


def read_shard_header(path: str | Path) -> int:
    """The token count of an llm.c shard; a `DataError` if ``path`` is not one."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype=np.int32)
    if len(header) < 3 or header[0] != MAGIC:
        raise DataError(f"{path}: not an llm.c token shard (magic {MAGIC} missing from its header)")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: llm.c shard version {header[1]}, only version {SHARD_VERSION} (uint16) is readable")
    n = int(header[2])
    if os.path.getsize(path) != shard_bytes(n):
        raise DataError(f"{path}: header says {n} tokens but the file has {os.path.getsize(path)} bytes (truncated?)")
    return n


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


class ShardWriter:
    """Writes a stream of tokens into shards ``<prefix>_000.bin``, ``_001``, ... of at most ``shard_tokens`` each.

    Each shard is written under a temporary name and renamed when complete; `close` returns their records.
    """

    def __init__(self, folder: Path, prefix: str, split: str, shard_tokens: int = SHARD_TOKENS):
        self.folder, self.prefix, self.split, self.shard_tokens = folder, prefix, split, shard_tokens
        folder.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self._file: io.BufferedWriter | None = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.uint16)
        while len(tokens):
            if self._file is None:
                self._open()
            take = min(len(tokens), self.shard_tokens - self._count)
            self._file.write(tokens[:take].tobytes())
            self._count += take
            tokens = tokens[take:]
            if self._count == self.shard_tokens:
                self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._finish()
        return self.records

    def _open(self) -> None:
        self._path = self.folder / f"{self.prefix}_{len(self.records):03d}.bin"
        self._file = open(self._path.with_suffix(".bin.tmp"), "wb")  # noqa: SIM115 (closed in _finish)
        self._file.write(shard_header(0))
        self._count = 0

    def _finish(self) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.write(shard_header(self._count))
        self._file.close()
        self._file = None
        os.replace(self._path.with_suffix(".bin.tmp"), self._path)
        record = {"file": self._path.name, "split": self.split, "tokens": self._count}
        self.records.append({**record, "sha256": file_sha256(self._path)})


# --------------------------------------------------------------------------- the manifest


@dataclass
class Manifest:
    """A prepared dataset: its shards and how they were made."""

    key: str
    shards: list[dict[str, Any]]  # file, split, tokens, sha256 (and "path" for shards used where they are)
    split: str
    val_fraction: float
    sources: int = 0
    documents: dict[str, int] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    tokenizer: str = TOKENIZER_ID
    dtype: str = "uint16"
    eot_id: int = EOT_ID
    corpus: Any = None

    def tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.shards if s["split"] == split)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "manifest") -> Manifest:
        if d.get("format_version") != FORMAT_VERSION or d.get("tokenizer") != TOKENIZER_ID:
            raise DataError(
                f"{where}: prepared with format {d.get('format_version')} / tokenizer {d.get('tokenizer')!r}, this "
                f"version reads format {FORMAT_VERSION} / {TOKENIZER_ID!r}; delete that dataset folder, prepare again"
            )
        if d.get("dtype") != "uint16" or d.get("eot_id") != EOT_ID:
            raise DataError(f"{where}: dtype {d.get('dtype')} / EOT {d.get('eot_id')}, expected uint16 / {EOT_ID}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def read_manifest(folder: str | Path) -> Manifest | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_dict(json.loads(path.read_text()), str(path))


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Atomically: a dataset without its manifest is unfinished."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(manifest.to_json())
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / MANIFEST)


def manifest_for_llmc_shards(key: str, bins: Sequence[Path]) -> Manifest:
    """A manifest for existing llm.c shards, used where they are; files named ``*val*`` are validation."""
    shards = []
    for p in bins:
        n = read_shard_header(p)
        split = "val" if "val" in p.name else "train"
        shards.append(
            {"file": p.name, "path": str(p.absolute()), "split": split, "tokens": n, "sha256": file_sha256(p)}
        )
    if not any(s["split"] == "val" for s in shards):
        raise DataError(
            f"{bins[0].parent}: no validation shard (a file with 'val' in its name, as llm.c writes them); add one"
        )
    return Manifest(key, shards, split="given", val_fraction=0.0, sources=len(bins), corpus=str(bins[0].parent))


# --------------------------------------------------------------------------- reading


class TokenStream:
    """The tokens of one split, across its shards, read with ``pread``: nothing is loaded or mapped up front.

    ``stream[a:b]`` returns a uint16 array; memory is what the caller asks for, whatever the corpus size.
    """

    def __init__(self, files: Sequence[tuple[str, int]], limit: int | None = None):
        self.files = [(path, n) for path, n in files if n > 0]
        self.offsets = np.cumsum([0] + [n for _, n in self.files])
        total = int(self.offsets[-1])
        self.length = min(total, limit) if limit else total
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(self.length)
        if step != 1:
            raise IndexError("a TokenStream is read in contiguous slices")
        out = np.empty(max(0, stop - start), dtype=np.uint16)
        pos = start
        while pos < stop:
            i = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            take = min(stop, int(self.offsets[i + 1])) - pos
            local = pos - int(self.offsets[i])
            data = os.pread(self._fd(i), 2 * take, HEADER_BYTES + 2 * local)
            out[pos - start : pos - start + take] = np.frombuffer(data, dtype=np.uint16)
            pos += take
        return out

    def _fd(self, i: int) -> int:
        if i not in self._fds:
            self._fds[i] = os.open(self.files[i][0], os.O_RDONLY)
        return self._fds[i]

    def __getstate__(self) -> dict[str, Any]:  # file descriptors do not cross processes
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)


def shard_path(folder: str | Path, shard: dict[str, Any]) -> str:
    return shard.get("path") or str(Path(folder) / shard["file"])


def open_split(folder: str | Path, manifest: Manifest, split: str, limit: int | None = None) -> TokenStream:
    files = [(shard_path(folder, s), s["tokens"]) for s in manifest.shards if s["split"] == split]
    return TokenStream(files, limit)


def verify_shards(folder: str | Path, manifest: Manifest, *, full: bool) -> None:
    """Every shard present with its size (and, if ``full``, its sha256); a `DataError` naming the first that is not."""
    for shard in manifest.shards:
        path = shard_path(folder, shard)
        expected = shard_bytes(shard["tokens"])
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != expected:
            raise DataError(
                f"shard {path}: {'missing' if size is None else f'{size} bytes'}, the manifest says {expected}; "
                "delete the dataset folder and prepare it again"
            )
        if full and file_sha256(path) != shard["sha256"]:
            raise DataError(
                f"shard {path}: sha256 differs from the manifest's (corrupt); delete the dataset folder and prepare "
                "it again"
            )
