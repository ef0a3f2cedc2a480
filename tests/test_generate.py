"""The generation engine against the cache-free reference (GPT.generate), its sampling
filters on hand-made distributions, seeds and batches, stop conditions, streaming text and
sample.py's generation flags."""

import dataclasses
import io
import sys

import pytest
import torch

from nanoforge import checkpoint
import sample
from conftest import TINY_TEXT, run_cli
from nanoforge.cpu_decoding import OneQueryAttention
from nanoforge.engine import Generator, KVCache
from nanoforge.machine import probe
from nanoforge.sampling import (SettingError, TextStream, candidates, lookup_draft, penalize_repetition,
                                sample_from)
from model import GPT, GPTConfig
from nanoforge.cpu_decoding import Int8Linear
from nanoforge.tokenizer import ByteTokenizer, CharTokenizer

CHARS = CharTokenizer.train(TINY_TEXT)


def small_model(seed=0, vocab_size=CHARS.vocab_size, sharpen=20, **overrides):
    torch.manual_seed(seed)
    cfg = dict(block_size=16, vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=True)
    cfg.update(overrides)
    model = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():  # sharper distributions than the N(0, 0.02) init: greedy has clear winners
        model.transformer.wte.weight.mul_(sharpen)
    return model


def char_generator(**overrides):
    return Generator(small_model(**overrides), CHARS)


def test_generator_samples_vary_with_the_seed_only():
    gen = char_generator(sharpen=3)
    a, b = (gen.generate(["First"], max_new_tokens=30, seed=s)[0].text for s in (1, 2))
    assert a != b and a == gen.generate(["First"], max_new_tokens=30, seed=1)[0].text


@pytest.mark.parametrize("prompt_len", [3, 16])
def test_cached_greedy_equals_reference_across_block_size(prompt_len):
    model = small_model()
    prompts = torch.randint(0, CHARS.vocab_size, (2, prompt_len))
    expected = model.generate(prompts, max_new_tokens=40, temperature=0)[:, prompt_len:]  # 40 > block_size 16
    samples = Generator(model, CHARS).generate(prompts.tolist(), max_new_tokens=40, temperature=0, slide=1)
    assert [s.ids for s in samples] == expected.tolist()


@pytest.mark.parametrize("chunks", [[5, 1, 1, 1, 1], [3, 4, 1, 6, 2], [16]])
def test_cached_logits_equal_full_forward(chunks):
    """Prefill, chunks at an offset (the bottom-right aligned mask) and single-token decode
    steps all give the logits of one full forward pass."""
    model = small_model()
    idx = torch.randint(0, CHARS.vocab_size, (3, sum(chunks)))
    full, _ = model(idx)
    cache, start = KVCache(model.config, 3, "cpu", torch.float32), 0
    for n in chunks:
        logits, _ = model(idx[:, start : start + n], kv_cache=cache)
        torch.testing.assert_close(logits, full[:, start : start + n], rtol=1e-5, atol=1e-5)
        start = cache.pos = start + n


def test_explicit_attention_path_with_cache_equals_sdpa_path():
    model = small_model()
    attn, x = model.transformer.h[0].attn, torch.randn(2, 9, 64)
    caches = [KVCache(model.config, 2, "cpu", torch.float32) for _ in range(2)]
    for start, end in [(0, 4), (4, 7), (7, 8), (8, 9)]:
        fast = attn(x[:, start:end], kv_cache=caches[0].layers[0])
        slow, weights = attn(x[:, start:end], return_weights=True, kv_cache=caches[1].layers[0])
        torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
        assert weights.shape == (2, 4, end - start, end)
        caches[0].pos = caches[1].pos = end


