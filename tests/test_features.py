"""nanoforge.features: the TopK SAE's training step equals EleutherAI's sparsify on the same activations and weights;
the metrics match their definitions on cases computed by hand; planted sparse directions are recovered; the SAE file
records its model and refuses another; the site hooks read and replace what the model computes."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from nanoforge import features
from nanoforge.features import SAEConfig, Site, SparseAutoencoder


def tiny_model(seed=0, **options):
    torch.manual_seed(seed)
    cfg = dict(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=32, bias=False)
    return GPT(GPTConfig(**{**cfg, **options})).eval()


# ---------------------------------------------------------------------------------------------
# Against EleutherAI's sparsify (a dev dependency)

def sparsify_pair(d=16, latents=128, k=4, seed=0):
    """sparsify's SparseCoder and ours holding the same weights, and a batch of activations whose mean is b_dec
    (as sparsify's trainer sets it on its first batch)."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # its CPU path (Triton kernels need a GPU)
    import sparsify  # a dev dependency: missing, the reference check fails rather than skips
    torch.manual_seed(seed)
    theirs = sparsify.SparseCoder(d, sparsify.SparseCoderConfig(k=k, num_latents=latents), dtype=torch.float32)
    x = torch.randn(64, d) * 2 + 1
    with torch.no_grad():
        theirs.b_dec.copy_(x.mean(0))
        theirs.encoder.bias.normal_(0, 0.1)  # not zero, so the bias's gradient is checked too
    ours = SparseAutoencoder(SAEConfig(d, latents, k))
    with torch.no_grad():
        for mine, their in zip((ours.W_enc, ours.b_enc, ours.W_dec, ours.b_dec),
                               (theirs.encoder.weight, theirs.encoder.bias, theirs.W_dec, theirs.b_dec)):
            mine.copy_(their)
    return sparsify, theirs, ours, x


def their_step(theirs, optimizer, x, dead):
    """One step as sparsify's Trainer takes it with auxk_alpha = 1/32: forward, backward, the gradient along the
    decoder rows removed, the optimizer's step, the rows renormalised (sparsify does that before its next forward)."""
    out = theirs(x, dead_mask=dead)
    (out.fvu + features.AUXK_ALPHA * out.auxk_loss).backward()
    theirs.remove_gradient_parallel_to_decoder_directions()
    optimizer.step()
    theirs.set_decoder_norm_to_unit_norm()
    return out


def plain_encoder(x, weight, bias, k, activation):
    """sparsify's encoder without its fused backward: autograd all the way (see the AuxK test)."""
    from sparsify.fused_encoder import EncoderOutput

    pre = F.relu(F.linear(x, weight, bias))
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return EncoderOutput(values, indices, pre)


def assert_same_weights(ours, theirs):
    pairs = dict(W_enc=theirs.encoder.weight, b_enc=theirs.encoder.bias, W_dec=theirs.W_dec, b_dec=theirs.b_dec)
    for name, their in pairs.items():
        torch.testing.assert_close(getattr(ours, name).detach(), their.detach(), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_training_step_equals_sparsify(optimizer):
    """No dead latents: the FVU, the gradients (SGD shows them undistorted) and Adam's step are sparsify's."""
    _, theirs, ours, x = sparsify_pair()
    make = (lambda p: torch.optim.SGD(p, lr=0.5)) if optimizer == "sgd" else (lambda p: torch.optim.Adam(p, lr=1e-3))
    dead = torch.zeros(ours.cfg.latents, dtype=torch.bool)
    out_theirs = their_step(theirs, make(theirs.parameters()), x, dead)
    out_ours = features.train_step(ours, make(ours.parameters()), x, dead)
    torch.testing.assert_close(out_ours.fvu, out_theirs.fvu)
    torch.testing.assert_close(out_ours.reconstruction, out_theirs.sae_out)
    assert_same_weights(ours, theirs)
    assert torch.allclose(ours.W_dec.norm(dim=1), torch.ones(ours.cfg.latents))


def test_auxk_step_equals_sparsify_with_the_encoders_gradient(monkeypatch):
    """With dead latents. sparsify's fused encoder backward (its PR #71) passes no gradient through the
    pre-activations, so its AuxK loss trains the decoder only; OpenAI's recipe (Gao et al. appendix B.1), which we
    follow, lets it reach the encoder too, which is how a dead latent learns to fire again. With sparsify's encoder
    swapped for plain autograd, its step is ours exactly; with its fused one, the decoder still is."""
    sparsify, theirs, ours, x = sparsify_pair()
    dead = torch.zeros(ours.cfg.latents, dtype=torch.bool)
    dead[::3] = True
    monkeypatch.setattr(sparsify.sparse_coder, "fused_encoder", plain_encoder)
    out_theirs = their_step(theirs, torch.optim.SGD(theirs.parameters(), lr=0.5), x, dead)
    out_ours = features.train_step(ours, torch.optim.SGD(ours.parameters(), lr=0.5), x, dead)
    assert out_ours.auxk.item() > 0
    torch.testing.assert_close(out_ours.auxk, out_theirs.auxk_loss)
    assert_same_weights(ours, theirs)

    monkeypatch.undo()
    _, fused, ours, x = sparsify_pair()
    their_step(fused, torch.optim.SGD(fused.parameters(), lr=0.5), x, dead)
    features.train_step(ours, torch.optim.SGD(ours.parameters(), lr=0.5), x, dead)
    torch.testing.assert_close(ours.W_dec.detach(), fused.W_dec.detach(), atol=1e-5, rtol=1e-5)
    moved = (ours.W_enc - fused.encoder.weight).abs().amax(dim=1) > 1e-4  # rows where the two differ
    assert moved.any() and not moved[~dead].any()  # only dead latents' encoder rows, AuxK's gradient


# ---------------------------------------------------------------------------------------------
# The SAE's definitions, by hand

def test_topk_batch_topk_and_fvu_by_hand():
    sae = SparseAutoencoder(SAEConfig(n_embd=2, latents=3, k=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.95]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [-1.0, -1.0]])
    # pre = relu(x @ W_enc.T): rows [2, 0, 1.8], [0, 3, 2.85], [1, 1, 1.85], [0, 0, 0]
    out = sae(x)
    assert out.acts.detach().tolist() == [[2, 0, 0], [0, 3, 0], [0, 0, pytest.approx(1.85)], [0, 0, 0]]
    # reconstructions (2, 0), (0, 3), 1.85 (0.6, 0.8) = (1.11, 1.48), (0, 0): squared error 0, 0, 0.11^2 + 0.48^2, 2
    error = 0.11**2 + 0.48**2 + 2
    variance = 2.8125 + 5.3125 + 0.3125 + 5.3125  # about the mean (0.5, 0.75)
    assert out.fvu.item() == pytest.approx(error / variance)

    batch = SparseAutoencoder(SAEConfig(n_embd=2, latents=3, k=1, batch_topk=True))
    batch.load_state_dict(sae.state_dict())
    kept = batch(x).acts.detach()  # the 4 largest of the 12 pre-activations: 3, 2.85, 2, 1.85
    assert kept.count_nonzero(dim=1).tolist() == [1, 2, 1, 0]
    assert batch.threshold.item() == pytest.approx(1.85)  # the smallest kept, the first time
    batch.eval()  # inference: those above the threshold, token by token
    assert batch(x).acts.count_nonzero(dim=1).tolist() == [1, 2, 0, 0]


def test_metrics_by_hand():
    assert features.loss_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=7.0) == pytest.approx(0.9)
    # KL(p || q) for p = softmax([0, ln 3]) = (1/4, 3/4), q = (1/2, 1/2): 1/4 ln(1/2) + 3/4 ln(3/2)
    clean = torch.tensor([[[9.0, 9.0], [0.0, math.log(3)]]])  # position 0 is left out
    other = torch.tensor([[[0.0, 5.0], [0.0, 0.0]]])
    assert features.kl_divergence(clean, other) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5))
    # cross-entropy from position 1: -ln(3/4)
    assert features.next_token_ce(clean, torch.tensor([[0, 1]])) == pytest.approx(-math.log(0.75))


