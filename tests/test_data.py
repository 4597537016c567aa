"""Corpora into token shards, and windows and batches out of them (gptcore alone: no Ray)."""

import gzip
import itertools
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import gptcore.corpus
import gptcore.data as data
from gptcore.config import DataConfig
from gptcore.corpus import NamedCorpus, plan_corpus, prepare_dataset, prepare_group
from gptcore.data import EpochOrder, GlobalBatches, SlidingWindowDataset, build_datasets, make_loader
from gptcore.shards import (
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    DataError,
    ShardWriter,
    TokenStream,
    open_split,
    read_manifest,
    read_shard_header,
    verify_shards,
)
from gptcore.tokenizer import EOT_ID, encode
from gptcore.tokenizing import is_validation

from .conftest import tiny_job

DOCS = [f"Document {i}: " + "every effort moves you " * (5 + i % 7) for i in range(40)]


def prepared(tmp_path, corpus, **data_config):
    plan = plan_corpus(DataConfig(corpus=corpus, **data_config))
    folder = prepare_dataset(plan, tmp_path / "datasets")
    return plan, folder, read_manifest(folder)


def split_tokens(folder, manifest, split):
    stream = open_split(folder, manifest, split)
    return stream[0 : len(stream)].tolist()


def documents_of(tokens):
    """Documents of a stream where each starts with EOT (llm.c's convention)."""
    cuts = [i for i, t in enumerate(tokens) if t == EOT_ID] + [len(tokens)]
    return [tokens[a + 1 : b] for a, b in itertools.pairwise(cuts)]


# --------------------------------------------------------------------------- sources


def test_named_corpus_comes_from_the_mirror_with_its_hash(verdict_path):
    plan = plan_corpus(DataConfig(corpus="the-verdict"))
    assert [s.path for s in plan.sources] == [str(verdict_path.absolute())]


