"""
The web server of serve.py: an OpenAI-compatible API, the chat page and its "why" view, on FastAPI
(an optional dependency: pip install -e ".[serve]").

    GET  /                      the page (chat_page.html, one self-contained file)
    GET  /health                liveness, the model's shape and the queue: {"status": "ok", ...}
    GET  /v1/models[/{id}]      the one model served
    POST /v1/chat/completions   chat models (their tokenizer has the chat tokens)
    POST /v1/completions        any model: continue a prompt
    POST /explain               why a generated token was chosen: the top-k at that step and that step's
                                attention per layer and head (inspect_model.explain_step)

Requests go to a batching.Scheduler, whose worker thread decodes every running request a row at a time
(continuous batching) and also runs the "why" view's forward passes, so all model work is bounded by the
same queue and happens off the event loop; each request waits on an asyncio queue that the scheduler's
thread fills. Parsing a request (tokenizing, fitting a conversation to the context) and writing a large
answer run in a thread too, so that /health and the other streams never stall behind them. A request
whose client goes away is cancelled (its row stops at the next step); one past its deadline (--timeout)
ends with what it has. With an API key, every route but / and /health needs "Authorization: Bearer KEY"
(the page asks for the key).

Browser safety (BrowserGuard): a web page the user visits can send requests to 127.0.0.1 too. So a POST
must say Content-Type: application/json (which a page cannot send to another origin without asking
first), a request from another page's Origin is refused (403) unless --cors-origin names it, and the Host
header must name the address the server is bound to, which defeats DNS rebinding (a page's own name
re-pointed at 127.0.0.1).
"""

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import time

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from nanoforge.batching import Job, QueueFull, Scheduler
from nanoforge.engine import reply_end_ids
from nanoforge.errors import UserError
from nanoforge.inspect_model import explain_step
from nanoforge.openai_api import (MAX_TOKENS, APIError, chat_prompt, chunk, new_id, number, parse_request, response,
                                  text_prompt, token_text, usage_chunk)

MAX_BODY_BYTES = 1 << 20  # a request body past this is refused (413) before it is read whole
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_page.html")
EXPLAIN_TOP_K = 10  # alternatives the "why" view shows
DISCONNECT_CHECK_SECONDS = 0.5  # how often a waiting request asks whether its client is still there


class Service:
    """What the routes serve: the generator (for decoding), the model it was made from (for the "why"
    view, which needs the model's own attention), the model's name and the scheduler. max_tokens: the most
    tokens a request may ask for; timeout: seconds a request may take, waiting included (None: no limit);
    batching: the Scheduler's policy."""

    def __init__(self, generator, model, name, max_batch, max_queue, api_key=None, max_tokens=MAX_TOKENS,
                 timeout=None, batching="continuous"):
        self.generator, self.model, self.name, self.api_key = generator, model, name, api_key
        self.tokenizer, self.block_size = generator.tokenizer, generator.config.block_size
        self.max_tokens, self.timeout = max_tokens, timeout
        self.chat = hasattr(self.tokenizer, "chat_ids")
        # A chat model's reply ends at <|assistant_end|>, or at any other chat token but the tool tokens (a reply
        # may hold calls: its chat completions run the calculator, see openai_api).
        stop_ids = reply_end_ids(self.tokenizer) if self.chat else ()
        self.scheduler = Scheduler(generator, max_batch, max_queue, stop_ids, policy=batching)

    def authorize(self, request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided: send the server's --api-key as 'Authorization: "
                           "Bearer KEY'", code="invalid_api_key")


async def read_body(request):
    """The request's body; 413 past MAX_BODY_BYTES (read no further)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {int(length)} bytes, more than the {MAX_BODY_BYTES} allowed")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is more than the {MAX_BODY_BYTES} bytes allowed")
    return bytes(body)


def parse_json(body):
    """A body's JSON; 400 when it is not JSON (run off the event loop: a megabyte takes a while)."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


def failure(error):
    """An exception from a batch -> the APIError its request answers with."""
    if isinstance(error, UserError):
        return APIError(400, str(error))
    return APIError(500, f"generation failed: {type(error).__name__}: {error}", type="server_error")


async def events_until_gone(events, request):
    """The scheduler's events for a job, until the client goes away: checked every half second, since a
    non-streaming client's leaving shows only when asked for (a streamed response is cancelled by the
    server itself when its client goes)."""
    checked = time.monotonic()
    while True:
        try:
            yield await asyncio.wait_for(events.get(), timeout=DISCONNECT_CHECK_SECONDS)
        except asyncio.TimeoutError:
            pass
        if time.monotonic() - checked > DISCONNECT_CHECK_SECONDS:
            if await request.is_disconnected():
                return
            checked = time.monotonic()


