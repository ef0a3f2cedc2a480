"""serve.py against real clients: the official openai package (plain and streamed chat and completions,
logprobs, stop strings, errors), raw HTTP for what the client never sends (bad JSON, huge bodies), a bounded
load test, a full queue, a client that goes away, and the API key. Each server is serve.py itself, started on a
free port of 127.0.0.1 with a tiny model: the chat model of conftest (trained on CHAT_LESSONS) or a random
char-level base model."""

import concurrent.futures
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from conftest import CHAT_LESSONS, REPO, TINY_TEXT, conversation, run_cli
from model import GPT, GPTConfig
from nanoforge import checkpoint
from nanoforge.engine import Generator
from nanoforge.inspect_model import explain
from nanoforge.loading import load_model
from nanoforge.tokenizer import CharTokenizer


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """serve.py running in a subprocess; url is its root. Stopped by stop()."""

    def __init__(self, ckpt, *flags):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), "--ckpt", str(ckpt),
                                         "--port", str(port), "--device", "cpu", *map(str, flags)],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while True:
            assert self.process.poll() is None, self.process.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "serve.py did not start"
            time.sleep(0.2)
        self.model = self.health()["model"]

    def client(self, **options):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=options.pop("api_key", "unused"), **options)

    def health(self):
        return httpx.get(self.url + "/health").json()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def chat_server(chat_ckpt):
    server = Server(chat_ckpt, "--max-batch", 16, "--max-queue", 64)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    return save_base_model(tmp_path_factory.mktemp("base"))


def save_base_model(directory):
    """A random char-level model with no end-of-text token: it writes until it is stopped (30000 tokens take
    tens of seconds)."""
    tokenizer = CharTokenizer.train(TINY_TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, vocab_size=tokenizer.vocab_size, n_layer=4, n_head=4, n_embd=128,
                          dropout=0.0))
    path = directory / "model.safetensors"
    checkpoint.save(str(path), model.state_dict(), {"model": dataclasses.asdict(model.config),
                                                    "tokenizer": tokenizer.to_dict()})
    return path


@pytest.fixture(scope="module")
def base_server(base_ckpt):
    server = Server(base_ckpt, "--max-batch", 2, "--max-queue", 2, "--max-tokens", 30000)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat_generator(chat_ckpt):
    model, tokenizer = load_model(chat_ckpt, "cpu")
    return Generator(model, tokenizer)


