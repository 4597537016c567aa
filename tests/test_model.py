import pytest
import torch

from gptcore.config import model_config
from gptcore.model import GPT, KVCache, lm_loss
from gptcore.sampling import generate


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


def test_cross_entropy_over_flattened_logits():
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    manual = -torch.log_softmax(logits, -1).gather(-1, targets[..., None]).mean()
    assert lm_loss(logits, targets).item() == pytest.approx(manual.item(), rel=1e-6)


def test_forward_with_targets_returns_the_loss_of_its_logits():
    """The loss computed inside the forward (fused under torch.compile) is `lm_loss` of the logits, gradient too."""
    model = tiny(pad_vocab_multiple=64)
    x, y = torch.randint(0, 50257, (2, 2, 8))
    loss = model(x, targets=y)
    (grad,) = torch.autograd.grad(loss, model.head.weight)
    expected = lm_loss(model(x), y)
    (expected_grad,) = torch.autograd.grad(expected, model.head.weight)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)


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


@torch.no_grad()
def test_padded_vocab_keeps_real_vocab_for_sampling():
    """Generation never returns a padding id, even where a padding row's logit is the largest."""
    model = tiny(pad_vocab_multiple=64, tie_weights=False)
    vocab, padded = model.config.vocab_size, model.config.padded_vocab_size
    assert model.head.weight.shape[0] == padded == 50304
    model.ln_f.weight.zero_()  # every position's final hidden state is then ln_f.bias
    model.ln_f.bias.fill_(1.0)
    model.head.weight[vocab:] = 10.0  # padding logits 320; real ones stay near 0 (weights N(0, 0.02))
    prompt = torch.randint(0, vocab, (2, 5))
    assert int(model(prompt)[:, -1].argmax(-1).min()) >= vocab  # unmasked, a padding id would win
    for temperature in (0.0, 1.0):
        out = generate(model, prompt, 20, temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert max(max(row) for row in out) < vocab


def test_too_long_input_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_keep_mask_rate_and_seeding():
    """The cheap CPU dropout mask keeps 1 - p of the elements, uniformly over positions, and follows the seed."""
    from gptcore.model import keep_mask

    torch.manual_seed(1)
    mask = keep_mask(torch.Size([400, 1000]), 0.1)
    assert mask.dtype == torch.bool and mask.shape == (400, 1000)
    assert abs(mask.float().mean().item() - 0.9) < 0.003
    lanes = mask.view(-1, 4).float().mean(0)  # each 16-bit lane of the 64-bit words is uniform
    assert torch.allclose(lanes, torch.full((4,), 0.9), atol=0.005)
    torch.manual_seed(1)
    assert torch.equal(keep_mask(torch.Size([400, 1000]), 0.1), mask)
    assert keep_mask(torch.Size([7]), 0.0).all() and keep_mask(torch.Size([3, 5]), 0.5).shape == (3, 5)


def test_dropout_scales_kept_elements_and_its_gradient():
    from gptcore.model import dropout

    x = torch.ones(50_000, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.2, training=True)
    kept = y != 0
    assert torch.allclose(y[kept], torch.tensor(1.25))
    assert abs(kept.float().mean().item() - 0.8) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum)/dx is the same scaled mask
    assert dropout(x, 0.2, training=False) is x


def test_cpu_attention_with_dropout_matches_sdpa_without_it():
    """The written-out CPU attention (used when training with dropout) is SDPA's math, causal or masked."""
    from gptcore.model import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ones = torch.ones(6, dtype=torch.bool)
    # p -> 0 keeps every weight: the same numbers as SDPA
    assert torch.allclose(attention(q, k, v, None, 1e-9, True), sdpa(q, k, v, is_causal=True), atol=1e-6)
    mask = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None] & ones
    assert torch.allclose(attention(q, k, v, mask, 1e-9, False), sdpa(q, k, v, attn_mask=mask), atol=1e-6)
    dropped = attention(q, k, v, None, 0.5, True)
    assert dropped.shape == q.shape and not torch.allclose(dropped, sdpa(q, k, v, is_causal=True))