def submit(service, prompt_ids, settings, run=None):
    """Queue a job (a generation, or run() on the worker); returns (job, its asyncio queue of events)."""
    events, loop = asyncio.Queue(), asyncio.get_running_loop()
    deadline = None if service.timeout is None else time.monotonic() + service.timeout
    job = Job(prompt_ids, settings, emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
              deadline=deadline, run=run)
    try:
        service.scheduler.submit(job)
    except QueueFull as e:
        raise APIError(503, f"the server is busy ({e}): retry in a moment", code="queue_full", type="server_error",
                       headers={"Retry-After": "1"}) from None
    return job, events


async def answer(service, request, job, events):
    """Wait for the whole reply; returns (sample, [(token id, logprobs)], the text the client reads, the calculator
    calls [(expression, output, token ids)]), or None when the client went away."""
    tokens, pieces, calls = [], [], []
    try:
        async for event in events_until_gone(events, request):
            if event[0] == "token":
                tokens.append(event[1:])
            elif event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "call":
                calls.append(event[1:])
            elif event[0] == "error":
                raise failure(event[1])
            elif event[0] == "done":
                return event[1], tokens, "".join(pieces), calls
        return None
    finally:
        service.scheduler.cancel(job)  # no-op once done; frees the place or row of a client that went away


def sse(data):
    return f"data: {json.dumps(data)}\n\n"


async def stream(service, req, job, events):
    """Server-sent events: a chunk per piece of text (with the log-probabilities of its tokens) and per calculator
    call, a last chunk with the finish reason, the usage when asked, then data: [DONE]."""
    pending, offset = [], 0  # tokens whose text is not out yet; characters sent so far
    args = (req, new_id(req.kind), service.name)
    try:
        if req.kind == "chat":
            yield sse(chunk(*args, first=True))
        while True:
            event = await events.get()
            if event[0] == "token":
                pending.append(event[1:])
            elif event[0] == "text":
                yield sse(chunk(*args, text=event[1], tokens=pending, tokenizer=service.tokenizer, offset=offset))
                offset, pending = offset + len(event[1]), []
            elif event[0] == "call":
                yield sse(chunk(*args, tokens=pending, tokenizer=service.tokenizer, calls=[event[1:]]))
                pending = []
            elif event[0] == "error":
                yield sse(failure(event[1]).body())
                break
            else:
                sample = event[1]
                yield sse(chunk(*args, tokens=pending, tokenizer=service.tokenizer, sample=sample, offset=offset))
                if req.include_usage:
                    yield sse(usage_chunk(*args, sample))
                break
        yield "data: [DONE]\n\n"
    finally:
        service.scheduler.cancel(job)  # no-op once done; a client that went away frees its place or row


async def complete(service, request, kind):
    """POST /v1/chat/completions (kind "chat") and /v1/completions ("text")."""
    service.authorize(request)
    body = await read_body(request)
    req = await asyncio.to_thread(lambda: parse_request(parse_json(body), kind, service.tokenizer, service.block_size,
                                                        service.name, service.max_tokens))
    headers = {}
    if req.dropped:  # say what did not fit in the context
        headers["X-Dropped-" + ("Messages" if kind == "chat" else "Prompt-Tokens")] = str(req.dropped)
    job, events = submit(service, req.prompt_ids, req.settings())
    if req.stream:
        return StreamingResponse(stream(service, req, job, events), media_type="text/event-stream", headers=headers)
    answered = await answer(service, request, job, events)
    if answered is None:
        return Response(status_code=499)  # nobody is there to read it (nginx's "client closed request")
    sample, tokens, text, calls = answered
    reply = await asyncio.to_thread(response, req, new_id(kind), service.name, sample, tokens, service.tokenizer,
                                    text, calls)
    return JSONResponse(reply, headers=headers)


async def explain(service, request):
    """POST /explain: {"messages" | "prompt", "max_tokens", "reply_ids", "step"} -> why reply_ids[step] came
    after the prompt (rendered as the request that generated it was) and reply_ids[:step]. The forward pass
    is a job of the scheduler: it waits in the same bounded queue and runs on the worker."""
    service.authorize(request)
    body = await read_body(request)
    ids, chosen, prompt_tokens = await asyncio.to_thread(lambda: explain_context(service, parse_json(body)))
    job, events = submit(service, ids, {}, run=lambda: explain_step(service.model, service.tokenizer, ids))
    answered = await answer(service, request, job, events)
    if answered is None:
        return Response(status_code=499)
    step = answered[0]
    return await asyncio.to_thread(explanation, service, step, prompt_tokens, chosen)


