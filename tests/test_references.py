"""The core checked against references we did not write: sampling frequencies against softmax(logits / T),
the learning-rate schedules against their formulas written out, the optimizer's parameter groups and one update
against Adam's and Muon's definitions, rotary embeddings against the properties that define them.

Many other tests compare two paths of our own code (cached vs full, batched vs alone, resumed vs uninterrupted);
those miss a bug both paths share. Each test here fails on such a bug (issue 31's mutation campaign,
bench/mutation.py, planted them: temperature applied twice, cosine progress counted from step 0, Muon's weight
decay given to the AdamW groups)."""

import math

import pytest
import torch

from model import GPT, GPTConfig, Rotary
from nanoforge.config import TrainConfig
from nanoforge.engine import Generator
from nanoforge.optim import Muon, build_optimizer, set_lr
from nanoforge.tokenizer import CharTokenizer
from nanoforge.training import get_lr

# ---------------------------------------------------------------------------------------------------------------
# Sampling: frequencies over many draws against softmax(logits / T)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])  # a known next-token distribution over 6 tokens
TOKENS = CharTokenizer.train("abcdef")
# Chi-square critical values at p = 0.001 by degrees of freedom (tables; scipy.stats.chi2.ppf(0.999, dof)).
# The draws come from fixed seeds, so the test is deterministic; passing says the counts agree with the
# expected distribution as well as a fair sample of it would 999 times in 1000.
CHI2_CRITICAL = {2: 13.816, 5: 20.515}


def fixed_logits_model(logits=LOGITS):
    """A GPT whose next-token logits are `logits` at every position, whatever the input: the final norm's gain is 0
    and its bias a unit vector e_0, so its output is e_0, and the untied lm_head's column 0 holds the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=len(logits), n_layer=1, n_head=1, n_embd=8, bias=True,
                          tie_embeddings=False)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits
    return model


def chi_square(counts, probs):
    """Pearson's statistic over the tokens of probability > 0, and its degrees of freedom; None if a token of
    probability 0 was drawn."""
    if counts[probs == 0].sum() > 0:
        return None, None
    expected = probs * counts.sum()
    live = probs > 0
    return float(((counts[live] - expected[live]) ** 2 / expected[live]).sum()), int(live.sum()) - 1


def allowed_probs(logits, temperature, top_k=None):
    """softmax(logits / T), renormalised over the top_k largest logits: written out with no code of ours."""
    scaled = [math.exp(v / temperature) for v in logits.tolist()]
    if top_k:
        kth = sorted(logits.tolist(), reverse=True)[top_k - 1]
        scaled = [s if v >= kth else 0.0 for s, v in zip(scaled, logits.tolist())]
    return torch.tensor(scaled, dtype=torch.float64) / sum(scaled)


def engine_counts(temperature, top_k=None, rows=100, per_row=30):
    """How often each token was drawn: rows x per_row draws through Generator.generate (the engine's path)."""
    samples = Generator(fixed_logits_model(), TOKENS).generate([[0]] * rows, max_new_tokens=per_row,
                                                              temperature=temperature, top_k=top_k, seed=1234)
    ids = torch.tensor([i for s in samples for i in s.ids])
    assert ids.numel() == rows * per_row
    return torch.bincount(ids, minlength=len(LOGITS)).double()


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, None), (0.7, 3)])
def test_engine_sampling_frequencies_match_softmax_of_logits_over_temperature(temperature, top_k):
    counts = engine_counts(temperature, top_k)
    statistic, dof = chi_square(counts, allowed_probs(LOGITS, temperature, top_k))
    assert statistic < CHI2_CRITICAL[dof]
    # The test has the power to see the plausible bugs: temperature applied twice, or not at all.
    for wrong in (temperature**2, 1.0):
        assert chi_square(counts, allowed_probs(LOGITS, wrong, top_k))[0] > 5 * CHI2_CRITICAL[dof], wrong


def test_engine_top_k_never_draws_outside_the_k_most_likely():
    counts = engine_counts(3.0, top_k=2)
    assert counts[2:].sum() == 0 and counts[:2].min() > 0


def test_reference_sampler_frequencies_match_softmax_of_logits_over_temperature():
    """GPT.generate, the cache-free reference the engine's tests compare against, is itself right."""
    model = fixed_logits_model()
    out = model.generate(torch.zeros(200, 1, dtype=torch.long), max_new_tokens=15, temperature=0.5,
                         generator=torch.Generator().manual_seed(7))
    counts = torch.bincount(out[:, 1:].flatten(), minlength=len(LOGITS)).double()
    statistic, dof = chi_square(counts, allowed_probs(LOGITS, 0.5))
    assert statistic < CHI2_CRITICAL[dof]


