"""Token shards: a corpus tokenized once into llm.c-format files plus a manifest, read without loading it.

A prepared dataset is a folder::

    manifest.json           written last, atomically: the commit marker (tokenizer, dtype, EOT, shards, split)
    train_g00000_000.bin    llm.c format: 256 x int32 header (magic 20240520, version 1, token count), uint16 tokens
    val_g00000_000.bin
    parts/g00000.json       one per group of input files, written when the group's shards are all in place

Input files are tokenized in groups (`tokenize_group`), each group independently, so a cluster can prepare
groups in parallel and an interrupted preparation keeps the groups it finished. Validation is whole documents
chosen by a hash of their text (``split="documents"``), or, for a single-document corpus such as a book, the
last ``val_fraction`` of its tokens (``split="tokens"``). A group holds one document's text at a time and
writes tokens as it goes: memory does not grow with the corpus.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptcore.tokenizer import EOT_ID, get_tokenizer

MAGIC = 20240520  # llm.c's shard magic number
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_TOKENS = 100_000_000  # llm.c's shard size (~200 MB)
FORMAT_VERSION = 1  # of the manifest and of how text becomes tokens: part of every dataset key
TOKENIZER_ID = "tiktoken-gpt2"
MANIFEST = "manifest.json"
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
READ_CHUNK = 8 << 20  # bytes of a text file tokenized at a time in a single-document corpus


class DataError(ValueError):
    """A corpus cannot be found, read or used; the message says how to fix it."""


# --------------------------------------------------------------------------- the shard format


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
    if os.path.getsize(path) != HEADER_BYTES + 2 * n:
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


# --------------------------------------------------------------------------- sources


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


def has_corpus_suffix(path: Path) -> bool:
    return path.name.lower().endswith(CORPUS_SUFFIXES)


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


# --------------------------------------------------------------------------- documents


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{where}: not valid UTF-8 (byte {exc.start}: {data[exc.start : exc.start + 1]!r}); "
            "convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"
        ) from None


def _open_binary(path: str) -> io.BufferedIOBase:
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None


def _read_all(path: str) -> bytes:
    try:
        with _open_binary(path) as f:
            return f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc}); check the file (a truncated .gz?)") from None


def text_chunks(path: str) -> Iterator[str]:
    """A text file as pieces of at most ~`READ_CHUNK` bytes, cut only where GPT-2's pre-tokenizer cuts anyway.

    Cuts fall right after a lone newline between two non-space characters: no pre-token spans such a boundary
    (a longer run of whitespace would, at the end of a piece), so the pieces' tokens are exactly the text's.
    """
    with _open_binary(path) as f:
        pending = b""
        offset = 0
        while True:
            try:
                block = f.read(READ_CHUNK)
            except (OSError, EOFError) as exc:
                raise DataError(f"{path}: cannot be read ({exc}); check the file (a truncated .gz?)") from None
            data = pending + block
            if not block:
                if data:
                    yield _decode(data, f"{path} (at byte {offset})")
                return
            cut = _safe_cut(data)
            if cut <= 0:
                pending = data
                continue
            yield _decode(data[:cut], f"{path} (at byte {offset})")
            offset += cut
            pending = data[cut:]


# A lone newline, or a space before a letter, between printable ASCII characters: GPT-2's pre-tokenizer ends a
# pre-token there (after the newline, before the space) whatever follows, so text may be cut there.
_SAFE_CUT = re.compile(rb"(?<=[\x21-\x7e])\n(?=[\x21-\x7e])|(?<=[\x21-\x7e])(?= [A-Za-z])")


def _safe_cut(data: bytes) -> int:
    """The last index at which ``data`` can be cut without changing its tokens, or -1."""
    tail = max(0, len(data) - (1 << 16))
    cuts = [m.end() if m.group() else m.start() for m in _SAFE_CUT.finditer(data, tail)]
    cuts = [c for c in cuts if 0 < c < len(data) - 1]
    if cuts:
        return cuts[-1]
    return _safe_cut(data[:tail]) if tail else -1


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """The documents of a file: a text file is one document, a JSONL line or a Parquet row is one each."""
    name = path.lower()
    if name.endswith(TEXT_SUFFIXES) or not name.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        yield _decode(_read_all(path), path)
    elif name.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, text_field)
    else:
        yield from _parquet_documents(path, text_field)


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
    with _open_binary(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(_decode(line, f"{path} line {number}"))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path} line {number}: not JSON ({exc.msg}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict) or text_field not in record:
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{path} line {number}: no {text_field!r} field (it has {fields}); "
                    f"set data.text_field to the field holding the text"
                )
            yield str(record[text_field])


def check_parquet_field(path: str, text_field: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if text_field not in names:
        raise DataError(
            f"{path}: no {text_field!r} column (it has {names}); set data.text_field to the column holding the text"
        )


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    check_parquet_field(path, text_field)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield str(text)


def is_validation(document: str, val_fraction: float) -> bool:
    """Whether a document belongs to validation: a hash of its text, uniform in [0, 1), below ``val_fraction``."""
    digest = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# --------------------------------------------------------------------------- tokenizing a group of files


@dataclass
class GroupResult:
    """What one group of input files became (``parts/g<index>.json``)."""

    group: int
    shards: list[dict[str, Any]]
    documents: dict[str, int] = field(default_factory=dict)  # split -> documents
    files: int = 0
    bytes: int = 0

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def tokenize_group(
    group: int,
    paths: Sequence[str],
    out: Path,
    *,
    split: str,
    val_fraction: float,
    text_field: str = "text",
    shard_tokens: int = SHARD_TOKENS,
) -> GroupResult:
    """Tokenize ``paths`` into shards in folder ``out``; ``split`` is ``"documents"`` or ``"tokens"``."""
    out.mkdir(parents=True, exist_ok=True)
    if split == "tokens":
        return _tokenize_token_split(group, paths, out, val_fraction, shard_tokens)
    enc = get_tokenizer()
    writers = {s: ShardWriter(out, f"{s}_g{group:05d}", s, shard_tokens) for s in ("train", "val")}
    buffers: dict[str, list[int]] = {"train": [], "val": []}  # ids gathered in lists: one array per ~1 M tokens
    documents = {"train": 0, "val": 0}
    result = GroupResult(group, [])
    for path in paths:
        empty = True
        for text in iter_documents(path, text_field):
            if not text.strip():
                continue
            empty = False
            which = "val" if is_validation(text, val_fraction) else "train"
            buffer = buffers[which]
            buffer.append(EOT_ID)
            buffer.extend(enc.encode_ordinary(text))
            documents[which] += 1
            if len(buffer) >= 1 << 20:
                writers[which].write(np.array(buffer, dtype=np.uint16))
                buffer.clear()
        if empty:
            raise DataError(f"{path}: no text (empty, only whitespace, or no records); remove it from the corpus")
        result.files += 1
        result.bytes += os.path.getsize(path)
    for which, buffer in buffers.items():
        writers[which].write(np.array(buffer, dtype=np.uint16))
    result.shards = writers["train"].close() + writers["val"].close()
    result.documents = documents
    return result


def _tokenize_token_split(
    group: int, paths: Sequence[str], out: Path, val_fraction: float, shard_tokens: int
) -> GroupResult:
    """Documents joined by EOT into one stream, then its last ``val_fraction`` of tokens is validation."""
    enc = get_tokenizer()
    with tempfile.TemporaryFile(dir=out) as stream:
        n, documents = 0, 0
        for path in paths:
            if documents:
                stream.write(np.array([EOT_ID], dtype=np.uint16).tobytes())
                n += 1
            empty = True
            chunks = text_chunks(path) if path.lower().endswith(TEXT_SUFFIXES) else iter_documents(path)
            for text in chunks:
                ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
                stream.write(ids.tobytes())
                n += len(ids)
                empty = empty and not text.strip()
            if empty:
                raise DataError(
                    f"{path}: the file is empty (or only whitespace); remove it from the corpus or add text"
                )
            documents += 1
        cut = round(n * (1.0 - val_fraction))
        stream.flush()
        tokens = np.memmap(stream, dtype=np.uint16, mode="r", shape=(n,)) if n else np.zeros(0, np.uint16)
        shards = []
        for split, part in (("train", tokens[:cut]), ("val", tokens[cut:])):
            writer = ShardWriter(out, f"{split}_g{group:05d}", split, shard_tokens)
            for start in range(0, len(part), 1 << 24):
                writer.write(np.asarray(part[start : start + (1 << 24)]))
            shards += writer.close()
        del tokens
    size = sum(os.path.getsize(p) for p in paths)
    return GroupResult(group, shards, {"train": documents, "val": 0}, files=len(paths), bytes=size)


# --------------------------------------------------------------------------- manifest


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


def dataset_key(
    sources: Sequence[Source], *, split: str, val_fraction: float, text_field: str, shard_tokens: int = SHARD_TOKENS
) -> str:
    """Identifies a prepared dataset: its sources' paths, sizes and versions, the split, tokenizer and format."""
    digest = hashlib.sha256(f"{TOKENIZER_ID}|{FORMAT_VERSION}|{split}|{val_fraction!r}|{text_field}".encode())
    digest.update(str(shard_tokens).encode())
    for s in sources:
        digest.update(f"\n{s.path}|{s.size}|{s.version}".encode())
    return digest.hexdigest()[:24]


