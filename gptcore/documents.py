"""The documents of a corpus file: a text file (plain or gzip) is one, a JSONL line or a Parquet row is one each.

`CORPUS_SUFFIXES` are the formats read. Reading holds one document in memory at a time (one `text_chunks` piece
of a large text file); unreadable input is a `DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

from gptcore.shards import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
READ_CHUNK = 8 << 20  # bytes of a text file tokenized at a time in a single-document corpus


def has_corpus_suffix(path: Path) -> bool:
    return path.name.lower().endswith(CORPUS_SUFFIXES)


def is_text_file(path: str) -> bool:
    """Whether ``path`` is a text file: one document, however large."""
    return path.lower().endswith(TEXT_SUFFIXES)


def is_parquet_file(path: str) -> bool:
    return path.lower().endswith(PARQUET_SUFFIXES)


def iter_documents(path: str, text_field: str = "text") -> Iterator[str]:
    """The documents of a file: a text file is one document, a JSONL line or a Parquet row is one each."""
    if is_text_file(path) or not path.lower().endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
        yield _decode(_read_all(path), path)
    elif path.lower().endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, text_field)
    else:
        yield from _parquet_documents(path, text_field)


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


def check_parquet_field(path: str, text_field: str) -> None:
    """A `DataError` unless ``path`` is a Parquet file with a ``text_field`` column (its schema alone is read)."""
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if text_field not in names:
        raise DataError(
            f"{path}: no {text_field!r} column (it has {names}); set data.text_field to the column holding the text"
        )


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


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    check_parquet_field(path, text_field)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield str(text)


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
