import pytest
import torch

from gptcore.config import model_config
from gptcore.model import GPT, KVCache


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(model_config("micro", dropout=0.0, **overrides)).eval()


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope"])
def test_no_causal_leak(pos_emb):
    """Changing token j changes no logit at positions < j."""
    model = tiny(pos_emb=pos_emb)
    x = torch.randint(0, 50257, (1, 16))
    j = 9
    x2 = x.clone()
    x2[0, j] = (x[0, j] + 1) % 50257
    a, b = model(x), model(x2)
    assert torch.equal(a[:, :j], b[:, :j])
    assert not torch.allclose(a[:, j:], b[:, j:])


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope"])
def test_positions_matter(pos_emb):
    model = tiny(pos_emb=pos_emb)
    x = torch.tensor([[5, 6, 7, 8]])
    swapped = torch.tensor([[6, 5, 7, 8]])
    assert not torch.allclose(model(x)[0, -1], model(swapped)[0, -1])


def test_logit_shapes_and_last_only():
    model = tiny()
    x = torch.randint(0, 50257, (3, 10))
    assert model(x).shape == (3, 10, 50257)
    assert torch.allclose(model(x, last_only=True)[:, 0], model(x)[:, -1], atol=1e-6)


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope"])
def test_kv_cache_matches_full_forward(pos_emb):
    model = tiny(pos_emb=pos_emb)
    x = torch.randint(0, 50257, (2, 12))
    full = model(x)
    cache = KVCache(len(model.blocks), model.config.context_length)
    first = model(x[:, :7], cache=cache)
    steps = [model(x[:, i : i + 1], cache=cache) for i in range(7, 12)]
    assert torch.allclose(torch.cat([first, *steps], dim=1), full, atol=1e-5)


def test_weight_tying_and_freezing():
    tied = tiny(tie_weights=True)
    assert tied.head.weight is tied.tok_emb.weight
    untied = tiny(tie_weights=False)
    assert untied.num_params() - tied.num_params() == 50257 * 32
    frozen = tiny(tie_weights=False, freeze_token_embeddings=True)
    assert not frozen.tok_emb.weight.requires_grad
    assert frozen.num_params(trainable_only=True) == frozen.num_params() - 50257 * 32


def test_gpt2_compatible_shapes_and_eps():
    model = GPT(model_config("micro"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["blocks.0.attn.qkv.weight"] == (96, 32) and shapes["blocks.0.attn.qkv.bias"] == (96,)
    assert shapes["blocks.0.mlp.fc.weight"] == (128, 32) and shapes["pos_emb.weight"] == (32, 32)
    assert model.blocks[0].ln_1.eps == 1e-5


def test_flops_per_token_follows_6n_rule():
    model = GPT(model_config("gpt2-small"))
    n_matmul = model.num_params() - model.pos_emb.weight.numel()
    assert model.flops_per_token(1024) == pytest.approx(6 * n_matmul + 12 * 12 * 768 * 1024, rel=1e-6)


def test_padded_vocab_keeps_real_vocab_for_sampling():
    model = tiny(pad_vocab_multiple=64)
    assert model.head.weight.shape[0] == 50304


def test_too_long_input_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