def llmc_shard_folder(spec: str) -> list[Path] | None:
    """The ``*.bin`` files of a folder of llm.c shards (e.g. the published FineWeb ones), else None."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    bins = sorted(p for p in path.glob("*.bin") if p.is_file())
    if not bins or any(has_corpus_suffix(p) for p in path.rglob("*") if p.is_file()):
        return None
    return bins


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


def write_manifest(folder: Path, manifest: Manifest) -> None:
    """Atomically: a dataset without its manifest is unfinished."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(manifest.to_json())
    os.chmod(tmp, 0o644)
    os.replace(tmp, folder / MANIFEST)


def merge_groups(key: str, results: Sequence[GroupResult], *, split: str, val_fraction: float, corpus: Any) -> Manifest:
    shards = [s for r in sorted(results, key=lambda r: r.group) for s in r.shards]
    documents = {k: sum(r.documents.get(k, 0) for r in results) for k in ("train", "val")}
    manifest = Manifest(key, shards, split, val_fraction, sum(r.files for r in results), documents, corpus=corpus)
    for which in ("train", "val") if split == "documents" else ():  # a token split too short: see the window check
        if manifest.tokens(which) == 0:
            hint = (
                "the corpus has no text"
                if which == "train"
                else f"no document was drawn for validation at data.val_fraction={val_fraction}; raise it, or add "
                "documents"
            )
            raise DataError(f"the {which} split of the corpus is empty: {hint}")
    return manifest


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
        expected = HEADER_BYTES + 2 * shard["tokens"]
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