def explain_context(service, body):
    """A checked /explain body -> (the token ids the model saw when it picked the token, that token, how many of
    those ids are the prompt's)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    reply, step = body.get("reply_ids"), body.get("step")
    if not (isinstance(reply, list) and all(isinstance(i, int) and 0 <= i < service.tokenizer.vocab_size
                                            for i in reply)):
        raise APIError(400, "'reply_ids' must be a list of token ids (the logprobs' token_id)", "reply_ids")
    if not (isinstance(step, int) and 0 <= step < len(reply)):
        raise APIError(400, f"'step' must be an index into reply_ids (0 .. {len(reply) - 1})", "step")
    max_tokens = number(body, "max_tokens", min(service.block_size, service.max_tokens), 1, service.max_tokens,
                        integer=True)
    try:
        if "messages" in body:
            prompt, _ = chat_prompt(body["messages"], service.tokenizer, service.block_size, max_tokens)
        else:
            prompt = text_prompt(body.get("prompt"), service.tokenizer, service.chat)
    except UserError as e:
        raise APIError(400, str(e)) from None
    ids = (prompt + reply[:step])[-service.block_size:]  # what the model saw when it picked reply[step]
    return ids, reply[step], len(ids) - step


def explanation(service, s, prompt_tokens, chosen):
    """/explain's answer from the inspect_model.Step."""
    return {"context": s.labels, "prompt_tokens": max(0, prompt_tokens),
            "chosen": {"token_id": chosen, "token": token_text(service.tokenizer, chosen)[0],
                       "prob": s.probs[chosen].item(), "rank": s.rank(chosen)},
            "top": [{"token_id": i, "token": token_text(service.tokenizer, i)[0], "prob": p}
                    for i, p in s.top(EXPLAIN_TOP_K)],
            "attention": s.attention.tolist()}


class BrowserGuard:
    """ASGI middleware refusing what a web page could make a browser send to this server (see the module
    docstring). hosts: the Host header values that name the bound address (None: any, for a server bound to
    every address, which has no one name); cors_origins: other origins allowed to call the API."""

    def __init__(self, app, hosts=None, cors_origins=()):
        self.app, self.hosts, self.cors_origins = app, hosts, set(cors_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, origin, method = headers.get("host", ""), headers.get("origin"), scope["method"]
        refusal = None
        if self.hosts is not None and host.lower() not in self.hosts:
            refusal = APIError(400, f"the Host header {host!r} does not name this server's address "
                               f"({', '.join(sorted(self.hosts))})", code="invalid_host")
        elif origin is not None and origin != f"http://{host}" and origin not in self.cors_origins:
            refusal = APIError(403, f"requests from the web page {origin!r} are refused: start the server with "
                               f"--cors-origin {origin} to allow them", code="origin_not_allowed")
        elif method == "POST" and headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            refusal = APIError(415, "a POST body must be JSON, sent with 'Content-Type: application/json'",
                               code="unsupported_media_type")
        if refusal is not None:
            return await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
        if origin is None or origin not in self.cors_origins:
            return await self.app(scope, receive, send)
        allow = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
        if method == "OPTIONS":  # a browser's preflight, asking whether it may send the real request
            return await Response(status_code=204, headers={
                "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": "Authorization, Content-Type", "Access-Control-Max-Age": "600",
                "Vary": "Origin"})(scope, receive, send)

        async def send_allowed(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *allow]}
            await send(message)

        return await self.app(scope, receive, send_allowed)


def host_names(host, port):
    """The Host header values that name a server bound to host:port (None for a wildcard address: any)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = {f"[{host}]" if ":" in host else host}
    try:
        if ipaddress.ip_address(host).is_loopback:
            names |= {"localhost", "127.0.0.1", "[::1]"}
    except ValueError:
        pass
    return {f"{name}:{port}".lower() for name in names} | ({name.lower() for name in names} if port == 80 else set())


def create_app(service, hosts=None, cors_origins=()):
    """The web app. hosts and cors_origins: BrowserGuard's (host_names(bound host, port) for the Host check)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        service.scheduler.close()

    app = FastAPI(title="nanoforge", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BrowserGuard, hosts=hosts, cors_origins=cors_origins)
    page = open(PAGE, encoding="utf-8").read()

    @app.exception_handler(APIError)
    async def api_error(request, e):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown routes (404), wrong methods (405): OpenAI's error object too
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def crash(request, e):  # a bug answers 500; the server goes on serving
        return JSONResponse(APIError(500, f"{type(e).__name__}: {e}", type="server_error").body(), status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/health")
    async def health():
        cfg, scheduler = service.generator.config, service.scheduler
        return {"status": "ok", "model": service.name, "chat": service.chat, "block_size": cfg.block_size,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "auth": service.api_key is not None,
                "waiting": len(scheduler.waiting), "running": scheduler.running, "steps": scheduler.steps,
                "largest_batch": scheduler.largest_batch, "cancelled": scheduler.cancelled,
                "batching": scheduler.policy, "max_batch": scheduler.decoder.slots, "max_queue": scheduler.max_queue,
                "max_tokens": service.max_tokens, "timeout": service.timeout}

    def model_card():
        """OpenAI's model object, with this server's limits: the context and the most tokens a request may ask."""
        return {"id": service.name, "object": "model", "created": 0, "owned_by": "nanoforge",
                "context_length": service.block_size, "max_tokens": service.max_tokens}

    @app.get("/v1/models")
    async def models(request: Request):
        service.authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        service.authorize(request)
        if model_id != service.name:
            raise APIError(404, f"The model '{model_id}' does not exist", "model", "model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(service, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(service, request, "text")

    @app.post("/explain")
    async def why(request: Request):
        return await explain(service, request)

    return app
