"""Prepare corpora once, on the Ray cluster: groups of input files tokenized in parallel into token shards.

``<storage>/datasets/<key>/`` holds what `gptcore.corpus.prepare_dataset` writes on one machine (shards,
``parts/g*.json`` per finished group, ``manifest.json`` last), on a local/NFS folder or an object store. Each
group is one Ray task (1 CPU, one document in memory at a time): plain tasks rather than Ray Data, whose actor
pools can take every CPU of a 2-CPU node and starve their own readers, and whose readers split text by line.
On an object store a task writes its shards to a local scratch folder and uploads them before its record.
Workers then fetch a dataset once per node (`local_dataset`) and read it from local disk.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

import pyarrow.fs as pafs

from gptcore.cache import cache_dir
from gptcore.corpus import CorpusPlan, finish_dataset, locked, prepare_dataset, prepare_group
from gptcore.shards import MANIFEST, DataError, Manifest, read_manifest, shard_bytes, shard_path, verify_shards
from gptcore.tokenizing import GroupResult, group_record_name
from orchestrator.storage import check_writable, filesystem, is_uri, join, local_path, read_json, write_json

DATASETS = "datasets"
LOCAL_BYTES = 64 << 20  # a corpus this small is tokenized in the driver, before Ray starts (no task to schedule)


def dataset_location(storage: str, key: str) -> str:
    return join(storage, DATASETS, key)


def read_dataset_manifest(location: str) -> Manifest | None:
    raw = read_json(join(location, MANIFEST))
    return None if raw is None else Manifest.from_dict(raw, join(location, MANIFEST))


def needs_ray(plan: CorpusPlan) -> bool:
    """Whether preparing ``plan`` takes Ray tasks: a corpus larger than `LOCAL_BYTES` of text."""
    return plan.split != "given" and plan.total_bytes > LOCAL_BYTES


def stage_locally(plan: CorpusPlan) -> Path | None:
    """A small corpus prepared in this process under the cache (bad input found before Ray starts), else None."""
    if plan.split == "given" or needs_ray(plan):
        return None
    return prepare_dataset(plan, cache_dir() / DATASETS / "staged")


def publish(folder: Path, location: str) -> None:
    """Copy a prepared dataset folder to ``location``: shards first, the manifest last."""
    manifest = read_manifest(folder)
    fs, base = filesystem(location)
    fs.create_dir(base, recursive=True)
    for name in [s["file"] for s in manifest.shards] + [MANIFEST]:
        tmp = f"{base}/.{name}.tmp" if not is_uri(location) else f"{base}/{name}"
        with open(folder / name, "rb") as src, fs.open_output_stream(tmp) as out:
            shutil.copyfileobj(src, out, 8 << 20)
        if tmp != f"{base}/{name}":
            fs.move(tmp, f"{base}/{name}")


# --------------------------------------------------------------------------- the Ray task


def group_task(plan: CorpusPlan, group: int, location: str) -> dict:
    """The Ray task of one group: tokenize group ``group`` into ``location``; returns its record (as a dict)."""
    if not is_uri(location):
        return asdict(prepare_group(plan, group, local_path(location)))
    done = read_json(join(location, group_record_name(group)))
    if done is not None and _uploaded(location, done["shards"]):
        return done
    with tempfile.TemporaryDirectory(prefix="gptcore-prepare-") as scratch:
        result = prepare_group(plan, group, Path(scratch))
        fs, base = filesystem(location)
        for shard in result.shards:  # each object appears whole (an S3 PUT is atomic); the record comes last
            fs.create_dir(base, recursive=True)
            with (
                open(Path(scratch) / shard["file"], "rb") as src,
                fs.open_output_stream(f"{base}/{shard['file']}") as out,
            ):
                shutil.copyfileobj(src, out, 8 << 20)
        write_json(join(location, group_record_name(group)), asdict(result))
    return asdict(result)


def _uploaded(location: str, shards: list[dict]) -> bool:
    fs, base = filesystem(location)
    infos = fs.get_file_info([f"{base}/{s['file']}" for s in shards])
    return all(
        i.type == pafs.FileType.File and i.size == shard_bytes(s["tokens"]) for i, s in zip(infos, shards, strict=True)
    )


# --------------------------------------------------------------------------- the driver


def prepare(plan: CorpusPlan, storage: str, *, out: TextIO | None = None) -> str:
    """Prepare ``plan`` under ``<storage>/datasets/<key>``; returns the location.

    A dataset whose manifest exists is left as it is. A small corpus is tokenized here (`stage_locally`) and
    copied; a larger one by one Ray task per group of files, keeping the groups an interrupted run finished.
    Bad input (a `DataError` in any task) cancels the rest and removes what this dataset had written.
    """
    import ray

    location = dataset_location(storage, plan.key)
    with contextlib.suppress(OSError):  # unreadable storage: check_writable says why
        if read_dataset_manifest(location) is not None:
            return location
    check_writable(location)
    staged = stage_locally(plan)
    if staged is not None:
        publish(staged, location)
        return location
    if plan.split == "given":  # llm.c shards used where they are: only a manifest to write
        _write_manifest(plan, location, [])
        return location
    task = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=False)(group_task)
    pending = {task.remote(plan, g, location): g for g in range(len(plan.groups))}
    progress = Progress(plan, out or sys.stdout)
    results: list[GroupResult] = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=10.0)
            for ref in ready:
                pending.pop(ref)
                results.append(GroupResult(**ray.get(ref)))
                progress.update(results)
    except ray.exceptions.RayTaskError as exc:
        _stop(list(pending))
        if isinstance(exc.cause, DataError):
            remove_dataset(location)  # bad input: nothing half-written is left
            raise DataError(str(exc.cause)) from None
        raise
    _write_manifest(plan, location, results)
    progress.done(results)
    return location


def _stop(refs: list) -> None:
    """Cancel the tasks of ``refs`` and wait until none runs any more: a task still running after the clean-up would
    write its shards into the folder just removed."""
    import ray

    for ref in refs:
        ray.cancel(ref, force=True)
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=60.0)


def _write_manifest(plan: CorpusPlan, location: str, results: list[GroupResult]) -> None:
    if not is_uri(location):
        finish_dataset(plan, local_path(location), results)
        return
    with tempfile.TemporaryDirectory() as scratch:
        manifest = finish_dataset(plan, Path(scratch), results)
    write_json(join(location, MANIFEST), json.loads(manifest.to_json()))


def remove_dataset(location: str) -> None:
    fs, base = filesystem(location)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(base)


class Progress:
    """One line per finished group: files and tokens done, rate and time left."""

    def __init__(self, plan: CorpusPlan, out: TextIO):
        self.plan, self.out, self.started = plan, out, time.perf_counter()
        self.total_files, self.total_bytes = len(plan.sources), plan.total_bytes
        print(
            f"prepare {plan.key}: {self.total_files} file(s), {self.total_bytes / 1e6:.1f} MB in {len(plan.groups)} "
            "task(s)",
            file=out,
            flush=True,
        )

    def update(self, results: list[GroupResult]) -> None:
        files, size, tokens = (
            sum(r.files for r in results),
            sum(r.bytes for r in results),
            sum(r.tokens for r in results),
        )
        elapsed = time.perf_counter() - self.started
        eta = elapsed * (self.total_bytes - size) / max(size, 1)
        print(
            f"prepare {self.plan.key}: {files}/{self.total_files} files, {tokens / 1e6:.1f} M tokens, "
            f"{tokens / max(elapsed, 1e-9) / 1e6:.2f} M tokens/s, ETA {eta:.0f} s",
            file=self.out,
            flush=True,
        )

    def done(self, results: list[GroupResult]) -> None:
        tokens = sum(r.tokens for r in results)
        print(
            f"prepare {self.plan.key}: done, {tokens / 1e6:.1f} M tokens in {time.perf_counter() - self.started:.1f} s",
            file=self.out,
            flush=True,
        )


# --------------------------------------------------------------------------- in a worker


def local_dataset(location: str) -> Path:
    """A local folder with the dataset at ``location``, fetched and checked once per node.

    An object-store dataset is copied to ``<cache>/datasets/<key>`` under a lock (concurrent trials on a node share
    one copy), each shard checked against the manifest's sha256 before the manifest is written. A local/NFS dataset
    is read where it is, its shards' sha256 checked once per node (a marker records their sizes and times).
    """
    key = location.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
    if not is_uri(location):
        folder = local_path(location)
        _check_once(folder, cache_dir() / DATASETS / "verified" / f"{key}.json")
        return folder
    folder = cache_dir() / DATASETS / key
    if read_manifest(folder) is not None:
        return folder
    with locked(cache_dir() / DATASETS / f"{key}.lock"):
        if read_manifest(folder) is None:
            _download(location, folder)
    return folder


def _download(location: str, folder: Path) -> None:
    manifest = read_dataset_manifest(location)
    if manifest is None:
        raise DataError(f"{location}: no {MANIFEST}, so not a prepared dataset; prepare the corpus again")
    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    fs, base = filesystem(location)
    for shard in manifest.shards:
        target = folder / shard["file"]
        if target.is_file() and target.stat().st_size == shard_bytes(shard["tokens"]):
            continue  # fetched by an earlier, interrupted copy
        with fs.open_input_stream(f"{base}/{shard['file']}") as src, open(target.with_suffix(".part"), "wb") as out:
            shutil.copyfileobj(src, out, 8 << 20)
        target.with_suffix(".part").replace(target)
    try:
        verify_shards(folder, manifest, full=True)
    except DataError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise DataError(f"{location}: {exc}") from None
    (folder / MANIFEST).write_text(manifest.to_json())
    size = sum(shard_bytes(s["tokens"]) for s in manifest.shards)
    print(
        f"fetched dataset {manifest.key} from {location}: {len(manifest.shards)} shard(s), {size / 1e6:.1f} MB in "
        f"{time.perf_counter() - started:.1f} s",
        flush=True,
    )


def _check_once(folder: Path, marker: Path) -> None:
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder}: no {MANIFEST}, so not a prepared dataset; prepare the corpus again")
    verify_shards(folder, manifest, full=False)
    stamp = {shard_path(folder, s): list(_stat(shard_path(folder, s))) for s in manifest.shards}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return
    with locked(marker.with_suffix(".lock")):
        verify_shards(folder, manifest, full=True)
        marker.write_text(json.dumps(stamp))


def _stat(path: str) -> tuple[int, int]:
    st = Path(path).stat()
    return st.st_size, st.st_mtime_ns
