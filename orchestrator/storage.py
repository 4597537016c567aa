"""Where sweeps and datasets live: a local (or NFS) folder or an object-store URI (``s3://...``).

Every "is this a local path or a URI?" decision is `is_uri`; everything else here builds on it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """Storage that cannot be written or read; the message names it and says what to check."""


def check_writable(location: str) -> None:
    """Create ``location`` (a folder or prefix) and write and remove a probe there, or raise `StorageError`."""
    fs, path = filesystem(location)
    probe = f"{path.rstrip('/')}/.write-probe-{os.getpid()}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"ok")
        fs.delete_file(probe)
    except OSError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise StorageError(
            f"storage {location} cannot be written ({reason}); check that the folder's parents are folders and "
            "writable, or that the bucket exists and the credentials may write to it, or pass another --storage"
        ) from None


def is_uri(location: str) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``...); False for a local path or a ``file://`` URI."""
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> Path:
    """A local path or ``file://`` URI as an absolute path."""
    return Path(location.removeprefix("file://")).expanduser().absolute()


def absolute_storage(storage: str | None, workdir: str) -> str:
    """The storage root: ``<workdir>/ray_results`` by default, a URI as it is, a local path made absolute."""
    if not storage:
        return str(Path(workdir, "ray_results").absolute())
    return storage if is_uri(storage) else str(local_path(storage))


def join_uri(base: str, *parts: str) -> str:
    head, sep, query = base.partition("?")  # keep s3://...?endpoint_override=... query strings at the end
    return "/".join([head.rstrip("/"), *parts]) + (sep + query if sep else "")


def join(location: str, *parts: str) -> str:
    """``location / parts`` for a local path or a URI."""
    return join_uri(location, *parts) if is_uri(location) else str(Path(location, *parts))


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``location`` and the path on it."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(local_path(location))
    return pafs.FileSystem.from_uri(location)


def storage_uri(storage: str, fs_path: str) -> str:
    """A path Ray reports on the storage filesystem (scheme and query stripped) as a URI of ``storage``."""
    if not is_uri(storage):
        return fs_path
    _, sep, query = storage.partition("?")
    return f"{storage.split('://', 1)[0]}://{fs_path}{sep}{query}"


def write_json(location: str, payload: dict[str, Any]) -> None:
    """Write JSON to a local path or object-store URI, atomically where the filesystem allows."""
    fs, path = filesystem(location)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(payload, indent=2, default=str).encode())
    fs.move(tmp, path)


def read_json(location: str) -> dict[str, Any] | None:
    """The JSON at ``location``, or None if there is no file there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode())


def local_copy(location: str, scratch: Path) -> Path:
    """A local folder holding ``location``: itself if local, else a download into ``scratch``."""
    if not is_uri(location):
        return local_path(location)
    fs, path = pafs.FileSystem.from_uri(location)
    local = scratch / Path(path.rstrip("/")).name
    local.mkdir(parents=True)  # copy_files does not create the top folder on a local destination
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local
