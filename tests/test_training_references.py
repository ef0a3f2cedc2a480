"""The training step (nanoforge/training.py) against its definitions: micro-batch accumulation gives the
gradient of the batch's mean loss (autograd of the loss written out), clipping scales the gradient to
grad_clip's global norm, and the NaN guard keeps a non-finite step off the weights. test_references.py checks
the schedules; test_robustness.py the same behaviours end to end through train.py."""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from model import GPT, GPTConfig
from nanoforge.distributed import Distributed
from nanoforge.training import apply_update, train_step


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8, bias=True))


def no_scaler():
    return torch.amp.GradScaler("cpu", enabled=False)


class TwoProcesses:
    """Distributed's interface as process 0 of two sees it, the other process's step loss being 1.0."""

    def mean(self, tensor):
        return tensor.copy_((tensor + 1.0) / 2)


@pytest.mark.parametrize("loss_scale", [None, 64.0])
def test_micro_batches_accumulate_the_gradient_of_the_mean_loss(loss_scale):
    """With a loss scale (float16's GradScaler), the gradients left in the parameters are unscaled."""
    model = tiny_model()
    torch.manual_seed(1)
    batches = [(torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))) for _ in range(3)]
    fed = iter(batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale) if loss_scale else no_scaler()
    loss = train_step(model, optimizer, scaler, lambda: next(fed), 3, contextlib.nullcontext(), Distributed())
    assert next(fed, None) is None  # exactly one batch per micro-step
    # The reference: cross-entropy of each micro-batch by torch's own function, averaged, differentiated once.
    reference = tiny_model()
    losses = [F.cross_entropy(reference(x)[0].view(-1, 16), y.view(-1)) for x, y in batches]
    mean = sum(losses) / 3
    grads = torch.autograd.grad(mean, list(reference.parameters()))
    torch.testing.assert_close(loss, mean.detach())
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_the_step_loss_is_averaged_over_processes():
    model = tiny_model()
    x, y = torch.randint(0, 16, (2, 8)), torch.randint(0, 16, (2, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_step(model, optimizer, no_scaler(), lambda: (x, y), 1, contextlib.nullcontext(), TwoProcesses())
    own = F.cross_entropy(tiny_model()(x)[0].view(-1, 16), y.view(-1))
    torch.testing.assert_close(loss, (own.detach() + 1.0) / 2)  # every process decides on the same number


def run_state():
    return SimpleNamespace(loss_sum=torch.zeros(()), window_steps=0, skipped_steps=0)


def with_gradients(norm):
    """A tiny model whose gradients have global L2 norm `norm` (all parameters together)."""
    model = tiny_model()
    torch.manual_seed(2)
    grads = [torch.randn_like(p) for p in model.parameters()]
    total = torch.sqrt(sum((g**2).sum() for g in grads))
    for p, g in zip(model.parameters(), grads):
        p.grad = g * norm / total
    return model, [p.grad.clone() for p in model.parameters()], [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("grad_clip, scale", [(1.0, 0.1), (0.0, 1.0), (20.0, 1.0)])
def test_update_clips_to_the_global_norm_then_steps(grad_clip, scale):
    """Gradient norm 10: grad_clip 1 scales every gradient by 1/10; 0 (off) and 20 leave it alone."""
    model, grads, before = with_gradients(10.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # p <- p - g: the step shows the clipped gradient
    state = run_state()
    assert apply_update(model, optimizer, no_scaler(), torch.tensor(2.5), SimpleNamespace(grad_clip=grad_clip), state)
    for p, g, p0 in zip(model.parameters(), grads, before):
        torch.testing.assert_close(p.detach(), p0 - scale * g, rtol=1e-5, atol=1e-6)
        assert p.grad is None  # cleared for the next step
    assert (state.loss_sum.item(), state.window_steps, state.skipped_steps) == (2.5, 1, 0)


@pytest.mark.parametrize("loss, poison", [(float("nan"), False), (float("inf"), False), (1.0, True)])
def test_a_non_finite_loss_or_gradient_never_reaches_the_weights(loss, poison):
    model, _, before = with_gradients(1.0)
    if poison:
        next(model.parameters()).grad[0, 0] = float("nan")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    state = run_state()
    state.loss_sum += 4.0
    assert not apply_update(model, optimizer, no_scaler(), torch.tensor(loss), SimpleNamespace(grad_clip=1.0), state)
    for p, p0 in zip(model.parameters(), before):
        assert torch.equal(p.detach(), p0) and p.grad is None
    assert (state.loss_sum.item(), state.window_steps, state.skipped_steps) == (4.0, 0, 1)


def test_a_loss_scale_grows_after_good_steps_and_shrinks_after_an_overflow():
    """With float16's GradScaler (growth every step here), apply_update steps through the scaler and updates its
    scale: doubled after a finite step; after an overflowing gradient the step is skipped and the scale halved
    (torch's GradScaler rules), the loss being finite."""
    model, _, before = with_gradients(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=1)
    scaler.scale(torch.ones(()))  # as a backward pass would have (the scale is created lazily)
    scaler.unscale_(optimizer)  # as train_step leaves it
    assert apply_update(model, optimizer, scaler, torch.tensor(1.0), SimpleNamespace(grad_clip=0.0), run_state())
    assert scaler.get_scale() == 16.0 and not torch.equal(next(model.parameters()).detach(), before[0])
    moved = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    scaler.scale(torch.ones(()))
    scaler.unscale_(optimizer)
    assert apply_update(model, optimizer, scaler, torch.tensor(1.0), SimpleNamespace(grad_clip=0.0), run_state())
    assert scaler.get_scale() == 8.0
    assert all(torch.equal(p.detach(), m) for p, m in zip(model.parameters(), moved))