def test_engine_greedy_takes_the_largest_logit():
    logits = torch.tensor([0.1, -2.0, 0.3, 3.5, 3.4, 0.0])
    sample = Generator(fixed_logits_model(logits), TOKENS).generate([[1, 2]], max_new_tokens=5, temperature=0)[0]
    assert sample.ids == [3] * 5


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedules against their formulas written out

def schedule_config(**overrides):
    settings = dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, lr_decay_iters=0)
    return TrainConfig(**{**settings, **overrides})


def test_warmup_rises_linearly_to_the_peak():
    cfg = schedule_config()
    # update s (0-based) during warmup: peak * (s + 1) / (warmup + 1), so update 0 already moves the weights
    assert [get_lr(s, cfg) for s in (0, 4, 9)] == pytest.approx([1e-3 / 11, 5e-3 / 11, 1e-2 / 11])


@pytest.mark.parametrize("lr_decay_iters", [0, 90])  # spans of 100 and 80 steps: quarters fall on steps
def test_cosine_schedule_follows_the_formula_after_warmup(lr_decay_iters):
    """lr(s) = min + (peak - min) (1 + cos(pi (s - warmup) / (end - warmup))) / 2 for warmup <= s < end, then min."""
    cfg = schedule_config(lr_schedule="cosine", lr_decay_iters=lr_decay_iters)
    end = lr_decay_iters or 110
    span = end - 10
    # The cosine's quarter, half and three-quarter points, and its value one step in, by hand:
    assert get_lr(10, cfg) == pytest.approx(1e-3)  # progress 0: the peak
    assert get_lr(10 + span // 4, cfg) == pytest.approx(1e-4 + 9e-4 * (1 + math.sqrt(0.5)) / 2)  # cos(pi/4)
    assert get_lr(10 + span // 2, cfg) == pytest.approx(5.5e-4)  # halfway: the mean of peak and min
    assert get_lr(10 + 3 * span // 4, cfg) == pytest.approx(1e-4 + 9e-4 * (1 - math.sqrt(0.5)) / 2)
    assert get_lr(11, cfg) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi / span)) / 2)
    assert get_lr(end - 1, cfg) == pytest.approx(1e-4 + 9e-4 * (1 + math.cos(math.pi * (span - 1) / span)) / 2)
    assert get_lr(end, cfg) == get_lr(end + 50, cfg) == pytest.approx(1e-4)


def test_constant_schedule_holds_the_peak_after_warmup():
    cfg = schedule_config(lr_schedule="constant")
    assert get_lr(9, cfg) == pytest.approx(1e-2 / 11)
    assert [get_lr(s, cfg) for s in (10, 50, 109, 110, 500)] == [1e-3] * 5


def test_wsd_schedule_decays_over_the_last_fraction_of_lr_decay_iters():
    """wsd with lr_decay_iters 80 < max_iters and decay_fraction 0.25: constant until 60, linear to min at 80."""
    cfg = schedule_config(lr_schedule="wsd", lr_decay_iters=80, decay_fraction=0.25)
    assert get_lr(10, cfg) == get_lr(59, cfg) == pytest.approx(1e-3)
    assert get_lr(60, cfg) == pytest.approx(1e-3)  # the decay's first point is still the peak
    assert get_lr(65, cfg) == pytest.approx(1e-3 - 9e-4 / 4)
    assert get_lr(70, cfg) == pytest.approx(5.5e-4)
    assert get_lr(80, cfg) == get_lr(100, cfg) == pytest.approx(1e-4)


def test_wsd_decay_never_starts_inside_warmup():
    """decay_fraction 1 would start the decay at step 0: it starts where warmup ends instead."""
    cfg = schedule_config(lr_schedule="wsd", decay_fraction=1.0)
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    assert get_lr(60, cfg) == pytest.approx(5.5e-4)  # halfway from 10 to 110


# ---------------------------------------------------------------------------------------------------------------
# The optimizer's parameter groups and one step, against Adam's and Muon's definitions

def optimizer_model(tie_embeddings=True):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=8, vocab_size=32, n_layer=2, n_head=2, n_embd=16, bias=True,
                         tie_embeddings=tie_embeddings))


