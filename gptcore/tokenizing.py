"""Tokenizing a group of input files into train and validation shards: one preparation task, and its record.

Input files are tokenized in groups (`tokenize_group`), each group independently, so a cluster can prepare
groups in parallel and an interrupted preparation keeps the groups it finished (``parts/g<index>.json``, written
once the group's shards are all in place). Validation is whole documents chosen by a hash of their text
(``split="documents"``), or, for a single-document corpus such as a book, the last ``val_fraction`` of its tokens
(``split="tokens"``). A group holds one document's text at a time and writes tokens as it goes: memory does not
grow with the corpus. `merge_groups` makes the groups' records into the dataset's manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gptcore.documents import is_text_file, iter_documents, text_chunks
from gptcore.files import atomic_write_bytes
from gptcore.shards import DataError, Manifest, ShardWriter, verify_shards
from gptcore.tokenizer import EOT_ID, get_tokenizer

PARTS = "parts"


def is_validation(document: str, val_fraction: float) -> bool:
    """Whether a document belongs to validation: a hash of its text, uniform in [0, 1), below ``val_fraction``."""
    digest = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


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


def _writer(out: Path, split: str, group: int) -> ShardWriter:
    return ShardWriter(out, f"{split}_g{group:05d}", split)


def tokenize_group(
    group: int,
    paths: Sequence[str],
    out: Path,
    *,
    split: str,
    val_fraction: float,
    text_field: str = "text",
) -> GroupResult:
    """Tokenize ``paths`` into shards in folder ``out``; ``split`` is ``"documents"`` or ``"tokens"``."""
    out.mkdir(parents=True, exist_ok=True)
    if split == "tokens":
        return _tokenize_token_split(group, paths, out, val_fraction)
    enc = get_tokenizer()
    writers = {s: _writer(out, s, group) for s in ("train", "val")}
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


def _tokenize_token_split(group: int, paths: Sequence[str], out: Path, val_fraction: float) -> GroupResult:
    """Documents joined by EOT into one stream, then its last ``val_fraction`` of tokens is validation."""
    enc = get_tokenizer()
    with tempfile.TemporaryFile(dir=out) as stream:
        n, documents = 0, 0
        for path in paths:
            if documents:
                stream.write(np.array([EOT_ID], dtype=np.uint16).tobytes())
                n += 1
            empty = True
            chunks = text_chunks(path) if is_text_file(path) else iter_documents(path)
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
            writer = _writer(out, split, group)
            for start in range(0, len(part), 1 << 24):
                writer.write(np.asarray(part[start : start + (1 << 24)]))
            shards += writer.close()
        del tokens
    size = sum(os.path.getsize(p) for p in paths)
    return GroupResult(group, shards, {"train": documents, "val": 0}, files=len(paths), bytes=size)


# --------------------------------------------------------------------------- records of finished groups


def group_record_name(group: int) -> str:
    """Where a dataset folder keeps the record of group ``group``, relative to the folder."""
    return f"{PARTS}/g{group:05d}.json"


def group_record(folder: Path, group: int) -> GroupResult | None:
    """The finished group ``group`` of a dataset folder, if its shards are all there."""
    path = folder / group_record_name(group)
    if not path.is_file():
        return None
    result = GroupResult(**json.loads(path.read_text()))
    manifest = Manifest(key="", shards=result.shards, split="", val_fraction=0.0)
    try:
        verify_shards(folder, manifest, full=False)
    except DataError:
        return None
    return result


def write_group_record(folder: Path, result: GroupResult) -> None:
    atomic_write_bytes(folder / group_record_name(result.group), json.dumps(asdict(result)).encode())


def merge_groups(key: str, results: Sequence[GroupResult], *, split: str, val_fraction: float, corpus: Any) -> Manifest:
    """The manifest of a dataset made of ``results``; a `DataError` if a split of a document split is empty."""
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