@pytest.mark.parametrize("site", [Site("block", 0), Site("mlp", 1)])
def test_evaluate_on_a_perfect_and_an_empty_reconstruction(site):
    """An SAE whose reconstruction is the activation itself recovers all the loss (KL 0); one that reconstructs
    nothing (b_dec 0, no latent active) recovers none. dead counts the latents that never fired."""
    model = tiny_model()
    x = torch.randint(0, 40, (4, 16))
    batches = [(x[:, :-1], x[:, 1:])]
    n = model.config.n_embd
    exact = SparseAutoencoder(SAEConfig(n, 2 * n, n))
    with torch.no_grad():  # latents i and n + i read +e_i and -e_i: any x is their sum, k = n of them
        eye = torch.eye(n)
        exact.W_enc.copy_(torch.cat([eye, -eye]))
        exact.W_dec.copy_(torch.cat([eye, -eye]))
    m = features.evaluate(model, exact, site, batches)
    assert m.fvu == pytest.approx(0, abs=1e-6) and m.kl == pytest.approx(0, abs=1e-6)
    assert m.loss_recovered == pytest.approx(1, abs=1e-4)
    assert m.ce_spliced == pytest.approx(m.ce_clean, abs=1e-5) and m.ce_zero != m.ce_clean

    empty = SparseAutoencoder(SAEConfig(n, 2 * n, 1))
    with torch.no_grad():
        empty.b_enc.fill_(-1e6)  # nothing fires
    m = features.evaluate(model, empty, site, batches)
    assert m.loss_recovered == pytest.approx(0, abs=1e-6) and m.dead == 1.0 and m.l0 == 0


# ---------------------------------------------------------------------------------------------
# Planted features

def planted_activations(directions, n, generator, active=3):
    """n activations, each a sum of `active` of the planted unit directions with positive random sizes."""
    count, _ = directions.shape
    picks = torch.rand(n, count, generator=generator).argsort(dim=1)[:, :active]  # (n, active)
    sizes = torch.rand(n, active, generator=generator) * 2 + 0.5
    codes = torch.zeros(n, count).scatter(1, picks, sizes)
    return codes @ directions


@pytest.fixture
def one_thread():
    """Small matrices run fastest on one thread; on a loaded machine, threads waiting for each other cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("batch_topk", [False, True])
def test_planted_directions_are_recovered(batch_topk, one_thread):
    g = torch.Generator().manual_seed(0)
    n_embd, planted = 32, 48
    directions = F.normalize(torch.randn(planted, n_embd, generator=g), dim=1)
    sae = SparseAutoencoder(SAEConfig(n_embd, 4 * n_embd, 3, batch_topk=batch_topk), generator=g)
    with torch.no_grad():
        sae.b_dec.copy_(planted_activations(directions, 4096, g).mean(0))
    optimizer = features.make_optimizer(sae, 3e-3)
    tracker = features.FiringTracker(sae.cfg.latents, dead_after=20_000)
    for _ in range(300):
        out = features.train_step(sae, optimizer, planted_activations(directions, 256, g), tracker.dead())
        tracker.update(out.acts)
    best = (directions @ sae.W_dec.detach().T).amax(dim=1)  # each planted direction's closest feature
    assert (best >= 0.9).float().mean() >= 0.9, best
