"""explain.py and inspect_model.py: what they report is what the model computes (probabilities,
logit lens, the stage-by-stage trace), for char, byte and GPT-2 BPE tokenizers; the HTML page is
self-contained, escapes token text and works in a real headless browser."""

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from nanoforge import inspect_html
from conftest import TINY_TEXT, offline_page, run_cli, tiny_config
from nanoforge.inspect_model import explain, logit_lens, token_label, trace
from model import GPT, GPTConfig
from nanoforge.tokenizer import BPETokenizer, ByteTokenizer, CharTokenizer, with_chat_tokens


def tiny_model(vocab_size, bias=True, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, bias=bias)).eval()


def trained_run(tmp_path_factory, kind, block_size):
    """A run directory with a checkpoint of a tiny model trained for a few steps on the tiny corpus."""
    from nanoforge.preparation import prepare
    from train import train

    root = tmp_path_factory.mktemp(f"{kind}_run")
    corpus = root / "corpus.txt"
    corpus.write_text(TINY_TEXT, encoding="utf-8")
    prepare(str(corpus), kind, str(root / "data"), 0.1)
    train(tiny_config(root / "data", root / "run", max_iters=20, block_size=block_size))
    return root / "run"


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "char", 16)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    return trained_run(tmp_path_factory, "byte", 96)


CASES = [(CharTokenizer(sorted(set(TINY_TEXT))), "First Citizen:\nSpeak,"), (ByteTokenizer(), "Ünï 日本 <b>")]


@pytest.mark.parametrize("tokenizer,text", CASES, ids=["char", "byte"])
@pytest.mark.parametrize("bias", [True, False])
def test_probabilities_patterns_and_lens_are_the_models(tokenizer, text, bias):
    model = tiny_model(tokenizer.vocab_size, bias)
    ids = tokenizer.encode(text)
    idx = torch.tensor([ids])
    e = explain(model, tokenizer, ids)
    logits, _ = model(idx)
    torch.testing.assert_close(e.probs, F.softmax(logits[0], dim=-1))
    T = len(ids)
    assert e.patterns.shape == (2, 2, T, T)
    torch.testing.assert_close(e.patterns.sum(-1), torch.ones(2, 2, T))
    assert (e.patterns.triu(diagonal=1) == 0).all()
    lens = list(logit_lens(model, idx))
    assert len(lens) == model.config.n_layer + 1
    torch.testing.assert_close(lens[-1], logits[0], rtol=0, atol=0)  # the same modules on the same stream
    assert e.lens_ids[-1, :, 0].tolist() == logits[0].argmax(-1).tolist()
    loss = F.cross_entropy(logits[0, :-1], idx[0, 1:]).item()
    assert e.loss() == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("tokenizer,text", CASES, ids=["char", "byte"])
def test_trace_follows_the_model_stage_by_stage(tokenizer, text):
    model = tiny_model(tokenizer.vocab_size)
    idx = torch.tensor([tokenizer.encode(text)])
    stages = trace(model, idx)
    logits, _ = model(idx)
    torch.testing.assert_close(stages[-1].value, F.softmax(logits, dim=-1))
    # Each block's last stage is what the real block outputs (captured by a hook during forward).
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in model.transformer.h]
    model(idx)
    for h in hooks:
        h.remove()
    block_ends = [[s for s in stages if s.block == i][-1].value for i in range(model.config.n_layer)]
    for traced, real in zip(block_ends, outputs):
        torch.testing.assert_close(traced, real)
    weights = [s.value for s in stages if s.name.startswith("softmax: attention weights")]
    for traced, real in zip(weights, model.attention_weights(idx)):
        torch.testing.assert_close(traced, real)
    masked = [s.value for s in stages if s.name.startswith("masked")][0]
    T = idx.size(1)
    assert torch.isinf(masked[..., torch.ones(T, T, dtype=torch.bool).triu(1)]).all()
    names = [s.name for s in stages]
    for word in ("token embeddings", "position embeddings", "norm (ln_1)", "queries Q", "scores Q K^T", "scaled by",
                 "heads merged", "output projection", "MLP up-projection", "nonlinearity", "MLP down-projection",
                 "final norm", "un-embedding"):
        assert any(word in n for n in names), word


def test_attention_math_steps_are_its_own_intermediates():
    model = tiny_model(50)
    attn = model.transformer.h[0].attn
    q, k, v = torch.randn(3, 1, 2, 5, 16).unbind(0)
    steps = {}
    y, weights = attn.attention_math(q, k, v, steps)
    torch.testing.assert_close(steps["scaled"], steps["scores"] / 4.0)
    torch.testing.assert_close(F.softmax(steps["masked"], dim=-1), weights)
    torch.testing.assert_close(attn.attention_math(q, k, v)[0], y)


