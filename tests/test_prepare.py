"""Preparing corpora on Ray (orchestrator.prepare): one task per group of files, to a folder or to S3 (moto).

One local Ray for the module; groups are made small (`GROUP_BYTES`) and every corpus goes through Ray tasks
(`LOCAL_BYTES` = 0), so a few KB of text exercise what a cluster does with gigabytes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import gptcore.corpus
import orchestrator.prepare
from gptcore.config import DataConfig
from gptcore.corpus import plan_corpus, prepare_dataset
from gptcore.shards import DataError, read_manifest
from orchestrator.prepare import dataset_location, group_task, local_dataset, prepare, read_dataset_manifest
from tests.servers import S3_ENV, moto_s3

pytestmark = pytest.mark.ray

BUCKET = "gpt-data"
DOCS = [f"Document {i}. " + "Every effort moves you, said the painter. " * (3 + i % 5) for i in range(60)]


@pytest.fixture(scope="module")
def ray_local(s3):
    """A local Ray whose workers reach the S3 server (as `connect_ray` passes the driver's AWS settings)."""
    import ray

    from orchestrator.cluster import worker_env

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": worker_env(True)})
    yield
    ray.shutdown()


@pytest.fixture
def small_groups(monkeypatch):
    monkeypatch.setattr(gptcore.corpus, "GROUP_BYTES", 1500)
    monkeypatch.setattr(orchestrator.prepare, "LOCAL_BYTES", 0)


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"{i:03d}.txt").write_text(doc)
    return folder


def manifest_text(location: str) -> str:
    return json.dumps(json.loads(read_dataset_manifest(location).to_json()), sort_keys=True)


def test_tasks_make_the_dataset_one_process_makes(ray_local, small_groups, corpus, tmp_path, capsys):
    plan = plan_corpus(DataConfig(corpus=str(corpus)))
    assert len(plan.groups) >= 4
    location = prepare(plan, str(tmp_path / "storage"))
    assert location == str(tmp_path / "storage" / "datasets" / plan.key)
    assert f"prepare {plan.key}: done" in capsys.readouterr().out  # progress lines
    alone = prepare_dataset(plan, tmp_path / "alone")
    assert manifest_text(location) == manifest_text(str(alone))
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(location).iterdir()}
    assert prepare(plan, str(tmp_path / "storage")) == location  # a rerun finds the manifest and does nothing
    assert {p.name: p.stat().st_mtime_ns for p in Path(location).iterdir()} == stamps


def test_an_interrupted_prepare_resumes_and_keeps_its_finished_groups(ray_local, small_groups, corpus, tmp_path):
    plan = plan_corpus(DataConfig(corpus=str(corpus)))
    storage = str(tmp_path / "storage")
    location = dataset_location(storage, plan.key)
    for group in (0, 2):  # what a prepare killed after two tasks leaves: their shards and records, no manifest
        group_task(plan, group, location)
    assert read_dataset_manifest(location) is None
    kept = {p: p.stat().st_mtime_ns for p in Path(location).glob("*_g0000[02]_*.bin")}
    prepare(plan, storage)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert manifest_text(location) == manifest_text(str(prepare_dataset(plan, tmp_path / "whole")))


def test_bad_input_in_a_task_is_named_and_nothing_is_left(ray_local, small_groups, corpus, tmp_path):
    (corpus / "999.txt").write_bytes("caf\u00e9".encode("latin-1"))
    plan = plan_corpus(DataConfig(corpus=str(corpus)))
    with pytest.raises(DataError, match=r"999.txt: not valid UTF-8") as error:
        prepare(plan, str(tmp_path / "storage"))
    assert "Traceback" not in str(error.value)
    assert not Path(dataset_location(str(tmp_path / "storage"), plan.key)).exists()


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(moto_s3(tmp_path_factory.mktemp("moto"), BUCKET))
        env = stack.enter_context(pytest.MonkeyPatch.context())
        for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            env.setenv(key, value)
        yield endpoint


def test_shards_on_s3_are_fetched_once_per_node_and_checked(ray_local, small_groups, corpus, tmp_path, capsys):
    plan = plan_corpus(DataConfig(corpus=str(corpus)))
    location = prepare(plan, f"s3://{BUCKET}/storage")
    fs, base = pafs.FileSystem.from_uri(location)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(base))}
    assert "manifest.json" in names and len([n for n in names if n.endswith(".bin")]) == len(
        read_dataset_manifest(location).shards
    )

    folder = local_dataset(location)
    assert read_manifest(folder).key == plan.key and "fetched dataset" in capsys.readouterr().out
    assert local_dataset(location) == folder and "fetched" not in capsys.readouterr().out  # once per node

    shard = read_dataset_manifest(location).shards[0]["file"]
    with fs.open_output_stream(f"{base}/{shard}") as out:  # same size, other bytes
        out.write(b"\0" * (fs.get_file_info(f"{base}/{shard}").size))
    shutil.rmtree(folder)
    with pytest.raises(DataError, match=f"shard .*{shard}: sha256 differs"):
        local_dataset(location)
    assert not folder.exists()  # never trained on


def test_storage_that_cannot_be_written_is_named(ray_local, s3, corpus, tmp_path):
    from orchestrator.storage import StorageError

    plan = plan_corpus(DataConfig(corpus=str(corpus)))
    (tmp_path / "a-file").write_text("")
    for storage in (str(tmp_path / "a-file" / "storage"), "s3://no-such-bucket/storage"):
        with pytest.raises(StorageError, match=f"storage {storage}/datasets/{plan.key} cannot be written"):
            prepare(plan, storage)


def test_prepare_verb(tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text(" ".join(DOCS))
    argv = [sys.executable, "-m", "orchestrator", "prepare", str(corpus), "--storage", str(tmp_path / "st")]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "train and" in proc.stdout and str(tmp_path / "st" / "datasets") in proc.stdout
    bad = subprocess.run([*argv[:4], str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope.txt' not found" in bad.stderr
