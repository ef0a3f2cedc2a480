"""What one request must not do to the others or to the machine, and what a web page must not do to the server:
OpenAI's meaning of top_p 0, limits checked at the API (top_logprobs, max_tokens), the "why" view waiting in the
same bounded queue and computing only what it returns, linear-time conversation fitting and logprob offsets,
and the browser checks (Content-Type, Origin, Host). The app runs in-process (Starlette's TestClient) with the
tiny chat model of conftest."""

import threading

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import conversation
from nanoforge import chat_format
from nanoforge.batching import Job
from nanoforge.engine import Generator
from nanoforge.inspect_model import explain_step
from nanoforge.loading import load_model
from nanoforge.openai_api import APIError, parse_request, text_logprobs, token_text
from nanoforge.server import Service, create_app, host_names
from nanoforge.tokenizer import CharTokenizer
from test_serve import save_base_model

URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def chat_model(chat_ckpt):
    return load_model(chat_ckpt, "cpu")


def serve(chat_model, cors_origins=(), **options):
    model, tokenizer = chat_model
    service = Service(Generator(model, tokenizer), model, "chat", **{"max_batch": 4, "max_queue": 4, **options})
    app = create_app(service, host_names("127.0.0.1", 8000), cors_origins)
    return service, TestClient(app, base_url=URL)


def ask(client, **fields):
    body = {"messages": conversation(("spell dog", None)), "max_tokens": 8, **fields}
    return client.post("/v1/chat/completions", json=body)


def test_top_p_0_is_greedy_as_openai_means_it(chat_model):
    service, client = serve(chat_model)
    with client:
        greedy = ask(client, temperature=0).json()["choices"][0]["message"]["content"]
        r = ask(client, temperature=1.5, top_p=0, seed=3)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == greedy


def test_top_logprobs_past_the_vocabulary_and_max_tokens_past_the_limit_are_refused(chat_model):
    tiny = CharTokenizer.train("abc")  # fewer tokens than the 5 alternatives completions may ask for
    with pytest.raises(APIError, match="logprobs") as refused:
        parse_request({"prompt": "ab", "logprobs": tiny.vocab_size + 1}, "text", tiny, 16, "m")
    assert refused.value.status == 400
    assert parse_request({"prompt": "ab", "logprobs": tiny.vocab_size}, "text", tiny, 16, "m").top_logprobs \
        == tiny.vocab_size
    service, client = serve(chat_model, max_tokens=8)
    with client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["max_tokens"] == 8 and card["context_length"] == 32
        r = ask(client, max_tokens=9)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert ask(client, max_tokens=8).status_code == 200


def test_a_request_ends_at_its_deadline_with_what_it_has(tmp_path):
    model, tokenizer = load_model(save_base_model(tmp_path), "cpu")  # a model that never stops on its own
    service = Service(Generator(model, tokenizer), model, "base", 2, 2, max_tokens=100000, timeout=0.5)
    with TestClient(create_app(service, host_names("127.0.0.1", 8000)), base_url=URL) as client:
        r = client.post("/v1/completions", json={"prompt": "F", "max_tokens": 100000})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
        assert 0 < r.json()["usage"]["completion_tokens"] < 100000


