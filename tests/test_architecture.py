"""The opt-in architecture options, Muon, the wsd schedule and elapsed_s: each option keeps the model
causal, its explicit attention path equal to the fused one and the KV-cache engine equal to the
cache-free reference; Muon resumes exactly; GPT-2 loading and export refuse what GPT-2 cannot hold."""

import json
import os

import pytest
import torch

from nanoforge import checkpoint, loading
from nanoforge import gpt2
from conftest import tiny_config
from nanoforge.engine import Generator, KVCache
from model import GPT, GPTConfig
from nanoforge.optim import Optimizers
from nanoforge.tokenizer import CharTokenizer
from test_robustness import interrupt_at
from nanoforge.training import TrainingStopped, get_lr
from train import train

OPTIONS = {
    "rope": dict(pos_emb="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu"),
    "qk_norm": dict(qk_norm=True),
    "gqa": dict(n_kv_head=2),
    "mqa+rope": dict(n_kv_head=1, pos_emb="rope"),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=5.0),
    "all": dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, n_kv_head=2, tie_embeddings=False,
                logit_softcap=15.0, bias=False),
}
VOCAB = 40


def small_model(options, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=64, **options)).eval()
    with torch.no_grad():  # sharper distributions than the N(0, 0.02) init: greedy has clear winners
        model.transformer.wte.weight.mul_(20)
    return model


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_is_causal(name):
    model = small_model(OPTIONS[name])
    idx = torch.randint(0, VOCAB, (2, 16))
    logits, _ = model(idx)
    for t in (0, 9):
        changed = idx.clone()
        changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % VOCAB
        changed_logits, _ = model(changed)
        torch.testing.assert_close(changed_logits[:, : t + 1], logits[:, : t + 1], rtol=0, atol=1e-5)
        assert not torch.allclose(changed_logits[:, t + 1 :], logits[:, t + 1 :])


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_explicit_attention_path_equals_fused_path_with_and_without_cache(name):
    model = small_model(OPTIONS[name])
    attn, x = model.transformer.h[0].attn, torch.randn(2, 9, 64)
    torch.testing.assert_close(attn(x, return_weights=True)[0], attn(x), rtol=1e-5, atol=1e-5)
    caches = [KVCache(model.config, 2, "cpu", torch.float32) for _ in range(2)]
    for start, end in [(0, 4), (4, 7), (7, 8)]:  # a prefill, a chunk at an offset, one token
        fast = attn(x[:, start:end], kv_cache=caches[0].layers[0])
        slow, weights = attn(x[:, start:end], return_weights=True, kv_cache=caches[1].layers[0])
        torch.testing.assert_close(slow, fast, rtol=1e-5, atol=1e-5)
        assert weights.shape == (2, 4, end - start, end)
        caches[0].pos = caches[1].pos = end
    patterns = model.attention_weights(torch.randint(0, VOCAB, (1, 16)))
    torch.testing.assert_close(patterns[1].sum(-1), torch.ones(1, 4, 16))


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_engine_greedy_equals_reference(name):
    model = small_model(OPTIONS[name])
    tokenizer = CharTokenizer.train("".join(chr(65 + i) for i in range(VOCAB)))
    prompts = torch.randint(0, VOCAB, (2, 5))
    expected = model.generate(prompts, max_new_tokens=20, temperature=0)[:, 5:]  # 25 > block_size 16: slides
    samples = Generator(model, tokenizer).generate(prompts.tolist(), max_new_tokens=20, temperature=0, slide=1)
    assert [s.ids for s in samples] == expected.tolist()


def test_gqa_cache_is_shaped_by_kv_heads_and_zero_init_starts_blocks_as_identity():
    model = small_model(dict(n_kv_head=1, zero_init_proj=True))
    assert KVCache(model.config, 3, "cpu", torch.float32).layers[0].k.shape == (3, 1, 16, 16)
    x = torch.randn(2, 8, 64)
    torch.testing.assert_close(model.transformer.h[0](x), x)


def test_untied_checkpoint_loads_for_inference_with_its_own_lm_head(tmp_path, data_dir):
    cfg = tiny_config(data_dir, tmp_path / "run", max_iters=4, eval_interval=4, tie_embeddings=False,
                      vocab_multiple=64)
    train(cfg)
    model, tokenizer = loading.load_model(str(tmp_path / "run"), "cpu")
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.shape == (tokenizer.vocab_size, 32)  # the padding rows cut off
    saved = checkpoint.load(str(tmp_path / "run" / "latest.safetensors")).model_state
    assert torch.equal(model.lm_head.weight, saved["lm_head.weight"][: tokenizer.vocab_size])


@pytest.mark.parametrize("options, refused", [
    (dict(pos_emb="rope"), "pos_emb='rope'"),
    (dict(norm="rmsnorm"), "norm='rmsnorm'"),
    (dict(n_kv_head=1), "n_kv_head=1"),
    (dict(tie_embeddings=False), "tie_embeddings=False"),
    (dict(mlp="relu2"), "mlp='relu2'"),
    (dict(qk_norm=True), "qk_norm=True"),
    (dict(logit_softcap=15.0), "logit_softcap=15.0"),
])
def test_gpt2_export_and_init_refuse_options_gpt2_cannot_hold(tmp_path, data_dir, options, refused):
    with pytest.raises(gpt2.GPT2Error, match=f"sets {refused}, which Hugging Face's GPT-2 cannot express"):
        gpt2.export(small_model(options), str(tmp_path / "hf"))
    cfg = tiny_config(data_dir, tmp_path / "run", init_from="gpt2", **options)
    with pytest.raises(gpt2.GPT2Error, match=f"cannot hold {refused}: leave"):
        gpt2.init_for_training(cfg, None)


