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