def block_matrices(model):
    return {n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("transformer.h.")}


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_muon_groups_matrices_decay_and_everything_else_does_not(tie_embeddings):
    model = optimizer_model(tie_embeddings)
    cfg = TrainConfig(optimizer="muon", weight_decay=0.1, matrix_lr=0.02, learning_rate=6e-4, embedding_lr=0.01,
                      unembedding_lr=0.004, muon_momentum=0.9, beta1=0.8, beta2=0.99)
    optimizer = build_optimizer(model, cfg, "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon, adam = optimizer.optimizers
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    (matrix_group,) = muon.param_groups
    assert {names[id(p)] for p in matrix_group["params"]} == block_matrices(model)
    assert matrix_group["weight_decay"] == 0.1 and matrix_group["lr"] == 0.02 and matrix_group["momentum"] == 0.9
    expected = {"embedding_lr": {"transformer.wte.weight", "transformer.wpe.weight"},
                "unembedding_lr": set() if tie_embeddings else {"lm_head.weight"},
                "learning_rate": {n for n, p in model.named_parameters() if p.dim() == 1}}
    seen = set()
    for group in adam.param_groups:
        assert group["weight_decay"] == 0.0, group["lr_key"]  # embeddings, norms and biases never decay
        assert group["betas"] == (0.8, 0.99)
        assert {names[id(p)] for p in group["params"]} == expected[group["lr_key"]]
        seen |= {names[id(p)] for p in group["params"]}
    assert seen | block_matrices(model) == set(names.values())  # every parameter in exactly one group
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(names)
    set_lr(optimizer, 3e-4, cfg)  # half of learning_rate's peak: every group at half its own peak
    peaks = {"matrix_lr": 0.02, "embedding_lr": 0.01, "unembedding_lr": 0.004, "learning_rate": 6e-4}
    assert all(g["lr"] == pytest.approx(peaks[g["lr_key"]] / 2) for g in optimizer.param_groups)


def test_muon_step_with_zero_gradients_decays_only_the_matrices():
    """Decoupled weight decay alone: with zero gradients Muon's matrices shrink by (1 - lr * wd); AdamW's groups,
    which have no decay, stay exactly where they are."""
    model = optimizer_model(tie_embeddings=False)
    cfg = TrainConfig(optimizer="muon", weight_decay=0.5, matrix_lr=0.1)
    optimizer = build_optimizer(model, cfg, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.1 * 0.5 if n in block_matrices(model) else 1.0
        torch.testing.assert_close(p.detach(), before[n] * factor, msg=n)


def test_adamw_groups_and_first_step_follow_adams_definition():
    """nanoGPT's grouping (matrices decay, vectors do not) and Adam's first step written out: with bias correction
    m_hat / sqrt(v_hat) = g / |g|, so p <- p (1 - lr wd) - lr g / (|g| + eps)."""
    model = optimizer_model()
    cfg = TrainConfig(optimizer="adamw", learning_rate=0.01, weight_decay=0.2, beta1=0.9, beta2=0.95)
    optimizer = build_optimizer(model, cfg, "cpu")
    for group in optimizer.param_groups:
        assert len({p.dim() for p in group["params"]}) == 1  # matrices and vectors never share a group
        assert group["weight_decay"] == (0.2 if group["params"][0].dim() == 2 else 0.0)
        assert group["betas"] == (0.9, 0.95) and group["lr"] == 0.01
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    optimizer.step()
    for n, p in model.named_parameters():
        decay = 0.2 if p.dim() == 2 else 0.0
        expected = before[n] * (1 - 0.01 * decay) - 0.01 * grads[n] / (grads[n].abs() + 1e-8)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=n)


def test_optimizers_state_dict_is_torchs_format():
    """Muon + AdamW save one state_dict as a single torch optimizer over all parameters would: parameter indices
    0 .. N - 1 in group order, each parameter's state under its own index (what torch.optim.Optimizer writes)."""
    model = optimizer_model(tie_embeddings=False)
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    state = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert [i for g in state["param_groups"] for i in g["params"]] == list(range(len(params)))
    assert sorted(state["state"]) == list(range(len(params)))
    for i, p in enumerate(params):  # Muon keeps a momentum buffer the shape of its matrix, AdamW exp_avg
        kept = state["state"][i].get("momentum_buffer", state["state"][i].get("exp_avg"))
        assert kept.shape == p.shape
    muon_count = len(optimizer.optimizers[0].param_groups[0]["params"])
    assert all("momentum_buffer" in state["state"][i] for i in range(muon_count))
    assert all("exp_avg" in state["state"][i] for i in range(muon_count, len(params)))
    fresh = build_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    fresh.load_state_dict(state)
    for opt, again in zip(optimizer.optimizers, fresh.optimizers):
        for p in [p for g in opt.param_groups for p in g["params"]]:
            for name, value in opt.state[p].items():
                assert torch.equal(again.state[p][name], value), name


@pytest.mark.parametrize("cuda_bf16, native_bf16, expected", [
    (False, True, {"cpu": torch.bfloat16, "cuda": torch.float32, "mps": torch.float32}),
    (True, False, {"cpu": torch.float32, "cuda": torch.bfloat16, "mps": torch.float32}),
])
def test_newton_schulz_runs_in_bfloat16_only_on_the_device_that_multiplies_it_natively(monkeypatch, cuda_bf16,
                                                                                       native_bf16, expected):
    from types import SimpleNamespace
    from nanoforge import optim
    monkeypatch.setattr(optim, "probe", lambda **_: SimpleNamespace(cuda_bf16=cuda_bf16, native_bf16=native_bf16))
    assert {device: optim.newton_schulz_dtype(device) for device in expected} == expected


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (24, 24)])
def test_muon_update_is_nearly_orthogonal_and_aligned_with_the_svd(shape):
    """Muon's first update of a matrix is -lr * scale * orthogonalize(g): compare it with U V^T from an SVD of g
    (what Newton-Schulz approximates), and with the tall-matrix scale sqrt(max(1, out / in))."""
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.randn(shape))
    start = p.detach().clone()
    opt = Muon([p], lr=0.1, weight_decay=0.0, momentum=0.9, ns_dtype=torch.float32)
    p.grad = torch.randn(shape)
    u, _, vh = torch.linalg.svd(p.grad, full_matrices=False)
    opt.step()
    update = (start - p.detach()) / (0.1 * math.sqrt(max(1, shape[0] / shape[1])))
    singular = torch.linalg.svdvals(update)
    assert singular.min() > 0.5 and singular.max() < 1.3  # torch's coefficients: fast to ~1, not exactly 1
    cosine = (update * (u @ vh)).sum() / (update.norm() * (u @ vh).norm())
    assert cosine > 0.95