def test_chat_plain_and_streamed_from_the_openai_client(chat_server, chat_generator):
    client = chat_server.client()
    for pairs in CHAT_LESSONS:
        messages = conversation(*pairs[:-1], (pairs[-1][0], None))
        reply = client.chat.completions.create(model=chat_server.model, messages=messages, temperature=0, max_tokens=20)
        assert reply.choices[0].message.content == pairs[-1][1]  # what the model learned
        assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
        expected = chat_generator.chat(messages, temperature=0, max_new_tokens=20)
        assert reply.usage.completion_tokens == len(expected.ids)
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens == reply.usage.total_tokens
    chunks = list(client.chat.completions.create(model=chat_server.model, messages=conversation(("spell dog", None)),
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "d o g"
    assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) == 5  # streamed piece by piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6  # 5 characters and the end


def test_chat_logprobs_are_the_models_own(chat_server, chat_ckpt):
    model, tokenizer = load_model(chat_ckpt, "cpu")
    messages = conversation(("reverse abc", None))
    reply = chat_server.client().chat.completions.create(model=chat_server.model, messages=messages, temperature=1.3, seed=4,
                                                         logprobs=True, top_logprobs=3, max_tokens=8)
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    from nanoforge.chat_format import render_for_reply

    ids = render_for_reply(tokenizer, messages)
    reply_ids = [t.model_extra["token_id"] for t in content]
    logits, _ = model(torch.tensor([ids + reply_ids]))
    expected = F.log_softmax(logits[0, len(ids) - 1 :], dim=-1)
    for n, entry in enumerate(content):
        assert entry.logprob == pytest.approx(expected[n, reply_ids[n]].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(expected[n], 3).values.tolist(),
                                                                         abs=1e-4)
        assert entry.bytes == list(entry.token.encode())


def test_completions_plain_streamed_logprobs_and_stop(base_server, base_ckpt):
    client = base_server.client()
    model, tokenizer = load_model(base_ckpt, "cpu")
    generator = Generator(model, tokenizer)
    expected = generator.generate(["First"], max_new_tokens=40, temperature=0.9, seed=7)[0]
    plain = client.completions.create(model=base_server.model, prompt="First", max_tokens=40, temperature=0.9, seed=7,
                                      logprobs=2)
    assert plain.choices[0].text == expected.text and plain.choices[0].finish_reason == "length"
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 40
    lp = plain.choices[0].logprobs
    logits, _ = model(torch.tensor([tokenizer.encode("First") + expected.ids]))
    reference = F.log_softmax(logits[0, 4:-1], dim=-1)  # (40, V): the predictions of the 40 tokens
    assert lp.token_logprobs == pytest.approx(reference.gather(1, torch.tensor(expected.ids)[:, None])[:, 0].tolist(),
                                              abs=1e-4)
    assert "".join(lp.tokens) == expected.text and lp.text_offset == list(range(40))
    streamed = client.completions.create(model=base_server.model, prompt="First", max_tokens=40, temperature=0.9, seed=7,
                                         stream=True)
    pieces = [c.choices[0].text for c in streamed]
    assert "".join(pieces) == expected.text and len(pieces) == 41  # a piece per token, then the end
    stop = expected.text[10:12]
    cut = client.completions.create(model=base_server.model, prompt="First", max_tokens=40, temperature=0.9, seed=7, stop=[stop])
    assert cut.choices[0].text == expected.text[: expected.text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_models_health_and_the_same_seed_alone_or_batched(chat_server, chat_ckpt):
    client = chat_server.client()
    assert [m.id for m in client.models.list()] == [os.path.basename(os.path.dirname(chat_ckpt))]  # the run's name
    health = chat_server.health()
    assert health["status"] == "ok" and health["chat"] is True and health["block_size"] == 32

    def ask(seed):
        reply = client.chat.completions.create(model=chat_server.model, messages=conversation(("spell dog", None)),
                                               temperature=2.0, top_p=0.95, seed=seed, max_tokens=12)
        return reply.choices[0].message.content

    alone = [ask(seed) for seed in range(8)]
    before = chat_server.health()["largest_batch"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone and len(set(alone)) > 1
    assert chat_server.health()["largest_batch"] > max(before, 1)  # some of them really were decoded together


def test_load_16_clients_4_requests_each_all_answered(chat_server):
    lessons = [pairs for pairs in CHAT_LESSONS if len(pairs) == 1]

    def client_session(k):
        client = chat_server.client(max_retries=0)
        answers = []
        for r in range(4):
            (question, answer), = lessons[(k + r) % len(lessons)]
            reply = client.chat.completions.create(model=chat_server.model, temperature=0,
                                                   messages=conversation((question, None)), max_tokens=16,
                                                   stream=bool(r % 2))
            text = reply.choices[0].message.content if not r % 2 else "".join(
                c.choices[0].delta.content or "" for c in reply if c.choices)
            answers.append(text == answer)
        return answers

    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(client_session, range(16)))
    assert results == [[True] * 4] * 16, results
    assert time.time() - start < 120
    assert chat_server.health()["waiting"] == 0


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", 400),
    ("/v1/chat/completions", b"[1, 2]", 400),
    ("/v1/chat/completions", b"\xff\xfe", 400),
    ("/v1/chat/completions", {"messages": "hi"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "9"}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": True}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4097}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a<|assistant_end|>b"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 40}]}, 400),  # alone past the context
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404),
    ("/v1/completions", {"prompt": "<|user_start|>hi"}, 400),
    ("/v1/completions", {"prompt": [1, 99999]}, 400),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400),
    ("/v1/completions", {"prompt": "hi", "logprobs": 9}, 400),
    ("/v1/nothing", {}, 404),
    ("/explain", {"messages": [{"role": "user", "content": "hi"}], "reply_ids": [1], "step": 5}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))])
