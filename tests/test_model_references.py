"""model.py against references we did not write: attention, norms, activations and the loss written out from
their definitions (loops over heads, the formulas of the papers), torch.nn's own LayerNorm, parameter and FLOP
counts by hand, and GPT-2's initialisation measured on the weights. test_gpt2.py compares the default
architecture with transformers' GPT-2; these cover the options it cannot hold and the pieces one by one."""

import math

import pytest
import torch
from torch.nn import functional as F

from model import GPT, MLP, CausalSelfAttention, GPTConfig, LayerNorm, RMSNorm, padded_vocab_size


def config(**overrides):
    settings = dict(block_size=16, vocab_size=40, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    return GPTConfig(**{**settings, **overrides})


def attention_by_hand(attn, x, n_head, n_kv_head):
    """Causal multi-head attention written out head by head and position by position (Vaswani et al. 2017):
    head h attends with key/value head h // (n_head / n_kv_head) over positions <= t."""
    B, T, C = x.shape
    d = C // n_head
    qkv = x @ attn.c_attn.weight.T + attn.c_attn.bias
    q, k, v = qkv[..., :C], qkv[..., C : C + n_kv_head * d], qkv[..., C + n_kv_head * d :]
    out = torch.zeros(B, T, C)
    for h in range(n_head):
        g = h // (n_head // n_kv_head)
        qh, kh, vh = q[..., h * d : (h + 1) * d], k[..., g * d : (g + 1) * d], v[..., g * d : (g + 1) * d]
        for t in range(T):
            scores = torch.einsum("bd,bsd->bs", qh[:, t], kh[:, : t + 1]) / math.sqrt(d)  # only positions <= t
            out[:, t, h * d : (h + 1) * d] = torch.einsum("bs,bsd->bd", scores.softmax(-1), vh[:, : t + 1])
    return out @ attn.c_proj.weight.T + attn.c_proj.bias


@pytest.mark.parametrize("n_kv_head", [0, 2, 1])
def test_attention_equals_its_definition_written_out(n_kv_head):
    torch.manual_seed(0)
    cfg = config(n_kv_head=n_kv_head)
    attn = CausalSelfAttention(cfg).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)  # large enough that every term shows
    x = torch.randn(2, 7, 32)
    expected = attention_by_hand(attn, x, 4, cfg.kv_heads)
    torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)
    y, weights = attn(x, return_weights=True)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
    assert torch.all(weights.triu(1) == 0)  # no weight on the future
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 7))


def test_layernorm_equals_torchs_and_rmsnorm_its_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16) * 4 + 2
    ours = LayerNorm(16, bias=True)
    theirs = torch.nn.LayerNorm(16, eps=1e-5)
    with torch.no_grad():
        for p, q in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
            p.normal_()
            q.copy_(p)
    torch.testing.assert_close(ours(x), theirs(x))
    assert LayerNorm(16, bias=False).bias is None
    rms = RMSNorm(16)
    with torch.no_grad():
        rms.weight.normal_()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * rms.weight  # Zhang & Sennrich 2019
    torch.testing.assert_close(rms(x), expected)


@pytest.mark.parametrize("mlp", ["gelu", "relu2", "swiglu"])
def test_mlp_activations_equal_their_formulas(mlp):
    torch.manual_seed(0)
    block = MLP(config(mlp=mlp, n_embd=48)).eval()
    hidden = 4 * 48 if mlp != "swiglu" else 64 * math.ceil(8 * 48 / 3 / 64)  # 2/3 of 4x, rounded up to 64: 128
    assert block.c_proj.weight.shape == (48, hidden)
    x = torch.randn(2, 3, 48)
    h = x @ block.c_fc.weight.T + block.c_fc.bias
    if mlp == "gelu":  # GPT-2's tanh approximation (Hendrycks & Gimpel 2016)
        act = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    elif mlp == "relu2":
        act = torch.clamp(h, min=0) ** 2
    else:
        gate, value = h[..., :hidden], h[..., hidden:]
        act = gate * torch.sigmoid(gate) * value
    torch.testing.assert_close(block(x), act @ block.c_proj.weight.T + block.c_proj.bias, rtol=1e-5, atol=1e-6)


def test_loss_is_the_mean_negative_log_probability_of_the_targets():
    torch.manual_seed(0)
    model = GPT(config()).eval()
    idx = torch.randint(0, 40, (2, 6))
    targets = torch.randint(0, 40, (2, 6))
    targets[0, 2] = targets[1, 5] = -1
    logits, loss = model(idx, targets)
    log_probs = logits.log_softmax(-1)
    kept = [(b, t) for b in range(2) for t in range(6) if targets[b, t] >= 0]
    expected = -sum(log_probs[b, t, targets[b, t]] for b, t in kept) / len(kept)
    torch.testing.assert_close(loss, expected)