def test_token_labels_escape_partial_utf8_and_newlines():
    byte = ByteTokenizer()
    assert [token_label(byte, i) for i in byte.encode("a\n日")] == ["a", "\\n", "\\xe6", "\\x97", "\\xa5"]
    assert token_label(byte, byte.eot_id) == "<|endoftext|>"
    assert token_label(CharTokenizer(["\t", "x"]), 0) == "\\t"
    assert token_label(CharTokenizer(["\x1b", "x"]), 0) == "\\x1b"  # no control character reaches a terminal
    bpe = BPETokenizer.train(["hello world " * 20], 260)
    for tokenizer in (bpe, with_chat_tokens(bpe)):  # a chat model's labels are its base tokenizer's
        assert [token_label(tokenizer, i) for i in tokenizer.encode("日")] == ["\\xe6", "\\x97", "\\xa5"]
    chat = with_chat_tokens(bpe)
    assert token_label(chat, chat.chat_ids["<|user_start|>"]) == "<|user_start|>"


def test_page_data_holds_no_markup_and_no_double_slash():
    data = {"label": "</script><b>&amp; http://x.y"}
    text = inspect_html.script_json(data)
    assert not {"<", ">", "&"} & set(text) and "//" not in text
    assert json.loads(text) == data  # the escapes are JSON's own: the page reads the same text


def test_terminal_output_heatmap_trace_and_cropping(char_run):
    r = run_cli("explain.py", "--ckpt", char_run, "--prompt", "First Citizen:\nBefore we", "--layer", "1",
                "--head", "0", "--trace", "--max-tokens", "12", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "kept its last 12" in r.stderr
    assert "12 tokens (char tokenizer)" in r.stdout
    assert re.search(r"loss over the prompt: \d+\.\d+ \(mean over 11 predictions\)", r.stdout)
    assert "L1 H1: " in r.stdout and "layer 1 head 0: rows are queries" in r.stdout
    for stage in ("token ids", "block 1:", "masked: -inf", "softmax: next-token probabilities"):
        assert stage in r.stdout
    assert re.search(r"masked: -inf above the diagonal.*\[[^]]*-inf", r.stdout)  # the first query's masked scores
    rows = [line for line in r.stdout.splitlines() if re.match(r" +\d+ '", line) and " | " in line]
    assert len(rows) == 12 and len({row.index(" | ") for row in rows}) == 1  # the last row lines up too


def explain_main(*args):
    """explain.py run in this process (a subprocess would import torch again); returns its stdout."""
    import contextlib
    import io

    import explain as script

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        script.main([str(a) for a in args])
    return out.getvalue()


def test_bad_arguments_are_one_line_errors(char_run):
    with pytest.raises(SystemExit, match=r"^explain.py: error: this model has layers 0..1 and heads 0..1; got"):
        explain_main("--ckpt", char_run, "--prompt", "First", "--layer", "9", "--head", "0")
    with pytest.raises(SystemExit, match=r"^explain.py: error: text contains 2 character.* not in this model's"):
        explain_main("--ckpt", char_run, "--prompt", "ünknown ☃")
    # checked before the model loads: a missing checkpoint is not what they report
    missing = char_run.parent / "no-such-run"
    for args, message in [(["--layer", "0"], "--layer and --head go together"), (["--top", "0"], "--max-tokens and --top must be at least 1"),
                          (["--max-tokens", "0"], "--max-tokens and --top must be at least 1"),
                          (["--prompt", ""], "--prompt is empty")]:
        with pytest.raises(SystemExit, match=f"^explain.py: error: {message}"):
            explain_main("--ckpt", missing, "--prompt", "First", *args)


NASTY = "<script>alert(1)</script> see http://example.org // or https://x.y 日本"


def write_page(byte_run, tmp_path, *extra):
    page = tmp_path / "page.html"
    assert "wrote " in explain_main("--ckpt", byte_run, "--prompt", NASTY, "--html", page, *extra)
    return page


def test_html_is_self_contained_and_escapes_token_text(byte_run, tmp_path):
    html = write_page(byte_run, tmp_path).read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "//" not in html
    assert not re.search(r"""(src|href)\s*=|@import|url\(""", html)
    assert html.count("<script") == 2 and "alert(1)" not in html.replace("alert(1)\\u003c", "")
    assert "\\\\xe6" in html  # the first byte of 日 alone is not UTF-8: shown escaped


def test_a_256_token_page_stays_small(tmp_path):
    """A 256-token page of a 4-layer, 4-head model (the quickstart's shape)."""
    tokenizer = CharTokenizer(sorted(set(TINY_TEXT)))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=256, vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_embd=32)).eval()
    e = explain(model, tokenizer, tokenizer.encode(TINY_TEXT[:256]))
    assert len(inspect_html.render(e, "long").encode()) < 1_000_000  # under a megabyte, as the docstring says