def test_explain_waits_in_the_same_bounded_queue(chat_model):
    service, client = serve(chat_model, max_batch=1, max_queue=1)
    # The first job holds the worker inside its first event's callback, so the second stays queued however the
    # tiny model decodes (polling the running count hung when a sampled reply ended before the poll saw it).
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def hold_worker(event):
        if not started.is_set():
            started.set()
            release.wait(30)

    settings = dict(temperature=1.0, top_p=1.0, seed=1, stop=[], top_logprobs=None)
    busy = Job([1, 2, 3], dict(settings, max_new_tokens=100000), hold_worker)
    waiting = Job([1, 2, 3], dict(settings, max_new_tokens=4), lambda e: done.set() if e[0] == "done" else None)
    with client:
        service.scheduler.submit(busy)
        assert started.wait(30)
        service.scheduler.submit(waiting)  # the queue is full now
        body = {"messages": conversation(("spell dog", None)), "reply_ids": [100, 32], "step": 1}
        r = client.post("/explain", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        service.scheduler.cancel(busy)
        release.set()
        assert done.wait(30)  # the queued job ran once the worker was free
        r = client.post("/explain", json=body)
        assert r.status_code == 200 and r.json()["chosen"]["token_id"] == 32


def test_explain_step_unembeds_the_last_position_only(chat_model):
    model, tokenizer = chat_model
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        step = explain_step(model, tokenizer, list(range(40, 70)))
    finally:
        hook.remove()
    assert seen == [1] and step.attention.shape == (1, 2, 30)
    logits, _ = model(torch.tensor([list(range(40, 70))]))
    torch.testing.assert_close(step.probs, logits[0, -1].softmax(-1))


def fit_by_rendering(tokenizer, messages, block_size, max_new_tokens):
    """The plain reference: drop the oldest exchange and render again until the prompt fits."""
    budget = block_size - min(max_new_tokens, block_size // 2)
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns, dropped = messages[len(head):], 0
    while len(turns) - dropped > 1 and len(chat_format.render_for_reply(tokenizer, head + turns[dropped:])) > budget:
        dropped += 2
    return head + turns[dropped:], dropped


class CountingTokenizer:
    """A tokenizer that counts the characters it encodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.chat_ids, self.encoded = tokenizer, tokenizer.chat_ids, 0

    def encode(self, text):
        self.encoded += len(text)
        return self.tokenizer.encode(text)


def test_fitting_a_conversation_to_the_context_is_linear_and_agrees_with_rendering(chat_model):
    _, tokenizer = chat_model
    pairs = [(f"question {i}" * (i % 3 + 1), f"answer {i}") for i in range(7)]
    for system in ([], [{"role": "system", "content": "be brief"}]):
        messages = system + conversation(*pairs, ("last one", None))
        for block_size, max_new in [(32, 8), (64, 8), (128, 40), (400, 8), (40, 100)]:
            assert chat_format.fit_to_context(tokenizer, messages, block_size, max_new) == \
                fit_by_rendering(tokenizer, messages, block_size, max_new), (system, block_size)
    counting = CountingTokenizer(tokenizer)
    long = conversation(*[("hi", "yo")] * 2000, ("hi", None))
    kept, dropped = chat_format.fit_to_context(counting, long, 32, 8)
    assert dropped == 3996 and kept == long[-5:]
    assert counting.encoded < 4 * sum(len(m["content"]) for m in long)  # each message read a few times, not n


def test_fitting_counts_an_assistant_turns_calculator_calls(chat_model):
    """sample.py --chat keeps a reply's calls and outputs in the conversation: their tool tokens count too."""
    _, tokenizer = chat_model
    reply = [{"type": "python", "text": "12*3"}, {"type": "python_output", "text": "36"}, {"type": "text", "text": "36"}]
    messages = []
    for i in range(6):
        messages += [{"role": "user", "content": f"mul {i} 3"}, {"role": "assistant", "content": reply}]
    messages.append({"role": "user", "content": "mul 12 3"})
    for block_size, max_new in [(32, 8), (48, 8), (64, 8), (128, 40)]:
        assert chat_format.fit_to_context(tokenizer, messages, block_size, max_new) == \
            fit_by_rendering(tokenizer, messages, block_size, max_new), block_size


def test_text_offsets_are_where_each_token_starts(chat_model):
    _, tokenizer = chat_model
    tokens = [(i, (-1.0, [])) for i in tokenizer.encode("héllo, wörld")]
    texts = [token_text(tokenizer, i)[0] for i, _ in tokens]
    offsets = text_logprobs(tokenizer, tokens, offset=7)["text_offset"]
    assert offsets == [7 + len("".join(texts[:k])) for k in range(len(texts))]
    assert text_logprobs(tokenizer, [], offset=7)["text_offset"] == []


def test_a_web_page_cannot_drive_the_server(chat_model):
    service, client = serve(chat_model, cors_origins=["https://app.example"])
    body = '{"messages": [{"role": "user", "content": "spell dog"}], "max_tokens": 4}'
    with client:
        # a page's form or no-cors fetch can send text/plain without asking the server first
        r = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "text/plain"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
        json_type = {"Content-Type": "application/json; charset=utf-8"}
        r = client.post("/v1/chat/completions", content=body, headers={**json_type, "Origin": "https://evil.example"})
        assert r.status_code == 403 and "--cors-origin" in r.json()["error"]["message"]
        own = client.post("/v1/chat/completions", content=body, headers={**json_type, "Origin": URL})
        assert own.status_code == 200
        allowed = client.post("/v1/chat/completions", content=body,
                              headers={**json_type, "Origin": "https://app.example"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://app.example"
        preflight = client.options("/v1/chat/completions", headers={"Origin": "https://app.example",
                                                                    "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 204 and "POST" in preflight.headers["access-control-allow-methods"]
        # DNS rebinding: evil.example re-pointed at 127.0.0.1 reaches the server with its own name as Host
        rebound = client.get("/v1/models", headers={"Host": "evil.example:8000"})
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
        assert client.get("/").status_code == 200
    assert host_names("0.0.0.0", 8000) is None  # every address: no one name to check


def test_parsing_and_writing_answers_run_off_the_event_loop(chat_model, monkeypatch):
    """A megabyte of conversation to fit, or thousands of logprobs to write, must not stall /health and the
    other streams: those steps run in a thread, where no event loop is running."""
    import asyncio

    from nanoforge import server

    calls = []

    def watched(function):
        def run(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                calls.append((function.__name__, "on the event loop"))
            except RuntimeError:
                calls.append((function.__name__, "in a thread"))
            return function(*args, **kwargs)
        return run

    for name in ("parse_request", "response", "explain_context", "explanation"):
        monkeypatch.setattr(server, name, watched(getattr(server, name)))
    service, client = serve(chat_model)
    with client:
        reply = ask(client, temperature=0, logprobs=True).json()
        ids = [t["token_id"] for t in reply["choices"][0]["logprobs"]["content"]]
        body = {"messages": conversation(("spell dog", None)), "reply_ids": ids, "step": 0}
        assert client.post("/explain", json=body).status_code == 200
    assert sorted(calls) == [(name, "in a thread") for name in ("explain_context", "explanation", "parse_request",
                                                                "response")]
