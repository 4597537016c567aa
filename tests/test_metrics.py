import math

import pytest
import torch
import torch.nn.functional as F

from gptcore.config import model_config
from gptcore.metrics import continuation_nll, distinct_n, ngrams, repetition_rate, self_perplexity
from gptcore.model import GPT
from gptcore.sampling import generate


def micro() -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("micro", dropout=0.0)).eval()


def test_distinct_n_pools_samples():
    samples = [[1, 2, 3], [1, 2, 4]]
    assert distinct_n(samples, 1) == pytest.approx(4 / 6)
    assert distinct_n(samples, 2) == pytest.approx(3 / 4)  # (1, 2) appears in both samples
    assert distinct_n([[5, 6, 7, 8]], 2) == 1.0


def test_repetition_rate_counts_repeats_within_a_sample():
    assert repetition_rate([[1, 2, 1, 2, 1, 2]], n=2) == pytest.approx(3 / 5)
    assert repetition_rate([[1, 2, 3], [1, 2, 3]], n=2) == 0.0  # repeats across samples are not loops


def test_too_short_samples_give_nan_not_zero():
    assert math.isnan(distinct_n([[1], []], 2))
    assert math.isnan(repetition_rate([[1, 2, 3]], n=4))
    with pytest.raises(ValueError, match="n must be"):
        ngrams([1, 2], 0)


def test_continuation_nll_matches_one_forward_pass():
    model = micro()
    prompt, continuation = [10, 20, 30], [40, 50, 60, 70]
    nll, count = continuation_nll(model, prompt, continuation)
    ids = torch.tensor([prompt + continuation])
    logits = model(ids)[0, 2:-1, : model.config.vocab_size]
    assert count == 4
    assert nll == pytest.approx(F.cross_entropy(logits, ids[0, 3:], reduction="sum").item(), rel=1e-5)


def test_continuation_past_the_context_window_is_scored_in_windows():
    model = micro()  # context 32
    nll, count = continuation_nll(model, [1, 2], list(range(100, 170)))
    assert count == 70 and math.isfinite(nll) and nll > 0


def test_greedy_text_is_less_perplexing_to_the_model_than_random_tokens():
    model = micro()
    prompts = [[464, 1110], [464, 1110]]
    greedy = generate(model, prompts, 12)
    random_tokens = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0)).tolist()
    assert self_perplexity(model, prompts, greedy) < self_perplexity(model, prompts, random_tokens)
    assert math.isnan(self_perplexity(model, [], []))