def test_html_page_works_in_headless_chromium(byte_run, tmp_path, chromium_path):
    page_path = write_page(byte_run, tmp_path)
    labels = [token_label(ByteTokenizer(), i) for i in ByteTokenizer().encode(NASTY)]
    errors = []
    with offline_page(chromium_path, errors) as page:
        page.goto(page_path.as_uri())
        assert page.locator("canvas.cell").count() == 2 * 2  # n_layer x n_head of the tiny run
        assert page.locator("#enlarged").is_hidden()
        page.locator("canvas.cell[data-layer='1'][data-head='1']").click()
        assert page.locator("#enlarged").is_visible()
        assert page.locator("#enlarged").get_attribute("data-layer") == "1"
        box = page.locator("#big").bounding_box()
        page.locator("#big").hover(position={"x": box["width"] - 3, "y": box["height"] - 3})  # the last cell
        assert "weight" in page.locator("#readout").inner_text()
        assert page.locator("#tokens .tok").all_inner_texts() == labels  # the <script> prompt shows as text
        shot = page.locator("#grid").screenshot()
    assert errors == []
    from PIL import Image
    import io

    image = Image.open(io.BytesIO(shot)).convert("L")
    low, high = image.getextrema()
    assert high - low > 100  # drawn, not blank


def test_png_per_layer(char_run, tmp_path):
    explain_main("--ckpt", char_run, "--prompt", "First Citizen", "--png", tmp_path / "png")
    assert sorted(os.listdir(tmp_path / "png")) == ["layer_0.png", "layer_1.png"]
    assert (tmp_path / "png" / "layer_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_init_from_a_hugging_face_gpt2_directory(tmp_path):
    from test_gpt2 import random_gpt2, tiny_bpe

    directory = tmp_path / "hf"
    random_gpt2(vocab_size=401).save_pretrained(directory)
    tiny_bpe(directory)
    out = explain_main("--init-from", directory, "--prompt", "Speak, speak. 日本", "--html", tmp_path / "p.html")
    assert "(bpe tokenizer)" in out and "L1 H3: " in out
    assert "'Speak' ',' ' speak' '.' ' ' '\\xe6' '\\x97' '\\xa5'" in out  # 日 is three byte tokens here


ARCH_OPTIONS = [dict(pos_emb="rope"), dict(norm="rmsnorm"), dict(mlp="relu2"), dict(mlp="swiglu"), dict(qk_norm=True),
                dict(n_kv_head=1), dict(tie_embeddings=False), dict(logit_softcap=5.0),
                dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, n_kv_head=1, tie_embeddings=False,
                     zero_init_proj=True, logit_softcap=15.0)]


@pytest.mark.parametrize("options", ARCH_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_trace_lens_and_patterns_follow_every_architecture_option(options):
    tokenizer, text = CASES[1]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_embd=32,
                          **options)).eval()
    if options.get("zero_init_proj"):  # zero projections would make every block the identity: perturb them
        for name, p in model.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, std=0.02)
    idx = torch.tensor([tokenizer.encode(text)])
    logits, _ = model(idx)
    stages = trace(model, idx)
    torch.testing.assert_close(stages[-1].value, F.softmax(logits, dim=-1))
    lens = list(logit_lens(model, idx))
    torch.testing.assert_close(lens[-1], logits[0], rtol=0, atol=0)
    e = explain(model, tokenizer, idx[0].tolist())
    torch.testing.assert_close(e.probs, F.softmax(logits[0], dim=-1))
    torch.testing.assert_close(e.patterns.sum(-1), torch.ones(2, 2, idx.size(1)))
    assert (e.patterns.triu(diagonal=1) == 0).all()
    names = " | ".join(s.name for s in stages)
    assert ("position embeddings" in names) == (options.get("pos_emb") != "rope")
    assert ("rotary" in names) == (options.get("pos_emb") == "rope")
    assert ("QK-norm" in names) == bool(options.get("qk_norm"))
    assert ("soft-capped" in names) == bool(options.get("logit_softcap"))
