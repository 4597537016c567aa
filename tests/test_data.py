import tracemalloc

import numpy as np
import pytest
import torch

from gptcore.data import (
    DataError,
    SlidingWindowDataset,
    TokenizedCorpus,
    build_datasets,
    cache_dir,
    make_loader,
    resolve_corpus,
    split_tokens,
    tokenize_corpus,
)
from gptcore.tokenizer import EOT_ID

from .conftest import tiny_job


def test_named_corpus_comes_from_the_mirror_with_its_hash(verdict_path):
    assert [p.resolve() for p in resolve_corpus("the-verdict")] == [verdict_path.resolve()]


def test_bad_mirror_copy_is_refused(tmp_path, monkeypatch):
    (tmp_path / "the-verdict.txt").write_text("not the verdict")
    monkeypatch.setenv("GPTCORE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="sha256"):
        resolve_corpus("the-verdict")


def test_named_corpus_offline_without_mirror_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCORE_DATA_DIR", str(tmp_path))  # empty mirror
    monkeypatch.setenv("GPTCORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(
        "gptcore.data.CORPORA",
        {
            "the-verdict": __import__("gptcore.data", fromlist=["NamedCorpus"]).NamedCorpus(
                "the-verdict.txt", "http://127.0.0.1:9/none.txt", "0" * 64
            )
        },
    )
    with pytest.raises(DataError, match=r"put the-verdict.txt in .*GPTCORE_DATA_DIR"):
        resolve_corpus("the-verdict")


def test_folder_of_documents_is_joined_by_endoftext(tmp_path):
    (tmp_path / "a.txt").write_text("Hello, world")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("Every effort moves you")
    corpus = tokenize_corpus(str(tmp_path))
    assert corpus.tokens.tolist() == [15496, 11, 995, EOT_ID, 6109, 3626, 6100, 345]
    assert corpus.doc_starts.tolist() == [0, 4]
    # a list of files gives the same tokens
    assert tokenize_corpus([str(tmp_path / "a.txt"), str(tmp_path / "sub" / "b.txt")]).key == corpus.key


def test_tokens_are_cached_on_disk_by_content(tmp_path):
    f = tmp_path / "doc.txt"
    f.write_text("one two three")
    first = tokenize_corpus(str(f))
    assert (cache_dir() / "tokens" / f"{first.key}.npy").is_file()
    f.write_text("one two four")
    assert tokenize_corpus(str(f)).key != first.key


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"   \n", "empty"), (b"caf\xe9 latin-1", "not valid UTF-8")],
)
def test_unreadable_corpora_are_refused(tmp_path, content, message):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(DataError, match=message):
        tokenize_corpus(str(f))


def test_missing_corpus_names_the_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        resolve_corpus(str(tmp_path / "nope.txt"))


def test_split_by_token_fraction():
    corpus = TokenizedCorpus(np.arange(100, dtype=np.uint16), np.array([0]), "k")
    train, val = split_tokens(corpus, 0.1)
    assert len(train) == 90 and len(val) == 10 and val[0] == 90 and train.dtype == torch.int64


def test_split_by_documents_keeps_documents_whole():
    tokens = np.array([1, 2, 3, EOT_ID, 4, 5, EOT_ID, 6, 7, 8, 9], dtype=np.uint16)
    corpus = TokenizedCorpus(tokens, np.array([0, 4, 7]), "k")
    train, val = split_tokens(corpus, 0.3, by="documents")
    assert val.tolist() == [6, 7, 8, 9] and train.tolist()[-1] == EOT_ID


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_windows_count_and_content(stride):
    tokens = torch.arange(20)
    ds = SlidingWindowDataset(tokens, context_length=4, stride=stride)
    starts = list(range(0, 20 - 4, stride))  # the seed's loop: range(0, len - L, stride)
    assert len(ds) == len(starts)
    for i, s in enumerate(starts):
        x, y = ds[i]
        assert x.tolist() == list(range(s, s + 4)) and y.tolist() == list(range(s + 1, s + 5))


def test_items_are_views_not_copies():
    tokens = torch.arange(1000)
    ds = SlidingWindowDataset(tokens, context_length=64, stride=1)
    x, y = ds[10]
    assert x.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()
    assert y.untyped_storage().data_ptr() == tokens.untyped_storage().data_ptr()


def test_stride_one_memory_does_not_grow_with_context_length():
    tokens = torch.arange(200_000)
    peaks = []
    for L in (16, 256, 1024):
        tracemalloc.start()
        ds = SlidingWindowDataset(tokens, context_length=L, stride=1)
        _ = ds[len(ds) - 1]
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert ds.windows.untyped_storage().nbytes() == tokens.untyped_storage().nbytes()
    assert max(peaks) < 64 * 1024  # bytes of Python bookkeeping, not tokens x L


def test_too_short_split_gives_the_numbers():
    with pytest.raises(DataError, match=r"has 10 tokens, fewer than context_length \+ 1 = 65"):
        SlidingWindowDataset(torch.arange(10), context_length=64, stride=64, name="validation")


def test_verdict_datasets_match_the_seed():
    train, val = build_datasets(tiny_job(model={"preset": "gpt2-small", "context_length": 256}, data={"stride": 256}))
    assert len(train.tokens) + len(val.tokens) == 5145
    assert (len(train), len(val)) == (18, 2)


def test_loader_shards_are_disjoint_and_seeded():
    ds = SlidingWindowDataset(torch.arange(200), context_length=4, stride=4)
    a = make_loader(ds, 2, shuffle=True, drop_last=True, seed=1, rank=0, world_size=2)
    b = make_loader(ds, 2, shuffle=True, drop_last=True, seed=1, rank=1, world_size=2)
    firsts = lambda loader: {int(x[0]) for xb, _ in loader for x in xb}  # noqa: E731
    assert not firsts(a) & firsts(b)
    again = make_loader(ds, 2, shuffle=True, drop_last=True, seed=1, rank=0, world_size=2)
    assert [x.tolist() for x, _ in a] == [x.tolist() for x, _ in again]