# ---------------------------------------------------------------------------------------------------------------
# Rotary position embedding: the properties that define it

def test_rotary_keeps_norms_of_every_channel_pair():
    rotary = Rotary(head_dim=8, block_size=32)
    x = torch.randn(2, 3, 32, 8)
    y = rotary(x, start=0)
    pair_norms = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2  # channels i and i + head_dim/2 rotate together
    torch.testing.assert_close(pair_norms(y), pair_norms(x))
    torch.testing.assert_close(y[..., 0, :], x[..., 0, :])  # position 0: angle 0, unrotated


def test_rotary_angles_are_position_times_base_to_the_minus_2i_over_d():
    rotary = Rotary(head_dim=4, block_size=8, base=100.0)
    x = torch.zeros(1, 1, 8, 4)
    x[..., 1] = 1.0  # the unit vector of pair 1's first channel, at every position
    y = rotary(x)
    angle = torch.arange(8.0) * 100.0 ** (-2 / 4)  # pair i = 1 of head_dim 4: frequency base^(-2i/d)
    torch.testing.assert_close(y[0, 0, :, 1], angle.cos())
    torch.testing.assert_close(y[0, 0, :, 3], angle.sin())


def test_rotary_scores_depend_only_on_relative_position():
    """q rotated at position m and k at n: q_m . k_n depends on m - n only (Su et al. 2021, eq. 16)."""
    rotary = Rotary(head_dim=8, block_size=32)
    q, k = torch.randn(8), torch.randn(8)
    at = lambda v, pos: rotary(v.expand(1, 1, 32, 8))[0, 0, pos]
    for shift in (1, 7, 20):
        torch.testing.assert_close(at(q, 5 + shift) @ at(k, 2 + shift), at(q, 5) @ at(k, 2))
    assert not torch.allclose(at(q, 5) @ at(k, 2), at(q, 5) @ at(k, 3))


def test_rotary_start_offsets_positions():
    rotary = Rotary(head_dim=8, block_size=32)
    x = torch.randn(1, 2, 32, 8)
    torch.testing.assert_close(rotary(x[:, :, 10:14], start=10), rotary(x)[:, :, 10:14])