def test_logit_softcap_squashes_into_the_cap():
    torch.manual_seed(0)
    model = GPT(config(logit_softcap=2.0, tie_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(300)  # raw logits far beyond the cap
    idx = torch.randint(0, 40, (1, 5))
    raw = model.lm_head(model.transformer.ln_f(model.transformer.h[1](model.transformer.h[0](model.embed(idx)))))
    logits, _ = model(idx)
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))  # Gemma 2's soft cap
    assert logits.abs().max() <= 2.0 and raw.abs().max() > 10


def test_gpt2_initialisation_measured_on_the_weights():
    """N(0, 0.02) everywhere, the residual projections N(0, 0.02 / sqrt(2 n_layer)) (GPT-2 paper, 2.3), zero
    biases; zero_init_proj starts those projections at 0. 256 x 1024 samples: the std is measured to ~0.2 %."""
    torch.manual_seed(0)
    model = GPT(config(n_embd=256, n_head=4, n_layer=8, vocab_size=512))
    std = lambda name: dict(model.named_parameters())[name].std().item()
    assert std("transformer.h.0.mlp.c_fc.weight") == pytest.approx(0.02, rel=0.02)
    assert std("transformer.wte.weight") == pytest.approx(0.02, rel=0.02)
    assert std("transformer.wpe.weight") == pytest.approx(0.02, rel=0.05)
    assert std("transformer.h.3.mlp.c_proj.weight") == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert std("transformer.h.5.attn.c_proj.weight") == pytest.approx(0.02 / math.sqrt(16), rel=0.02)
    assert all(p.abs().sum() == 0 for n, p in model.named_parameters() if n.endswith(".bias"))  # norms' too
    assert all(torch.all(p == 1) for n, p in model.named_parameters() if n.endswith("ln_2.weight"))
    zero = GPT(config(zero_init_proj=True))
    assert all(p.abs().sum() == 0 for n, p in zero.named_parameters() if n.endswith("c_proj.weight"))


def test_parameter_and_flop_counts_by_hand():
    """GPT-2's parameters for n_layer L, width C, vocabulary V, context T: wte V C + wpe T C + L (12 C^2 + 13 C)
    + 2 C for ln_f (tied lm_head: no more); non-embedding leaves out wpe. FLOPs: 6 N + 12 L T C (PaLM, app. B)."""
    V, T, L, C = 40, 16, 2, 32
    model = GPT(config())
    total = V * C + T * C + L * (12 * C * C + 13 * C) + 2 * C
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C
    assert model.flops_per_token() == 6 * (total - T * C) + 12 * L * T * C
    untied = GPT(config(tie_embeddings=False))
    assert untied.num_params(non_embedding=False) == total + V * C
    assert untied.num_params() == total - T * C  # wte is only looked up; lm_head counts
    rope = GPT(config(pos_emb="rope"))
    assert rope.num_params() == rope.num_params(non_embedding=False) == total - T * C


def test_padded_vocab_and_gpt2_differences():
    assert padded_vocab_size(50257, 64) == 50304 and padded_vocab_size(64, 64) == 64
    assert GPTConfig().gpt2_differences() == []
    assert (GPTConfig().block_size, GPTConfig().vocab_size, GPTConfig().n_layer, GPTConfig().n_head,
            GPTConfig().n_embd) == (1024, 50304, 12, 12, 768)  # GPT-2 small, vocabulary padded
    assert GPTConfig(pos_emb="rope", n_kv_head=4).gpt2_differences() == [("pos_emb", "rope"), ("n_kv_head", 4)]
    assert GPTConfig(n_kv_head=12, zero_init_proj=True).gpt2_differences() == []
    assert GPTConfig(bias=False, logit_softcap=30.0).gpt2_differences() == [("bias", False), ("logit_softcap", 30.0)]


def test_positions_enter_the_residual_stream_once_and_from_start():
    torch.manual_seed(0)
    model = GPT(config()).eval()
    idx = torch.randint(0, 40, (1, 4))
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    torch.testing.assert_close(model.embed(idx), wte[idx[0]].unsqueeze(0) + wpe[:4])
    torch.testing.assert_close(model.embed(idx, start=5), wte[idx[0]].unsqueeze(0) + wpe[5:9])
    with pytest.raises(ValueError, match="longer than block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    model = GPT(config(dropout=0.5))
    idx = torch.randint(0, 40, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])
    attn = model.transformer.h[0].attn
    q = k = v = torch.randn(1, 4, 8, 8)
    attn.train()
    assert not torch.equal(attn.attend(q, k, v), attn.attend(q, k, v))


def test_reference_sampler_greedy_and_top_k():
    """GPT.generate: temperature 0 takes the argmax of the full forward's last position; top_k 1 does too."""
    torch.manual_seed(0)
    model = GPT(config()).eval()
    idx = torch.randint(0, 40, (2, 5))
    out = model.generate(idx, max_new_tokens=3, temperature=0)
    for step in range(3):
        logits, _ = model(out[:, : 5 + step])
        assert torch.equal(out[:, 5 + step], logits[:, -1].argmax(-1))
    generator = torch.Generator().manual_seed(0)
    sampled = model.generate(idx, max_new_tokens=3, temperature=1.0, top_k=1, generator=generator)
    assert torch.equal(sampled, out)
