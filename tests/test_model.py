import math

import pytest
import torch

from model import GPT, GPTConfig
from nanoforge.config import TrainConfig
from nanoforge.optim import build_optimizer


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
    cfg.update(overrides)
    return GPT(GPTConfig(**cfg)).eval()


def test_changing_future_tokens_never_changes_past_logits():
    model = small_model()
    idx = torch.randint(0, 97, (2, 32))
    logits, _ = model(idx)
    for t in (0, 7, 20, 30):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
        changed_logits, _ = model(changed)
        assert torch.equal(changed_logits[:, : t + 1], logits[:, : t + 1])
        # ... while the future does change (the test would pass vacuously otherwise)
        assert not torch.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("bias", [True, False])
def test_sdpa_and_explicit_math_paths_agree(bias):
    model = small_model(bias=bias)
    x = torch.randn(3, 32, 64)
    for block in model.transformer.h:
        fast = block.attn(x)
        slow, weights = block.attn(x, return_weights=True)
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        assert weights.shape == (3, 4, 32, 32)


def test_relu_squared_is_autograds_relu_square_and_the_hand_derivative():
    from model import ReLUSquared

    x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.5, 3.0])
    grad = torch.tensor([1.0, -2.0, 3.0, 0.5, -1.0, 2.0])
    ours = x.clone().requires_grad_()
    ReLUSquared.apply(ours).backward(grad)
    assert ReLUSquared.apply(x).tolist() == [0.0, 0.0, 0.0, 0.0625, 2.25, 9.0]
    assert ours.grad.tolist() == [0.0, 0.0, 0.0, 0.25, -3.0, 12.0]  # grad * 2 relu(x), by hand
    torch.manual_seed(0)
    x, grad = torch.randn(4, 8, 64), torch.randn(4, 8, 64)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ReLUSquared.apply(ours).backward(grad)
    torch.nn.functional.relu(theirs).square().backward(grad)
    assert torch.equal(ours.grad, theirs.grad)  # the same numbers as autograd's, to the bit


def test_attention_weights_are_causal_distributions():
    model = small_model()
    patterns = model.attention_weights(torch.randint(0, 97, (2, 32)))
    assert len(patterns) == 2
    for weights in patterns:
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 32))
        above_diagonal = torch.ones(32, 32, dtype=torch.bool).triu(diagonal=1)
        assert (weights[..., above_diagonal] == 0).all()
        assert (weights[..., ~above_diagonal] > 0).all()


def test_loss_at_initialisation_is_close_to_uniform():
    vocab = 1000
    model = small_model(vocab_size=vocab)
    idx = torch.randint(0, vocab, (8, 32))
    _, loss = model(idx, targets=torch.randint(0, vocab, (8, 32)))
    assert abs(loss.item() - math.log(vocab)) < 0.1 * math.log(vocab)


def test_targets_of_minus_one_are_ignored():
    model = small_model()
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    _, full = model(idx, targets)
    masked = targets.clone()
    masked[:, 8:] = -1
    _, partial = model(idx, masked)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :8].reshape(-1, 97), targets[:, :8].reshape(-1))
    torch.testing.assert_close(partial, expected)
    assert not torch.allclose(partial, full)


def test_tiny_model_overfits_one_batch():
    model = small_model(vocab_size=50, block_size=16, n_embd=32, n_head=2).train()
    idx = torch.randint(0, 50, (4, 17))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.0, learning_rate=3e-3, beta2=0.99), "cpu")
    for _ in range(300):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_lm_head_is_tied_and_residual_projections_are_scaled():
    model = small_model(n_layer=8, n_embd=128)
    assert model.lm_head.weight is model.transformer.wte.weight
    c_proj = model.transformer.h[0].attn.c_proj.weight
    c_fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(c_fc.std().item() - 0.02) < 0.002
    assert abs(c_proj.std().item() - 0.02 / math.sqrt(16)) < 0.001


def test_weight_decay_applies_to_matrices_only():
    model = small_model()
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1, learning_rate=1e-3, beta2=0.95), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_counts_matmuls_and_attention():
    model = small_model()
    n = model.num_params()
    assert model.flops_per_token() == 6 * n + 12 * 2 * 32 * 64
    assert n == sum(p.numel() for p in model.parameters()) - 32 * 64


def test_reference_generation_crops_context_past_block_size():
    model = small_model(block_size=8)
    prompt = torch.randint(0, 97, (2, 5))
    out = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :5], prompt)
    # greedy: each new token is the argmax given the last block_size tokens
    logits, _ = model(out[:, 12:20])
    assert torch.equal(out[:, 20], logits[:, -1].argmax(-1))


def test_sequence_longer_than_block_size_is_refused():
    model = small_model(block_size=8)
    with pytest.raises(ValueError, match="longer than block_size 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