# probabilities 0.5, 0.2, 0.15, 0.1, 0.05 for tokens 3, 0, 4, 1, 2
HAND_MADE = torch.tensor([0.2, 0.1, 0.05, 0.5, 0.15]).log()


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (None, 1.0, {0, 1, 2, 3, 4}), (2, 1.0, {3, 0}), (None, 0.5, {3}), (None, 0.6, {3, 0}),
    (None, 0.8, {3, 0, 4}), (None, 0.86, {3, 0, 4, 1}), (3, 0.6, {3, 0}), (1, 0.99, {3}),
])
def test_top_k_and_top_p_sample_only_from_the_allowed_set(top_k, top_p, allowed):
    values, ids = candidates(HAND_MADE.expand(4000, 5), top_k, top_p)
    kept = values[0] > float("-inf")
    assert set((ids[0][kept] if ids is not None else torch.arange(5)[kept]).tolist()) == allowed
    picked = sample_from(values, ids, torch.rand(4000, generator=torch.Generator().manual_seed(0)))
    assert set(picked.tolist()) == allowed  # never outside, and every allowed token turns up
    # the extremes of the uniform draw stay inside too
    edges = sample_from(values[:2], ids[:2] if ids is not None else None, torch.tensor([0.0, 1 - 2**-24]))
    assert set(edges.tolist()) <= allowed


def test_sampling_frequencies_follow_the_renormalised_distribution():
    values, ids = candidates(HAND_MADE.expand(20000, 5), None, 0.8)  # tokens 3, 0, 4: 0.5, 0.2, 0.15 of 0.85
    picked = sample_from(values, ids, torch.rand(20000, generator=torch.Generator().manual_seed(1)))
    freq = torch.bincount(picked, minlength=5).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.2, 0, 0, 0.5, 0.15]) / 0.85, atol=0.015, rtol=0)


def test_repetition_penalty_lowers_only_tokens_already_seen():
    logits = torch.tensor([[2.0, -1.0, 3.0, -0.5]])
    seen = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(penalize_repetition(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 3.0, -0.5]]))


def test_seed_fixes_output_and_batch_row_i_equals_single_run_with_seed_plus_i():
    gen = char_generator(sharpen=3)
    prompts = ["First", "All:\nSpeak", "Re"]  # different lengths: longer prompts are fed in lockstep
    settings = dict(max_new_tokens=30, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3, slide=4)
    batch = gen.generate(prompts, seed=11, **settings)
    assert batch == gen.generate(prompts, seed=11, **settings)
    assert batch != gen.generate(prompts, seed=12, **settings)
    for i, prompt in enumerate(prompts):
        assert gen.generate([prompt], seed=11 + i, **settings) == [batch[i]]
    greedy = gen.generate(prompts, max_new_tokens=30, temperature=0)
    assert [gen.generate([p], max_new_tokens=30, temperature=0)[0] for p in prompts] == greedy


def test_stop_string_and_end_of_text_end_each_sample_separately():
    gen = char_generator()
    prompts = ["First", "All:"]
    free = gen.generate(prompts, max_new_tokens=30, temperature=0)
    stop = free[0].text[8:10]
    stopped = gen.generate(prompts, max_new_tokens=30, temperature=0, stop=[stop])
    for before, after in zip(free, stopped):
        at = before.text.find(stop)
        if at < 0:
            assert after == before and after.finish_reason == "length"
        else:
            assert after.text == before.text[:at] and after.finish_reason == "stop"
            assert CHARS.decode(after.ids).startswith(before.text[:at] + stop)
    assert stopped[0].finish_reason == "stop"

    eot = free[0].ids[5]  # pretend a token the first sample produces is end-of-text
    gen.tokenizer = CharTokenizer(CHARS.chars)
    gen.tokenizer.eot_id = eot
    ended = gen.generate(prompts, max_new_tokens=30, temperature=0)
    for before, after in zip(free, ended):
        n = before.ids.index(eot) + 1 if eot in before.ids else 30
        assert after.ids == before.ids[:n]
        assert after.finish_reason == ("eot" if eot in before.ids else "length")
        assert after.text == CHARS.decode(before.ids[: n - 1] if eot in before.ids else before.ids)
    assert gen.generate(prompts, max_new_tokens=30, temperature=0, stop_at_eot=False) == free


