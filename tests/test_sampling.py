import itertools

import pytest
import torch

from gptcore.config import model_config
from gptcore.model import GPT
from gptcore.sampling import filter_logits, generate, generate_text, next_token


def tiny(pos_emb="learned") -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("micro", dropout=0.0, pos_emb=pos_emb)).eval()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    for p, kept in [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        out = filter_logits(logits, top_p=p)
        assert torch.isfinite(out).sum().item() == kept, p
        assert torch.isfinite(out[0, :kept]).all()


def test_top_p_is_order_independent():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5]])
    out = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]


def test_top_k_and_temperature():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = filter_logits(logits, top_k=2, temperature=2.0)
    assert torch.isfinite(out).tolist() == [[False, True, True, False]]
    assert out[0, 1].item() == pytest.approx(2.0)


def test_greedy_is_argmax_and_sampling_is_seeded():
    logits = torch.randn(4, 100)
    assert torch.equal(next_token(logits, temperature=0)[:, 0], logits.argmax(-1))
    draw = lambda: next_token(logits, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(), draw())


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_greedy_same_with_and_without_cache(pos_emb):
    model = tiny(pos_emb)
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6]]
    with_cache = generate(model, prompts, 20, use_cache=True)
    without = generate(model, prompts, 20, use_cache=False)
    assert with_cache == without and all(len(r) == 20 for r in with_cache)


def test_generation_past_the_context_window_matches_uncached():
    model = tiny()  # context 32
    assert generate(model, [[5] * 10], 40) == generate(model, [[5] * 10], 40, use_cache=False)


def test_ragged_batch_equals_one_by_one():
    model = tiny()
    prompts = [[11, 12, 13, 14, 15, 16], [21, 22], [31, 32, 33]]
    batched = generate(model, prompts, 8)
    single = [generate(model, [p], 8)[0] for p in prompts]
    assert batched == single


def test_eos_stops_a_row():
    model = tiny()
    free = generate(model, [[1, 2, 3]], 10)[0]
    eos = free[3]
    stopped = generate(model, [[1, 2, 3]], 10, eos_id=eos)[0]
    assert stopped == free[: free.index(eos)]


def test_generate_text_returns_prompt_and_continuation():
    out = generate_text(tiny(), ["Every effort moves you", "Hello"], 5)
    assert out[0].startswith("Every effort moves you") and out[1].startswith("Hello")


# --------------------------------------------------------------------------- the sampled distribution

# A small fixed distribution (sorted, so the top-k / top-p sets are prefixes): mass before each id 0, .30, .55, ...
PROBS = torch.tensor([0.30, 0.25, 0.20, 0.12, 0.08, 0.05])
LOGITS = PROBS.log()
DRAWS = 4000


def draw(logits=LOGITS, n=DRAWS, seed=0, **kw) -> torch.Tensor:
    """``n`` draws of `next_token` from one logits vector, counted per id."""
    ids = next_token(logits.expand(n, -1), generator=torch.Generator().manual_seed(seed), **kw)[:, 0]
    return torch.bincount(ids, minlength=logits.numel())


