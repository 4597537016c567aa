import hashlib

import tiktoken

from gptcore.tokenizer import EOT_ID, RANKS_CACHE, RANKS_SHA256, decode, encode, get_tokenizer


def test_known_encodings():
    assert encode("Hello, world") == [15496, 11, 995]
    assert encode("Every effort moves you") == [6109, 3626, 6100, 345]


def test_the_verdict_has_5145_tokens(verdict_path):
    assert len(encode(verdict_path.read_text(encoding="utf-8"))) == 5145


def test_endoftext_is_a_document_separator():
    ids = encode("a<|endoftext|>b")
    assert EOT_ID in ids and decode(ids) == "a<|endoftext|>b"


def test_is_the_tiktoken_gpt2_encoding():
    enc = get_tokenizer()
    assert isinstance(enc, tiktoken.Encoding) and enc.n_vocab == 50257 and enc.name == "gpt2"
    text = "Unicode ✓ naïve café — 1234 tokens!\n\n  spaces"
    assert decode(encode(text)) == text


def _build(monkeypatch, cache) -> tiktoken.Encoding:
    """The encoding as a new process gets it, with ``cache`` as GPTCORE_CACHE_DIR."""
    monkeypatch.setenv("GPTCORE_CACHE_DIR", str(cache))
    return get_tokenizer.__wrapped__()


def test_ranks_are_cached_as_tiktokens_own_r50k_base_file(monkeypatch, tmp_path):
    built = _build(monkeypatch, tmp_path)
    cached = tmp_path / RANKS_CACHE
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == RANKS_SHA256  # byte for byte tiktoken's file
    stamp = cached.stat().st_mtime_ns
    loaded = _build(monkeypatch, tmp_path)  # read from the cache, not written again
    assert cached.stat().st_mtime_ns == stamp
    assert loaded._mergeable_ranks == built._mergeable_ranks
    assert loaded.encode("naïve café") == built.encode("naïve café")


def test_a_damaged_cache_is_built_again_and_an_unwritable_one_skipped(monkeypatch, tmp_path):
    cached = tmp_path / RANKS_CACHE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"IQ== 1\n")  # parses, but is not GPT-2's ranks
    assert _build(monkeypatch, tmp_path).encode("Hello, world") == [15496, 11, 995]
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == RANKS_SHA256
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert _build(monkeypatch, not_a_folder).encode("Hello, world") == [15496, 11, 995]