def test_bad_requests_get_a_4xx_with_openais_error_object(chat_server, path, body, status):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(chat_server.url + path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_huge_bodies_wrong_methods_and_the_server_keeps_serving(chat_server):
    huge = b'{"messages": [{"role": "user", "content": "' + b"x" * (2 << 20) + b'"}]}'
    json_type = {"Content-Type": "application/json"}
    r = httpx.post(chat_server.url + "/v1/chat/completions", content=huge, headers=json_type)
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
    chunked = httpx.post(chat_server.url + "/v1/completions", content=iter([b"[" + b"1," * 400000] * 2 + [b"1]"]),
                         headers=json_type)
    assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    assert httpx.get(chat_server.url + "/v1/chat/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat_server.client().chat.completions.create(model=chat_server.model, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=-5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        chat_server.client().models.retrieve("gpt-4")
    reply = chat_server.client().chat.completions.create(model=chat_server.model, temperature=0,
                                                         messages=conversation(("hi", None)))
    assert reply.choices[0].message.content == "yo"


def test_a_long_conversation_drops_its_oldest_turns_and_says_so(chat_server, chat_generator):
    messages = conversation(("hi", "yo"), ("add 2 3", "5"), ("spell dog", "d o g"), ("hi", None))
    raw = chat_server.client().chat.completions.with_raw_response.create(
        model=chat_server.model, messages=messages, temperature=0, max_tokens=8)
    assert raw.headers["x-dropped-messages"] == "4"
    expected = chat_generator.chat(messages[4:], temperature=0, max_new_tokens=8).text  # the last 32 tokens' worth
    assert raw.parse().choices[0].message.content == expected


def test_explain_gives_the_steps_probabilities_and_attention(chat_server, chat_ckpt):
    model, tokenizer = load_model(chat_ckpt, "cpu")
    messages = conversation(("spell dog", None))
    reply = chat_server.client().chat.completions.create(model=chat_server.model, messages=messages,
                                                         temperature=0, logprobs=True)
    reply_ids = [t.model_extra["token_id"] for t in reply.choices[0].logprobs.content]
    r = httpx.post(chat_server.url + "/explain", json={"messages": messages, "reply_ids": reply_ids, "step": 2})
    why = r.json()
    from nanoforge.chat_format import render_for_reply

    ids = render_for_reply(tokenizer, messages) + reply_ids[:2]
    e = explain(model, tokenizer, ids)
    assert why["chosen"] == {"token_id": reply_ids[2], "token": "o", "prob": pytest.approx(
        e.probs[-1, reply_ids[2]].item(), abs=1e-5), "rank": 1}
    assert why["context"] == e.labels and why["prompt_tokens"] == len(ids) - 2
    torch.testing.assert_close(torch.tensor(why["attention"]), e.patterns[:, :, -1], atol=1e-5, rtol=0)
    assert [t["prob"] for t in why["top"]] == pytest.approx(torch.topk(e.probs[-1], 10).values.tolist(), abs=1e-5)


def test_a_full_queue_answers_503_and_a_client_that_goes_away_stops_its_generation(base_server):
    def ask(_):  # each request takes seconds: 30000 tokens
        return httpx.post(base_server.url + "/v1/completions", json={"prompt": "F", "max_tokens": 30000},
                          timeout=5)

    statuses, refused = [], None
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(8)]
        for future in futures:
            try:
                r = future.result()
            except httpx.TimeoutException:  # a request that got a place: this client gives up on it
                statuses.append("waited")
                continue
            statuses.append(r.status_code)
            refused = r
    assert statuses.count(503) >= 4 and refused.headers["retry-after"] == "1", statuses
    assert refused.json()["error"]["code"] == "queue_full"
    r = httpx.post(base_server.url + "/v1/completions", json={"prompt": "日本"})  # outside the char vocabulary
    assert r.status_code == 400 and "prompt" == r.json()["error"]["param"]
    assert wait_until_idle(base_server, 10)  # the clients that gave up: their rows were cancelled
    assert base_server.health()["cancelled"] == statuses.count("waited")

    with httpx.stream("POST", base_server.url + "/v1/completions",
                      json={"prompt": "F", "max_tokens": 30000, "stream": True}) as r:
        for n, _ in enumerate(r.iter_lines()):
            if n > 20:
                break
    assert wait_until_idle(base_server, 10)
    assert base_server.health()["cancelled"] == statuses.count("waited") + 1


def wait_until_idle(server, seconds):
    deadline = time.time() + seconds
    while time.time() < deadline:
        health = server.health()
        if health["running"] == 0 and health["waiting"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_api_key(chat_ckpt):
    server = Server(chat_ckpt, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            server.client(api_key="wrong").models.list()
        assert httpx.post(server.url + "/explain", json={}).status_code == 401
        assert [m.id for m in server.client(api_key="s3cret").models.list()]
        assert httpx.get(server.url + "/").status_code == 200 and server.health()["auth"] is True
    finally:
        server.stop()


def test_command_line_errors_are_one_line(chat_ckpt, tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = run_cli("serve.py", "--ckpt", chat_ckpt, "--port", busy.getsockname()[1])
    finally:
        busy.close()
    assert r.returncode == 1 and r.stderr.strip().startswith("serve.py: error: cannot listen on 127.0.0.1:")
    assert "pick another --port" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("serve.py", "--ckpt", chat_ckpt, "--max-batch", "0")
    assert r.returncode == 1 and r.stderr.strip() == "serve.py: error: --max-batch must be at least 1, got 0"
    r = run_cli("serve.py", "--ckpt", chat_ckpt, "--max-queue", "0")  # 0 would refuse every request
    assert r.returncode == 1 and r.stderr.strip() == "serve.py: error: --max-queue must be at least 1, got 0"
    r = run_cli("serve.py", "--ckpt", tmp_path / "missing", "--port", "0")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "missing" in r.stderr


def test_another_host_than_loopback_is_warned_about(chat_ckpt):
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: the warning comes, then binding fails, and nothing
    # ever listens beyond 127.0.0.1.
    r = run_cli("serve.py", "--ckpt", chat_ckpt, "--host", "192.0.2.1", "--port", "0")
    warning, error = r.stderr.strip().splitlines()
    assert warning == ("serve.py: warning: listening on 192.0.2.1: other machines can reach this server and use "
                       "it without a key (--api-key)")
    assert r.returncode == 1 and error.startswith("serve.py: error: cannot listen on 192.0.2.1:0")


@pytest.fixture(scope="module")
def calculator_server(calculator_ckpt):
    server = Server(calculator_ckpt, "--max-batch", 4)
    yield server
    server.stop()


def test_chat_runs_the_calculator_and_reports_each_call(calculator_server, calculator_ckpt):
    """A chat model with the tool tokens: the content is the final text of generate(tools=True)'s reply for the
    same seed (alone or beside others), the calls come in nanoforge_calculator, and a stream's content deltas
    carry no call, output or tool token."""
    from nanoforge import tools

    model, tokenizer = load_model(calculator_ckpt, "cpu")
    generator, client = Generator(model, tokenizer), calculator_server.client()
    messages = conversation(("what is six times seven", None))
    expected = [generator.chat(messages, temperature=1.0, seed=seed, max_new_tokens=40, tools=True)
                for seed in range(4)]

    def ask(seed):
        return client.chat.completions.create(model=calculator_server.model, messages=messages, temperature=1.0,
                                              seed=seed, max_tokens=40, logprobs=True)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(ask, range(4)))
    assert sum(bool(s.calls) for s in expected) >= 3
    for reply, sample in zip(replies, expected):
        message = reply.choices[0].message
        assert message.content == tools.final_text(tools.reply_parts(tokenizer, sample.ids))
        calls = message.model_extra["nanoforge_calculator"]
        assert [(c["expression"], c["output"]) for c in calls] == sample.calls
        assert "".join(t.token for t in reply.choices[0].logprobs.content) == message.content
        assert reply.usage.completion_tokens == len(sample.ids)  # forced tokens count, as against max_tokens
    chat = tokenizer.chat_ids
    chunks = list(client.chat.completions.create(model=calculator_server.model, messages=messages, temperature=0,
                                                 max_tokens=40, stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == " ok"  # the engine's text: <|python_start|>6*7...42... ok
    assert [d.model_extra["nanoforge_calculator"] for d in deltas if d.model_extra.get("nanoforge_calculator")] == [
        [{"expression": "6*7", "output": "42", "token_ids": [chat["<|python_start|>"], *tokenizer.encode("6*7"),
                                                             chat["<|python_end|>"], chat["<|output_start|>"],
                                                             *tokenizer.encode("42"), chat["<|output_end|>"]]}]]
