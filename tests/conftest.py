import contextlib
import os
import shutil
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small corpus with real structure: a char model learns it in a few hundred steps.
TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40


def run_cli(script, *args, cwd=REPO, env=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )


@contextlib.contextmanager
def sigint_reaches_children():
    """Processes started inside this block get SIGINT at its default, so a test's Ctrl-C (SIGINT) reaches them
    as KeyboardInterrupt. Without it they inherit this run's disposition, and a run started as a background job
    of a non-interactive shell (`pytest &` in a script, some CI runners) has SIGINT ignored (POSIX): Python then
    installs no KeyboardInterrupt handler and the child rightly ignores the test's SIGINT. exec resets a handled
    signal to its default but keeps an ignored one ignored, hence a handler here while the child starts."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def find_chromium():
    """The Chromium the browser tests drive: $CHROMIUM, else `chromium` on PATH (Debian's /usr/bin/chromium).
    Without one, a plain `python -m pytest` skips the test, saying how to install it (pytest's -rs, set in
    pyproject.toml, lists the reason at the end of the run); under CI (CI=true) it fails, since CI must test the
    pages in a real browser, never skip them."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if os.path.exists(path):
        return path
    message = (f"no chromium at {path}, so the HTML page was not tested in a browser: apt-get install chromium "
               "(Debian; .ci/run does), or point CHROMIUM at a Chromium or Chrome binary")
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(message + " (CI never skips the browser tests)")
    pytest.skip(message)


@pytest.fixture
def chromium_path():
    """For every test that opens a page in a browser (explain's, serving's): find_chromium()'s path."""
    return find_chromium()


@contextlib.contextmanager
def offline_page(chromium_path, errors):
    """A page in headless Chromium for our offline HTML files: every console error, uncaught exception, dialog
    and request for anything but a local file (a CDN, a tracker) is appended to `errors`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", lambda d: errors.append("a dialog opened: " + d.message))
            page.on("request", lambda r: errors.append("request " + r.url) if not r.url.startswith("file:") else None)
            yield page
        finally:
            browser.close()


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path, corpus):
    """A char-level prepared data directory of the tiny corpus."""
    from nanoforge.preparation import prepare

    out = tmp_path / "data"
    prepare(str(corpus), "char", str(out), 0.1)
    return out


def tiny_config(data_dir, out_dir, **overrides):
    """A TrainConfig for a model small enough to train in seconds on a CPU."""
    from nanoforge.config import TrainConfig

    values = dict(
        data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=16,
        batch_size=4, max_iters=20, eval_interval=10, eval_iters=2, log_interval=5, warmup_iters=2,
        lr_decay_iters=20, device="cpu", dtype="float32",
    )
    values.update(overrides)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


# A tiny chat model that has learned a few conversations by heart, so that chat and eval tests see real
# replies ending at <|assistant_end|>. Trained once per test session (0.2 s of CPU).
CHAT_LESSONS = [
    [("hi", "yo")], [("reverse abc", "cba")], [("add 2 3", "5")], [("spell dog", "d o g")],
    [("hi", "yo"), ("bye", "ok")],
]


def train_chat_base(root):
    """A tiny char model trained a few steps on TINY_TEXT and the characters of the built-in chat tasks: the base
    the fine-tuning, SFT and LoRA tests start from. Its data goes to root/data; returns its run directory."""
    from nanoforge import preparation
    from train import train

    (root / "corpus.txt").write_text(TINY_TEXT + "reverse add count spell in 0123456789 abcdefghijklmnopqrstuvwxyz")
    preparation.prepare(str(root / "corpus.txt"), "char", str(root / "data"), 0.1)
    train(tiny_config(root / "data", root / "run", max_iters=4, eval_interval=4, block_size=32))
    return root / "run"


def conversation(*pairs):
    """[(user text, assistant text or None), ...] -> messages (a None reply ends the list at that user turn)."""
    messages = []
    for user, assistant in pairs:
        messages.append({"role": "user", "content": user})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return messages


@pytest.fixture(scope="session")
def chat_ckpt(tmp_path_factory):
    import dataclasses

    import torch

    from nanoforge import chat_format
    from nanoforge import checkpoint
    from model import GPT, GPTConfig
    from nanoforge.tokenizer import ByteTokenizer, with_chat_tokens

    tokenizer = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32,
                          dropout=0.0, bias=True))
    rows = [chat_format.render_conversation(tokenizer, conversation(*pairs)) for pairs in CHAT_LESSONS]
    x = torch.zeros(len(rows), 31, dtype=torch.long)
    y = torch.full((len(rows), 31), -1, dtype=torch.long)
    for b, (ids, mask) in enumerate(rows):
        x[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        y[b, : len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(60):
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("chat") / "model.safetensors"
    info = {"model": dataclasses.asdict(model.config), "tokenizer": tokenizer.to_dict()}
    checkpoint.save(str(path), model.state_dict(), info)
    return path


# A tiny chat model that calls the calculator: its logits are rigged to a table of which token follows which
# (a bigram model), so that greedy decoding answers with the call 6*7 and then " ok", and sampling writes calls of
# random lengths, sometimes none, sometimes two. A weak random attention block and position embedding make the
# rest of the context matter a little (a reply changes with the prompt), so that replies test the KV cache too.
CALCULATOR_CHARS = "0123456789+*/ abcdefghijklmnopqrstuvwxyz:"


def calculator_model(block_size=32):
    """(model, tokenizer) of the rigged calculator-calling chat model (see above)."""
    import torch

    from model import GPT, GPTConfig
    from nanoforge.tokenizer import CharTokenizer, with_chat_tokens

    tokenizer = with_chat_tokens(CharTokenizer(CALCULATOR_CHARS))
    chat, digits = tokenizer.chat_ids, tokenizer.encode("0123456789")
    one = {c: tokenizer.encode(c)[0] for c in "+*/ oak"}
    follows = torch.zeros(tokenizer.vocab_size, tokenizer.vocab_size)  # logits: [token, next token]
    follows[:, chat["<|assistant_end|>"]] = 11.0  # what no rule below names ends the reply

    def rule(token, choices):
        follows[token] = 0.0
        for next_token, logit in choices:
            follows[token, next_token] = 8.0 + logit

    rule(chat["<|assistant_start|>"], [(chat["<|python_start|>"], 3.0), (one["o"], 2.0), (one["a"], 1.5)])
    rule(chat["<|python_start|>"], [(d, 2.5 if k == 6 else 2.0) for k, d in enumerate(digits)])
    for k, d in enumerate(digits):
        rule(d, [(chat["<|python_end|>"], 3.0 if k == 7 else 2.0), (one["+"], 1.5), (one["*"], 3.0 if k == 6 else 1.5),
                 (one["/"], 1.0)] + [(x, 1.0) for x in digits])
    for op in "+*/":
        rule(one[op], [(d, 2.5 if k == 7 else 2.0) for k, d in enumerate(digits)])
    rule(chat["<|python_end|>"], [(chat["<|output_start|>"], 4.0)])  # without the tool: it writes an output itself
    rule(chat["<|output_start|>"], [(d, 2.0) for d in digits])
    rule(chat["<|output_end|>"], [(one[" "], 3.0), (one["o"], 2.0)])
    rule(one[" "], [(one["o"], 2.5), (one["a"], 2.0), (chat["<|python_start|>"], 1.5),
                    (chat["<|assistant_end|>"], 1.0)])
    rule(one["o"], [(tokenizer.encode("k")[0], 3.0), (one["a"], 1.0), (one[" "], 1.0)])
    rule(tokenizer.encode("k")[0], [(chat["<|assistant_end|>"], 3.0), (one[" "], 1.5)])
    rule(one["a"], [(one[" "], 2.0), (chat["<|assistant_end|>"], 2.2), (tokenizer.encode("k")[0], 1.0)])
    torch.manual_seed(0)
    n_embd = 64  # more than the 50 tokens: each token's embedding is a direction of its own
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=n_embd,
                          dropout=0.0, bias=True, tie_embeddings=False)).eval()
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.zero_()
        wte[:, : tokenizer.vocab_size] = 4 * torch.eye(tokenizer.vocab_size)
        model.transformer.wpe.weight.normal_(0, 0.02)
        for name, p in model.transformer.h.named_parameters():
            if name.endswith("c_proj.weight"):
                p.normal_(0, 0.1 / n_embd**0.5)
        alone = model.transformer.ln_f(wte)  # (V, n_embd): what the lm_head sees of a token with no context
        model.lm_head.weight.copy_(torch.linalg.lstsq(alone, follows).solution.T)  # alone @ lm_head.T = follows
    return model, tokenizer


@pytest.fixture(scope="session")
def calculator_ckpt(tmp_path_factory):
    """calculator_model() saved as a checkpoint (for serve.py)."""
    import dataclasses

    from nanoforge import checkpoint

    model, tokenizer = calculator_model()
    path = tmp_path_factory.mktemp("calculator") / "model.safetensors"
    checkpoint.save(str(path), model.state_dict(), {"model": dataclasses.asdict(model.config),
                                                    "tokenizer": tokenizer.to_dict()})
    return path


@pytest.fixture
def http_server():
    """A local HTTP server for download tests: http_server(respond) starts one whose GET answers are
    respond(path, range_start) -> (status, body), range_start being the byte an HTTP Range request asks
    to start from (None without one). Returns its URL; it stops when the test ends."""
    import http.server
    import threading

    servers = []

    def start(respond):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ranged = self.headers.get("Range")
                status, body = respond(self.path, int(ranged.removeprefix("bytes=").rstrip("-")) if ranged else None)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
