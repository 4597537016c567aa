import tiktoken

from gptcore.tokenizer import EOT_ID, decode, encode, get_tokenizer


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