def test_bad_mirror_copy_is_refused(tmp_path, monkeypatch):
    (tmp_path / "the-verdict.txt").write_text("not the verdict")
    monkeypatch.setenv("GPTCORE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="sha256"):
        plan_corpus(DataConfig(corpus="the-verdict"))


def test_named_corpus_offline_without_mirror_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCORE_DATA_DIR", str(tmp_path))  # empty mirror
    monkeypatch.setenv("GPTCORE_CACHE_DIR", str(tmp_path / "cache"))
    named = NamedCorpus("the-verdict.txt", "http://127.0.0.1:9/none.txt", "0" * 64)
    monkeypatch.setattr("gptcore.corpus.CORPORA", {"the-verdict": named})
    with pytest.raises(DataError, match=r"put the-verdict.txt in .*GPTCORE_DATA_DIR"):
        plan_corpus(DataConfig(corpus="the-verdict"))


@pytest.mark.parametrize("spec", ["nope.txt", "nope/*.jsonl"])
def test_missing_corpus_or_empty_glob_names_it(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"nope.*(not found|matches no file)"):
        plan_corpus(DataConfig(corpus=spec))


def test_folder_glob_and_list_find_the_same_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for i, name in enumerate(["a.txt", "sub/b.txt", "sub/c.jsonl"]):
        (tmp_path / name).write_text(DOCS[i] if name.endswith(".txt") else json.dumps({"text": DOCS[i]}) + "\n")
    (tmp_path / "notes.md").write_text("not a corpus format")
    folder = plan_corpus(DataConfig(corpus=str(tmp_path)))
    globbed = plan_corpus(DataConfig(corpus=str(tmp_path / "**" / "*.*[tl]")))
    listed = plan_corpus(DataConfig(corpus=[str(tmp_path / "a.txt"), str(tmp_path / "sub")]))
    assert len(folder.sources) == 3 and folder.split == "documents"
    assert folder.key == globbed.key == listed.key


def test_key_changes_with_content_and_split_settings(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("one two three")
    first = plan_corpus(DataConfig(corpus=str(f))).key
    assert plan_corpus(DataConfig(corpus=str(f), val_fraction=0.2)).key != first
    f.write_text("one two three four")
    assert plan_corpus(DataConfig(corpus=str(f))).key != first


# --------------------------------------------------------------------------- formats and the split


def write_formats(folder, docs):
    """The same documents as .txt files, .txt.gz, JSONL, gzipped JSONL and Parquet."""
    (folder / "txt").mkdir(parents=True)
    for i, doc in enumerate(docs):
        (folder / "txt" / f"{i:03d}.txt").write_text(doc)
    (folder / "gz").mkdir()
    for i, doc in enumerate(docs):
        (folder / "gz" / f"{i:03d}.txt.gz").write_bytes(gzip.compress(doc.encode()))
    lines = "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs))
    (folder / "c.jsonl").write_text(lines)
    (folder / "c.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    pq.write_table(pa.table({"body": docs, "id": list(range(len(docs)))}), folder / "c.parquet", row_group_size=7)


def test_every_format_gives_the_same_documents_split_by_their_hash(tmp_path):
    write_formats(tmp_path / "in", DOCS)
    expected_val = [encode(d) for d in DOCS if is_validation(d, 0.25)]
    assert 0 < len(expected_val) < len(DOCS)
    results = []
    for corpus, field in [
        ("txt", "text"),
        ("gz", "text"),
        ("c.jsonl", "body"),
        ("c.jsonl.gz", "body"),
        ("c.parquet", "body"),
    ]:
        _, folder, manifest = prepared(
            tmp_path / corpus, str(tmp_path / "in" / corpus), val_fraction=0.25, text_field=field
        )
        train, val = split_tokens(folder, manifest, "train"), split_tokens(folder, manifest, "val")
        assert manifest.split == "documents" and manifest.documents == {
            "train": 40 - len(expected_val),
            "val": len(expected_val),
        }
        assert documents_of(val) == expected_val  # whole documents, each behind an EOT, chosen by their text
        assert sorted(map(tuple, documents_of(train) + documents_of(val))) == sorted(tuple(encode(d)) for d in DOCS)
        results.append((train, val))
    assert all(r == results[0] for r in results)


def test_a_single_document_keeps_the_token_fraction_split(verdict_path):
    train, val = build_datasets(tiny_job(model={"preset": "gpt2-small", "context_length": 256}, data={"stride": 256}))
    whole = encode(verdict_path.read_text(encoding="utf-8"))
    assert len(whole) == 5145 and (len(train), len(val)) == (18, 2)  # the seed's numbers
    cut = round(5145 * 0.9)
    assert train.tokens[0:cut].tolist() == whole[:cut] and val.tokens[0 : len(val.tokens)].tolist() == whole[cut:]


def test_val_tokens_caps_the_validation_split(tmp_path):
    write_formats(tmp_path / "in", DOCS)
    job = tiny_job(data={"corpus": str(tmp_path / "in" / "txt"), "val_fraction": 0.5, "val_tokens": 100})
    train, val = build_datasets(job)
    assert len(val.tokens) == 100 and len(train.tokens) > 100


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"  \n", "empty.txt: no text"),
        ("latin1.txt", "caf\u00e9".encode("latin-1"), "latin1.txt: not valid UTF-8"),
        ("nofield.jsonl", b'{"body": "x"}\n', "nofield.jsonl line 1: no 'text' field (it has ['body'])"),
        ("notjson.jsonl", b"{oops\n", "notjson.jsonl line 1: not JSON"),
    ],
)
def test_bad_files_are_named_and_nothing_is_left(tmp_path, name, content, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text(DOCS[0])
    (tmp_path / "in" / name).write_bytes(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        prepared(tmp_path, str(tmp_path / "in"))
    assert not list((tmp_path / "datasets").iterdir())


def test_parquet_without_the_text_field_is_refused_before_reading(tmp_path):
    pq.write_table(pa.table({"content": ["a"], "url": ["u"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet: no 'text' column \(it has \['content', 'url'\]\)"):
        plan_corpus(DataConfig(corpus=str(tmp_path / "x.parquet")))


def test_no_validation_document_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.txt").write_text(DOCS[1])
    with pytest.raises(DataError, match="no document was drawn for validation"):
        prepared(tmp_path, [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], val_fraction=1e-9)


# --------------------------------------------------------------------------- shards and manifests


def test_shards_are_llmc_format_and_checked(tmp_path):
    writer = ShardWriter(tmp_path, "train", "train", shard_tokens=10)
    writer.write(np.arange(25, dtype=np.uint16))
    records = writer.close()
    assert [r["tokens"] for r in records] == [10, 10, 5]
    path = tmp_path / records[0]["file"]
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert (header[0], header[1], header[2]) == (MAGIC, 1, 10) and path.stat().st_size == HEADER_BYTES + 20
    assert read_shard_header(path) == 10
    stream = TokenStream([(str(tmp_path / r["file"]), r["tokens"]) for r in records])
    assert stream[7:23].tolist() == list(range(7, 23))  # across shard boundaries
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        read_shard_header(path)


def test_a_damaged_or_missing_shard_is_named(tmp_path):
    _, folder, manifest = prepared(tmp_path, "the-verdict")
    shard = folder / manifest.shards[0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[HEADER_BYTES] ^= 1
    shard.write_bytes(bytes(raw))
    verify_shards(folder, manifest, full=False)  # same size
    with pytest.raises(DataError, match=f"shard {shard}: sha256 differs"):
        verify_shards(folder, manifest, full=True)
    shard.unlink()
    with pytest.raises(DataError, match=f"shard {shard}: missing"):
        verify_shards(folder, manifest, full=False)


def test_a_manifest_of_another_format_is_refused(tmp_path):
    _, folder, _ = prepared(tmp_path, "the-verdict")
    raw = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(DataError, match="delete that dataset folder"):
        read_manifest(folder)


def test_prepare_again_is_a_no_op(tmp_path):
    _, folder, _ = prepared(tmp_path, "the-verdict")
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    _, again, _ = prepared(tmp_path, "the-verdict")
    assert again == folder and {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_an_interrupted_prepare_keeps_its_finished_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(gptcore.corpus, "GROUP_BYTES", 600)  # a few documents per group
    write_formats(tmp_path / "in", DOCS)
    plan = plan_corpus(DataConfig(corpus=str(tmp_path / "in" / "txt")))
    assert len(plan.groups) > 3
    folder = tmp_path / "interrupted" / plan.key
    for g in (0, 2):  # a run killed after two groups
        prepare_group(plan, g, folder)
    kept = {p.name: p.stat().st_mtime_ns for p in folder.glob("*_g0000[02]_*.bin")}
    prepare_dataset(plan, tmp_path / "interrupted")
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*_g0000[02]_*.bin")} == kept
    whole = prepare_dataset(plan, tmp_path / "whole") / "manifest.json"
    assert (folder / "manifest.json").read_text() == whole.read_text()


def test_a_folder_of_llmc_shards_is_a_corpus(tmp_path):
    for name, tokens in [("fineweb_val_000000.bin", range(100)), ("fineweb_train_000001.bin", range(100, 400))]:
        writer = ShardWriter(tmp_path / "fw", name.removesuffix(".bin"), "x")
        writer.write(np.array(tokens, dtype=np.uint16))
        (tmp_path / "fw" / writer.close()[0]["file"]).rename(tmp_path / "fw" / name)
    job = tiny_job(data={"corpus": str(tmp_path / "fw")}, model={"context_length": 32})
    train, val = build_datasets(job)
    assert train.tokens[0:3].tolist() == [100, 101, 102] and val.tokens[0:3].tolist() == [0, 1, 2]
    assert len(train.tokens) == 300 and len(val.tokens) == 100


# --------------------------------------------------------------------------- windows


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_windows_count_and_content(stride):
    ds = SlidingWindowDataset(torch.arange(20), context_length=4, stride=stride)
    starts = list(range(0, 20 - 4, stride))  # the seed's loop: range(0, len - L, stride)
    assert len(ds) == len(starts)
    for i, s in enumerate(starts):
        x, y = ds[i]
        assert x.tolist() == list(range(s, s + 4)) and y.tolist() == list(range(s + 1, s + 5))


def test_too_short_split_gives_the_numbers():
    with pytest.raises(DataError, match=r"has 10 tokens, fewer than context_length \+ 1 = 65"):
        SlidingWindowDataset(torch.arange(10), context_length=64, stride=64, name="validation")


def test_reading_windows_does_not_load_the_corpus(tmp_path):
    writer = ShardWriter(tmp_path, "train", "train", shard_tokens=1 << 20)
    writer.write(np.arange(4 << 20, dtype=np.uint64).astype(np.uint16))  # 8 MB of tokens in 4 shards
    files = [(str(tmp_path / r["file"]), r["tokens"]) for r in writer.close()]
    tracemalloc.start()
    ds = SlidingWindowDataset(TokenStream(files), context_length=1024, stride=1)
    for i in range(0, len(ds), len(ds) // 50):
        ds[i]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 256 * 1024  # a window at a time, not the 8 MB


# --------------------------------------------------------------------------- order and batches


@pytest.mark.parametrize("n", [1000, 5003])
def test_epoch_order_is_a_seeded_permutation_also_above_the_table_size(monkeypatch, n):
    table = EpochOrder(n, seed=1, epoch=0)[0:n]
    monkeypatch.setattr(data, "FEISTEL_ABOVE", 10)  # a Feistel bijection instead of a stored table
    feistel = EpochOrder(n, seed=1, epoch=0)[0:n]
    for order in (table, feistel):
        assert sorted(order.tolist()) == list(range(n))
    assert feistel.tolist() == EpochOrder(n, seed=1, epoch=0)[0:n].tolist()
    assert feistel.tolist() != EpochOrder(n, seed=1, epoch=1)[0:n].tolist()
    assert EpochOrder(n, seed=1, epoch=0)[17:40].tolist() == feistel[17:40].tolist()
    assert table.tolist() == torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()


def test_ranks_take_slices_of_the_same_global_batches_from_any_position():
    one = list(GlobalBatches(103, 8, seed=3, epoch=2))
    for world in (2, 4):
        ranks = [list(GlobalBatches(103, 8 // world, seed=3, epoch=2, rank=r, world_size=world)) for r in range(world)]
        assert [[i for r in ranks for i in r[g]] for g in range(len(one))] == one
    resumed = list(GlobalBatches(103, 4, seed=3, epoch=2, start=40, rank=1, world_size=2))
    assert [b for g in resumed for b in g] == [i for g in one[5:] for i in g[4:]]


def test_loader_order_does_not_touch_the_global_generator():
    ds = SlidingWindowDataset(torch.arange(200), context_length=4, stride=4)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches = [x.tolist() for x, _ in make_loader(ds, 2, shuffle=True, drop_last=True, seed=1, world_size=2, rank=1)]
    assert torch.equal(torch.get_rng_state(), before) and len(batches) == 12