def test_stream_never_splits_a_multibyte_character_and_holds_back_stop_prefixes():
    text = "héllo wörld € 😀!"
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in text.encode()] + [stream.finish()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert pieces[text.encode().index("😀".encode()) + 3] == "😀"  # released with its 4th byte

    stream = TextStream(ByteTokenizer(), stop=["\n\n"])
    out = [stream.push(b) for b in b"ab\ncd\n"]
    assert out == ["a", "b", "", "\nc", "d", ""]  # a newline waits to see if a second follows
    assert stream.push(ord("\n")) == "" and stream.stopped and stream.text == "ab\ncd"

    stream = TextStream(ByteTokenizer())  # invalid UTF-8 comes out as the tokenizer decodes it
    raw = [0xFF, 0x41, 0xE2, 0x82, 0x42]
    assert "".join([stream.push(b) for b in raw] + [stream.finish()]) == ByteTokenizer().decode(raw)


def test_streamed_pieces_add_up_to_each_samples_text():
    gen = Generator(small_model(vocab_size=257), ByteTokenizer())
    pieces, ends = {0: [], 1: []}, []
    samples = gen.generate(["héllo", "€"], max_new_tokens=60, temperature=1.5, seed=3, stop_at_eot=False,
                           on_text=lambda row, text, done: (pieces[row].append(text), done and ends.append(row)))
    assert sorted(ends) == [0, 1]
    for row, s in enumerate(samples):
        assert "".join(pieces[row]) == s.text == ByteTokenizer().decode(s.ids)


@pytest.fixture
def char_ckpt(tmp_path):
    model = small_model(block_size=32)
    info = {"model": dataclasses.asdict(model.config), "tokenizer": CHARS.to_dict()}
    path = tmp_path / "model.safetensors"
    checkpoint.save(str(path), model.state_dict(), info)
    return path


def run_sample(capsys, monkeypatch, *args, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    sample.main([str(a) for a in args])
    return capsys.readouterr()  # .out, .err


def test_cli_stop_and_no_stream(char_ckpt):
    free = Generator.from_checkpoint(char_ckpt, "cpu").generate(["First"], max_new_tokens=40, temperature=0)[0]
    stop = free.text[10:12]
    result = run_cli("sample.py", "--ckpt", char_ckpt, "--prompt", "First", "--num-samples", "2",
                     "--max-new-tokens", "40", "--temperature", "0", "--stop", stop.replace("\n", "\\n"), "--no-stream")
    assert result.returncode == 0, result.stderr
    expected = "First" + free.text[: free.text.find(stop)] + "\n" + "-" * 40 + "\n"
    assert result.stdout == expected * 2


def test_cli_streaming_prints_what_no_stream_prints(char_ckpt, capsys, monkeypatch):
    args = ["--ckpt", char_ckpt, "--prompt", "All", "--num-samples", "3", "--max-new-tokens", "40",
            "--top-p", "0.9", "--stop", "\\n\\n", "--device", "cpu"]
    streamed = run_sample(capsys, monkeypatch, *args).out
    assert streamed == run_sample(capsys, monkeypatch, *args, "--no-stream").out
    assert streamed.count("-" * 40 + "\n") == 3 and streamed.startswith("All")


def test_cli_interactive_reads_prompts_until_end_of_input(char_ckpt, capsys, monkeypatch):
    result = run_sample(capsys, monkeypatch, "--ckpt", char_ckpt, "--interactive", "--num-samples", "1",
                     "--max-new-tokens", "20", "--temperature", "0", stdin="First\nZebra ✓\nAll:\n")
    gen = Generator.from_checkpoint(char_ckpt, "cpu")
    expected = [s.text for s in (gen.generate([p], max_new_tokens=20, temperature=0)[0] for p in ("First", "All:"))]
    assert result.out == "".join(t + "\n" + "-" * 40 + "\n" for t in expected)
    assert "'✓' (U+2713)" in result.err  # a line the model cannot read is refused, the session goes on


@pytest.mark.parametrize("flag, value, message", [
    ("--top-p", "-0.5", "--top-p must be in (0, 1]"), ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--temperature", "-1", "--temperature must be at least 0"), ("--top-k", "-3", "--top-k must be at least 0"),
    ("--repetition-penalty", "0", "--repetition-penalty must be above 0"),
    ("--slide", "33", "--slide must be between 1 and the model's block_size 32"),
    ("--max-new-tokens", "0", "--max-new-tokens must be at least 1"),
    ("--num-samples", "0", "--num-samples must be at least 1"),
])
def test_cli_bad_flags_give_one_line_errors(char_ckpt, capsys, monkeypatch, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        run_sample(capsys, monkeypatch, "--ckpt", char_ckpt, flag, value)
    error = str(exit_info.value.code)
    assert error.startswith("sample.py: error: ") and message in error and "\n" not in error


def test_compiled_decode_step_matches_eager_without_recompiling():
    torch._dynamo.reset()
    model = small_model(n_layer=1, n_embd=32, n_head=2)
    eager = Generator(model, CHARS).generate(["First", "All:"], max_new_tokens=30, temperature=0)
    compiled = Generator(model, CHARS, compile=True)
    from torch._dynamo.utils import counters

    counters.clear()
    assert compiled.generate(["First", "All:"], max_new_tokens=30, temperature=0) == eager
    # One graph for every cache length, and one more where the cache's last position is written
    # (the slice up to it then spans the whole buffer, a case dynamo specialises): not one per step.
    assert counters["stats"]["unique_graphs"] <= 2


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_decoder_logits_equal_the_models(dtype, tolerance):
    """The decoding copy (packed matrices on a CPU that runs them, last-position lm_head) gives, after a prefill and
    at every decode step, the logits of the model's own full forward pass in the same dtype."""
    model = small_model().to(dtype)
    gen = Generator(model, CHARS)
    packs = {torch.float32: probe().packed_linear, torch.bfloat16: probe().packed_linear_bf16}[dtype]
    assert type(gen.decoder.transformer.h[0].mlp.c_fc).__name__ == ("PackedLinear" if packs else "Linear")
    attention = type(gen.decoder.transformer.h[0].attn)
    assert attention is (OneQueryAttention if dtype == torch.bfloat16 else model.transformer.h[0].attn.__class__)
    idx = torch.randint(0, CHARS.vocab_size, (3, 12))
    full = model(idx)[0].float()
    cache = KVCache(model.config, 3, "cpu", dtype)
    steps = [gen.prefill(idx[:, :5], cache)] + [gen.decode_one_token(idx[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 4:], rtol=tolerance, atol=tolerance)
    assert next(gen.decoder.parameters()) is next(model.parameters())  # shared, not copied


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_one_query_attention_equals_the_fused_kernel(n_kv_head):
    """Decoding's attention for one new query (OneQueryAttention) against the model's fused path,
    grouped-query attention included: equal in float32, and in bfloat16 to its round-off."""
    model = small_model(n_kv_head=n_kv_head)
    fused = model.transformer.h[0].attn
    q = torch.randn(3, 4, 1, 16)
    k, v = torch.randn(2, 3, n_kv_head, 9, 16).unbind(0)  # 9 cached positions
    one_query = OneQueryAttention.attend(fused, q, k, v)
    torch.testing.assert_close(one_query, fused.attend(q, k, v), rtol=1e-5, atol=1e-6)
    low = OneQueryAttention.attend(fused, q.bfloat16(), k.bfloat16(), v.bfloat16())
    torch.testing.assert_close(low.float(), one_query, rtol=0.02, atol=0.02)


def test_int8_linear_error_is_bounded():
    """Rounding moves each weight by at most half its row's scale; the layer then computes
    x @ dequantized.T in bfloat16, so its output is that product to bfloat16 round-off."""
    linear = torch.nn.Linear(64, 48)
    int8 = Int8Linear(linear)
    assert ((int8.dequantized() - linear.weight).abs() <= int8.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 64).bfloat16()
    expected = x.float() @ int8.dequantized().T + linear.bias
    torch.testing.assert_close(int8(x).float(), expected, rtol=2e-2, atol=2e-2)
    bound = x.float().abs() @ (int8.scale[:, None] / 2).expand(48, 64).T  # sum_i |x_i| * scale_o / 2
    assert ((expected - linear(x.float())).abs() <= bound + 1e-5).all()


def test_int8_generator_stays_close_to_float32():
    model = small_model()
    fp32, int8 = Generator(model, CHARS), Generator(model, CHARS, quantize="int8")
    assert int8.decoder.transformer.h[0].attn.c_attn.weight.dtype == torch.int8
    idx = torch.randint(0, CHARS.vocab_size, (2, 10))
    logits = [g.prefill(idx, KVCache(model.config, 2, "cpu", g.dtype)) for g in (fp32, int8)]
    assert (logits[1] - logits[0]).abs().max() < 0.02 * logits[0].abs().max()
    prompts = idx.tolist()
    assert [s.ids for s in int8.generate(prompts, max_new_tokens=20, temperature=0)] == \
        [s.ids for s in fp32.generate(prompts, max_new_tokens=20, temperature=0)]
    assert next(model.parameters()).dtype == torch.float32  # the model itself is left alone


def test_cli_quantize_int8_prints_the_int8_generators_text(char_ckpt, capsys, monkeypatch):
    out = run_sample(capsys, monkeypatch, "--ckpt", char_ckpt, "--prompt", "First", "--num-samples", "1",
                     "--max-new-tokens", "20", "--temperature", "0", "--quantize", "int8", "--no-stream").out
    gen = Generator.from_checkpoint(char_ckpt, "cpu", quantize="int8")
    assert out == "First" + gen.generate(["First"], max_new_tokens=20, temperature=0)[0].text + "\n" + "-" * 40 + "\n"
    with pytest.raises(SystemExit) as refused:  # int8 decodes in bfloat16 from the checkpoint's own weights
        run_sample(capsys, monkeypatch, "--ckpt", char_ckpt, "--quantize", "int8", "--dtype", "bfloat16")
    assert str(refused.value.code) == ("sample.py: error: --quantize int8 decodes in bfloat16 from the checkpoint's "
                                       "own weights: drop --dtype bfloat16")


def test_int8_is_refused_off_the_cpu():
    """Int8Linear runs torch's CPU int8 kernel; elsewhere the generator says so instead of running slower."""
    with pytest.raises(SettingError, match="quantize must be off on meta"):
        Generator(small_model().to("meta"), CHARS, quantize="int8")


def test_lookup_draft_takes_what_followed_the_latest_match():
    assert lookup_draft([5, 1, 2, 3, 9, 1, 2, 3, 7, 1, 2], k=2) == [3, 7]  # longest n first, latest match
    assert lookup_draft([4, 8, 6], k=3) == [] and lookup_draft([1, 1], k=0) == []


@pytest.mark.parametrize("sharpen, prompt", [(20, "First Citizen"), (3, "All: All: All:")])
def test_prompt_lookup_gives_plain_greedy_tokens(sharpen, prompt):
    gen = char_generator(sharpen=sharpen)
    accepted, verify = [], gen.verify_draft

    def counting_verify(*args):
        logits, kept = verify(*args)
        accepted.append(len(kept))
        return logits, kept

    gen.verify_draft = counting_verify
    for max_new in (5, 40):  # 40 passes block_size 16: the window slides between verifications
        plain = gen.generate([prompt], max_new_tokens=max_new, temperature=0)
        assert gen.generate([prompt], max_new_tokens=max_new, temperature=0, lookup=4) == plain
    assert sum(accepted) > 0  # drafts were verified and kept, not only rejected


def test_prompt_lookup_refuses_sampling_and_batches():
    gen = char_generator()
    for settings in (dict(temperature=1.0), dict(temperature=0, repetition_penalty=1.2)):
        with pytest.raises(SettingError, match="lookup must be 0 \\(off\\), or above 0 with one prompt"):
            gen.generate(["First"], lookup=2, **settings)
    with pytest.raises(SettingError):
        gen.generate(["First", "All"], temperature=0, lookup=2)