def test_n_kv_head_equal_to_n_head_is_gpt2s_own_attention(tmp_path, data_dir):
    """Export and GPT-2 loading share one list of what GPT-2 cannot hold: n_kv_head == n_head is GPT-2."""
    gpt2.export(small_model(dict(n_kv_head=4)), str(tmp_path / "hf"))  # n_head 4: accepted
    cfg = tiny_config(data_dir, tmp_path / "run", init_from=str(tmp_path / "no-gpt2-here"), n_kv_head=2)  # n_head 2
    with pytest.raises(gpt2.GPT2Error) as refused:
        gpt2.init_for_training(cfg, None)
    assert "cannot hold" not in str(refused.value)  # it got past the architecture, to finding the weights


def test_wsd_schedule_values_at_its_boundaries(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path, lr_schedule="wsd", max_iters=100, warmup_iters=10, decay_fraction=0.2, lr_decay_iters=0,
                      learning_rate=1e-3, min_lr=1e-5)
    assert get_lr(0, cfg) == pytest.approx(1e-3 / 11)  # warmup, as for cosine
    assert get_lr(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert get_lr(10, cfg) == get_lr(50, cfg) == get_lr(80, cfg) == 1e-3  # stable until the last 20 steps
    assert get_lr(81, cfg) == pytest.approx(1e-3 - (1e-3 - 1e-5) / 20)
    assert get_lr(90, cfg) == pytest.approx((1e-3 + 1e-5) / 2)  # halfway down
    assert get_lr(99, cfg) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 20)  # the last update
    assert get_lr(100, cfg) == get_lr(150, cfg) == pytest.approx(1e-5)  # a run extended past max_iters


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


MUON = dict(optimizer="muon", pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False,
            zero_init_proj=True, lr_schedule="wsd", dropout=0.1)


def test_muon_run_resumes_bitwise_and_elapsed_s_counts_on(tmp_path, data_dir, monkeypatch):
    settings = dict(max_iters=12, eval_interval=4, log_interval=2, checkpoint_interval=6, **MUON)
    straight = tiny_config(data_dir, tmp_path / "straight", **settings)
    train(straight)
    resumed = tiny_config(data_dir, tmp_path / "resumed", **settings)
    with monkeypatch.context() as m:
        interrupt_at(m, 7)  # mid log window, after the checkpoint of step 6
        with pytest.raises(TrainingStopped):
            train(resumed)
    before = read_log(tmp_path / "resumed")[-1]["elapsed_s"]
    # The optimizer state holds Muon's momentum and AdamW's moments, under one set of indices.
    saved = checkpoint.load(tmp_path / "resumed" / "latest.safetensors").optimizer_state
    assert {"momentum_buffer", "exp_avg"} <= {name for s in saved["state"].values() for name in s}
    train(resumed, resume=True)

    a = checkpoint.load(tmp_path / "straight" / "latest.safetensors")
    b = checkpoint.load(tmp_path / "resumed" / "latest.safetensors")
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    for index, state in a.optimizer_state["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, b.optimizer_state["state"][index][name]), (index, name)
    keys = ("step", "loss", "lr", "train_loss", "val_loss")
    records = read_log(tmp_path / "resumed")
    assert [{k: r.get(k) for k in keys} for r in read_log(tmp_path / "straight")] == \
           [{k: r.get(k) for k in keys} for r in records]
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[3] > before  # step 8, after the resume, counts on


def test_optimizers_state_dict_round_trips_through_a_fresh_pair():
    def pair(model):
        matrices = [p for p in model.parameters() if p.dim() == 2]
        vectors = [p for p in model.parameters() if p.dim() < 2]
        return Optimizers(torch.optim.Muon(matrices, lr=0.02), torch.optim.AdamW(vectors, lr=1e-3))

    model = small_model(dict(tie_embeddings=False))
    optimizer = pair(model)
    model(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8)))[1].backward()
    optimizer.step()
    restored = pair(model)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    for index, state in optimizer.state_dict()["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, restored.state_dict()["state"][index][name])


def test_muon_groups_take_their_own_learning_rate_keys():
    """Each group follows the schedule, scaled to its own peak key: the blocks' matrices (Muon) to matrix_lr,
    embeddings, lm_head and vectors (AdamW) to embedding_lr, unembedding_lr and learning_rate."""
    from nanoforge.optim import build_optimizer, set_lr

    cfg = tiny_config(".", ".", optimizer="muon", tie_embeddings=False, learning_rate=0.004, matrix_lr=0.04,
                      embedding_lr=0.2, unembedding_lr=0.002)
    model = small_model(dict(tie_embeddings=False))
    optimizer = build_optimizer(model, cfg, "cpu")
    set_lr(optimizer, 0.001, cfg)  # a quarter of learning_rate's peak
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        expected = {"matrix_lr": 0.01, "embedding_lr": 0.05, "unembedding_lr": 0.0005, "learning_rate": 0.001}
        assert group["lr"] == pytest.approx(expected[group["lr_key"]])
        for p in group["params"]:
            name = names[id(p)]
            kind = ("embedding_lr" if name.startswith(("transformer.wte", "transformer.wpe")) else "unembedding_lr"
                    if name.startswith("lm_head") else "learning_rate" if p.dim() < 2 else "matrix_lr")
            assert group["lr_key"] == kind, name
