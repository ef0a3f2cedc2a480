"""activation_checkpointing: each block's activations are recomputed in the backward pass instead of kept,
and nothing that is computed changes (bitwise, on the CPU: the recomputation runs the same kernels on the
same inputs, and non-reentrant checkpointing replays the same dropout masks)."""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from model import GPT, GPTConfig

SHAPES = {"gpt2": {}, "speedrun": dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True,
                                         tie_embeddings=False)}


def loss_and_gradients(shape, checkpointing):
    """A tiny model's loss and gradients (with dropout on), and how many tensors autograd kept for backward."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.1,
                          **SHAPES[shape]))
    model.activation_checkpointing = checkpointing
    x, y = torch.randint(64, (4, 16)), torch.randint(64, (4, 16))
    kept = []
    with saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        _, loss = model(x, y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(kept)


@pytest.mark.parametrize("shape", SHAPES)
def test_checkpointing_keeps_fewer_activations_and_changes_nothing(shape):
    loss, grads, kept = loss_and_gradients(shape, checkpointing=False)
    loss_ckpt, grads_ckpt, kept_ckpt = loss_and_gradients(shape, checkpointing=True)
    assert kept_ckpt < kept / 2  # the blocks keep only their inputs until the backward pass
    assert torch.equal(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grads_ckpt[name], grad), name