def expected(temperature=1.0, top_k=None, top_p=None) -> torch.Tensor:
    """The filtered distribution, computed here from its definition (not with `filter_logits`)."""
    p = PROBS.double() ** (1.0 / temperature)  # softmax(log p / T) is p^(1/T), renormalised
    p /= p.sum()
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k is not None:
        keep[top_k:] = False  # PROBS is sorted: the k most likely ids are the first k
    if top_p is not None:
        q = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum()
        keep &= (q.cumsum(0) - q) < top_p  # an id stays while the mass before it is below p
    p = torch.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize(
    "kw",
    [
        {"temperature": 1.0},
        {"temperature": 0.5},
        {"temperature": 2.0},
        {"temperature": 1.0, "top_k": 3},
        {"temperature": 1.0, "top_p": 0.6},
        {"temperature": 2.0, "top_k": 4, "top_p": 0.7},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_sampled_frequencies_follow_the_filtered_distribution(kw):
    counts = draw(**kw)
    p = expected(**kw)
    assert counts[p == 0].sum() == 0, f"drew filtered-out ids: {counts.tolist()}"
    freq = counts.double() / DRAWS
    assert torch.allclose(freq, p, atol=0.03), f"frequencies {freq.tolist()} vs expected {p.tolist()}"
    # Pearson's chi-square over the allowed ids; 25 is above the 0.1% critical value for <= 5 degrees of freedom
    allowed = p > 0
    chi2 = ((counts[allowed] - DRAWS * p[allowed]) ** 2 / (DRAWS * p[allowed])).sum().item()
    assert chi2 < 25, f"chi-square {chi2:.1f}: frequencies {freq.tolist()} vs expected {p.tolist()}"


def entropy(counts: torch.Tensor) -> float:
    f = counts.double() / counts.sum()
    f = f[f > 0]
    return float(-(f * f.log()).sum())


def test_higher_temperature_gives_higher_entropy():
    temperatures = [0.25, 0.5, 1.0, 2.0, 4.0]
    entropies = [entropy(draw(temperature=t)) for t in temperatures]
    assert all(a < b - 0.02 for a, b in itertools.pairwise(entropies)), entropies
    assert entropies[-1] < torch.log(torch.tensor(6.0)).item()  # never above the uniform distribution's


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_support_is_exactly_the_k_most_likely(temperature):
    logits = torch.tensor([0.3, 1.5, -0.6, 1.2, 0.0, 0.9, -0.3, 0.6])  # unsorted: the k best are not the first k
    ranked = logits.argsort(descending=True).tolist()
    for k in range(1, logits.numel() + 1):
        drawn = set(draw(logits, temperature=temperature, top_k=k).nonzero()[:, 0].tolist())
        assert drawn == set(ranked[:k]), f"top_k={k}: drew {sorted(drawn)}, allowed {sorted(ranked[:k])}"


@pytest.mark.parametrize(
    ("top_p", "kept"),
    [(0.29, 1), (0.31, 2), (0.54, 2), (0.56, 3), (0.74, 3), (0.76, 4), (0.86, 4), (0.88, 5), (0.94, 5), (0.96, 6)],
)
def test_top_p_support_is_the_smallest_set_reaching_p(top_p, kept):
    """Mass before each id is 0, .30, .55, .75, .87, .95: just below a boundary keeps the id, just above adds one."""
    perm = torch.tensor([3, 0, 5, 1, 4, 2])  # shuffled vocabulary order
    logits = torch.empty(6)
    logits[perm] = LOGITS
    drawn = set(draw(logits, temperature=1.0, top_p=top_p).nonzero()[:, 0].tolist())
    assert drawn == set(perm[:kept].tolist()), f"top_p={top_p}: drew {sorted(drawn)}"


def test_padded_vocabulary_rows_are_never_sampled():
    """The head has padded rows (50257 -> 50304); even when they get the largest logits, no id >= 50257 comes out."""
    torch.manual_seed(0)
    model = GPT(model_config("micro", dropout=0.0, pad_vocab_multiple=64, tie_weights=False)).eval()
    V = model.config.vocab_size
    assert model.config.padded_vocab_size == 50304 and model.head.weight.shape[0] == 50304
    with torch.no_grad():  # final features = ones, so each logit is its head row's sum: padded rows win by far
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.head.weight[V:] = 1.0
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits[0, -1].argmax().item() >= V  # the model really prefers the padding
    for kw in (
        {"temperature": 0.0},
        {"temperature": 1.0},
        {"temperature": 5.0, "top_k": 100},
        {"temperature": 1.0, "top_p": 0.9},
    ):
        out = generate(model, [[1, 2, 3], [4]], 12, generator=torch.Generator().manual_seed(0), **kw)
        assert max(max(row) for row in out) < V, f"{kw}: sampled a padded id: {out}"


# --------------------------------------------------------------------------- the `sample` verb


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from gptcore.checkpoint_format import TrainState
    from gptcore.checkpoint_whole import save_checkpoint
    from tests.conftest import tiny_job

    job = tiny_job()
    torch.manual_seed(0)
    model = GPT(job.model)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", model=model, config=job, state=TrainState())


def sample_cli(checkpoint, capsys, *flags: str) -> list[str]:
    """``python -m orchestrator sample CHECKPOINT FLAGS`` (seed 0, 8 new tokens); the texts it prints."""
    import re

    from orchestrator.cli import main

    capsys.readouterr()
    args = ["sample", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "8", "--device", "cpu"]
    assert main([*args, "--precision", "fp32", *flags]) == 0
    out = capsys.readouterr().out
    if "--- sample 1\n" not in out:
        return [out.removesuffix("\n")]
    texts = re.split(r"^--- sample \d+\n", out, flags=re.MULTILINE)[1:]
    return [t.removesuffix("\n") for t in texts]


def test_sample_verb_passes_its_options_to_the_sampler(checkpoint, capsys):
    greedy = sample_cli(checkpoint, capsys)
    assert len(greedy) == 1 and greedy[0].startswith("Hello") and len(greedy[0]) > len("Hello")
    # --num-samples: that many samples, each its own draw
    hot = sample_cli(checkpoint, capsys, "--temperature", "1.0", "--num-samples", "3")
    assert len(hot) == 3 and len(set(hot)) == 3 and greedy[0] not in hot
    assert sample_cli(checkpoint, capsys, "--temperature", "1.0", "--num-samples", "3") == hot  # --seed 0 again
    assert sample_cli(checkpoint, capsys, "--temperature", "1.0", "--num-samples", "3", "--seed", "1") != hot
    # --temperature: another temperature, other draws under the same seed
    assert sample_cli(checkpoint, capsys, "--temperature", "0.05", "--num-samples", "3") != hot
    # --top-k 1 and a tiny --top-p leave only the most likely token: sampling becomes greedy
    assert sample_cli(checkpoint, capsys, "--temperature", "1.0", "--top-k", "1", "--num-samples", "3") == greedy * 3
    assert sample_cli(checkpoint, capsys, "--temperature", "1.0", "--top-p", "1e-6", "--num-samples", "3") == greedy * 3
    # --top-k 2: every token is one of the two most likely, so the draws differ from unrestricted ones
    assert sample_cli(checkpoint, capsys, "--temperature", "1.0", "--top-k", "2", "--num-samples", "3") != hot
