"""
The subset of OpenAI's API that serve.py speaks, with OpenAI's JSON shapes: reading and checking a
request body of POST /v1/chat/completions or /v1/completions into a Request, and writing responses,
stream chunks and error objects. No web framework here: server.py moves the bytes.

What is checked, and the status each mistake gets (OpenAI's): a field of the wrong type or out of
range, an unknown field or role, a message with a chat token's text: 400; another model's name: 404.
Fields OpenAI has that we do not implement are refused when set to anything but their neutral value
(n > 1, echo, penalties, logit_bias) rather than silently ignored.

A chat model with the tool tokens runs the calculator in its chat completions (tools.py), as sample.py --chat and
eval.py do: the message's content is the reply's final text (no calls, outputs or tool tokens; logprobs cover
its tokens only), and the calls are reported in a field of our own beside it, "nanoforge_calculator": a list of
{"expression", "output", "token_ids"} (token_ids: the call's tokens and its output's, which the page sends back
to /explain so that the reply's context is whole). A stream sends each call in a chunk of its own, as the
delta's "nanoforge_calculator". The name is not OpenAI's "tool_calls": these calls are answered by the server,
not by the client, and an OpenAI client must not try to answer them.
"""

import itertools
import time
import uuid
from dataclasses import dataclass

from nanoforge.chat_format import ChatError, fit_to_context, render_for_reply
from nanoforge.errors import UserError
from nanoforge.inspect_model import token_bytes
from nanoforge.tokenizer import CHAT_TOKENS, has_tools

MAX_TOKENS = 4096  # the most tokens one request may ask for, unless the server says otherwise (serve.py --max-tokens)
MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_TOP_LOGPROBS = {"chat": 20, "text": 5}  # as OpenAI allows

COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
                 "user", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs"}
FIELDS = {"chat": COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens"},
          "text": COMMON_FIELDS | {"prompt", "echo", "suffix", "best_of"}}
NEUTRAL = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "echo": False, "suffix": None,
           "best_of": 1}


class APIError(Exception):
    """A request the server refuses: status, and the fields of OpenAI's error object."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """A checked request. kind: "chat" or "text" (completions). prompt_ids: what the model reads;
    dropped: messages (chat) or prompt tokens (text) left out to fit the context. top_logprobs: None
    for no log-probabilities. tools: whether the model runs the calculator (a chat completion of a model with the
    tool tokens)."""

    kind: str
    prompt_ids: list
    dropped: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    seed: int
    stream: bool
    include_usage: bool
    top_logprobs: int
    tools: bool = False

    def settings(self):
        """The batching.Job settings of this request. top_p 0 keeps OpenAI's meaning: the nucleus holds the most
        likely token alone, which is greedy decoding (the engine's top_p is in (0, 1])."""
        temperature, top_p = (0.0, 1.0) if self.top_p == 0 else (self.temperature, self.top_p)
        return dict(max_new_tokens=self.max_tokens, temperature=temperature, top_p=top_p, seed=self.seed,
                    stop=self.stop, top_logprobs=self.top_logprobs, tools=self.tools)


def bad(message, param):
    return APIError(400, message, param)


def number(body, name, default, low, high, integer=False):
    """body[name] (or default when absent or null), checked to be a number in [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if not low <= value <= high:
        raise bad(f"'{name}' must be between {low} and {high}, got {value!r}", name)
    return value


def flag(body, name):
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"'{name}' must be true or false, got {value!r}", name)
    return value


def stop_strings(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
        raise bad(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    return stop


def check_fields(body, kind, model_name):
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None)
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, neutral in NEUTRAL.items():
        if body.get(name) not in (None, neutral):
            raise bad(f"'{name}' is not supported by this server: leave it out (or {neutral!r})", name)
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(404, f"The model '{model}' does not exist: this server serves '{model_name}'", "model",
                       "model_not_found")


def parse_request(body, kind, tokenizer, block_size, model_name, max_tokens=MAX_TOKENS):
    """A JSON body of /v1/chat/completions (kind "chat") or /v1/completions ("text") -> Request, or APIError.
    max_tokens: the most tokens a request may ask for (the server's limit)."""
    try:
        return checked_request(body, kind, tokenizer, block_size, model_name, max_tokens)
    except UserError as e:  # text the tokenizer cannot encode (a character outside a char model's vocabulary)
        raise bad(str(e), "messages" if kind == "chat" else "prompt") from None


def checked_request(body, kind, tokenizer, block_size, model_name, limit):
    check_fields(body, kind, model_name)
    chat = hasattr(tokenizer, "chat_ids")
    max_tokens = number(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                        min(block_size, limit), 1, limit, integer=True)
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("'stream_options' is only allowed with stream: true, as {\"include_usage\": true|false}",
                  "stream_options")
    if kind == "chat":
        if not chat:
            raise bad(f"'{model_name}' is not a chat model (its tokenizer has no chat tokens): use /v1/completions",
                      "messages")
        prompt_ids, dropped = chat_prompt(body.get("messages"), tokenizer, block_size, max_tokens)
        top_logprobs = number(body, "top_logprobs", 0, 0, min(MAX_TOP_LOGPROBS["chat"], tokenizer.vocab_size),
                              integer=True)
        if "top_logprobs" in body and body["top_logprobs"] is not None and not flag(body, "logprobs"):
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top_logprobs = top_logprobs if flag(body, "logprobs") else None
    else:
        prompt_ids = text_prompt(body.get("prompt"), tokenizer, chat)
        dropped = max(0, len(prompt_ids) - block_size)  # the engine keeps the prompt's end
        prompt_ids = prompt_ids[dropped:]
        top_logprobs = number(body, "logprobs", None, 0, min(MAX_TOP_LOGPROBS["text"], tokenizer.vocab_size),
                              integer=True)
    return Request(kind, prompt_ids, dropped, max_tokens, temperature=number(body, "temperature", 1.0, 0, 2),
                   top_p=number(body, "top_p", 1.0, 0, 1), stop=stop_strings(body),
                   seed=number(body, "seed", None, 0, 2**63 - 1, integer=True), stream=stream,
                   include_usage=bool(options and options.get("include_usage")), top_logprobs=top_logprobs,
                   tools=kind == "chat" and has_tools(tokenizer))


def message_text(content, i):
    """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise bad(f"message {i + 1}'s content must be a string or a list of text parts", "messages")
    return content


def without_chat_token_text(text, where, param):
    """The chat format alone places chat tokens; text that spells one is refused rather than read as one."""
    for name in CHAT_TOKENS:
        if name in text:
            raise bad(f"{where} contains {name}, the text of a chat token the chat format reserves: remove it", param)
    return text


def chat_prompt(messages, tokenizer, block_size, max_tokens):
    """messages -> (token ids asking for the next assistant turn, messages dropped to fit the context)."""
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"message {i + 1} must be an object with a 'role' and a 'content'", "messages")
        role = "system" if m["role"] == "developer" else m["role"]  # newer OpenAI clients say developer
        text = without_chat_token_text(message_text(m.get("content"), i), f"message {i + 1}", "messages")
        checked.append({"role": role, "content": text})
    try:
        kept, dropped = fit_to_context(tokenizer, checked, block_size, max_tokens)
        return render_for_reply(tokenizer, kept), dropped
    except ChatError as e:
        raise bad(str(e), "messages") from None


def text_prompt(prompt, tokenizer, chat):
    """A completion's prompt: a string, a list holding one string, or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if chat:
            without_chat_token_text(prompt, "the prompt", "prompt")
        ids = tokenizer.encode(prompt)
        return ids or ([tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n"))
    if (isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)):
        if not all(0 <= i < tokenizer.vocab_size for i in prompt):
            raise bad(f"token ids in 'prompt' must be in [0, {tokenizer.vocab_size})", "prompt")
        return prompt
    raise bad("'prompt' must be a string, or a non-empty list of token ids", "prompt")


# ----------------------------------------------------------------------------- responses

def new_id(kind):
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def finish_reason(sample):
    """The engine's reasons -> OpenAI's: a reply cut short (max_tokens, or the request's deadline) is "length",
    every other end is "stop"."""
    return "length" if sample.finish_reason in ("length", "deadline") else "stop"


def token_text(tokenizer, i):
    """(text, bytes) of token i, as OpenAI's logprobs report a token: bytes that are not UTF-8 on their own
    (part of a character) are written \\xNN in the text."""
    raw = token_bytes(tokenizer, i)
    raw = raw if isinstance(raw, bytes) else raw.encode("utf-8")
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def chat_logprobs(tokenizer, tokens):
    """tokens [(id, (logprob, [(id, logprob), ...]))] -> OpenAI's chat logprobs {"content": [...]}. Each entry
    also carries token_id, which the page sends back to ask why a token was chosen."""
    def entry(i, logprob):
        text, raw = token_text(tokenizer, i)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**entry(i, lp), "token_id": i, "top_logprobs": [entry(j, v) for j, v in top]}
                        for i, (lp, top) in tokens]}


def text_logprobs(tokenizer, tokens, offset=0):
    """The same tokens -> the legacy completions logprobs (parallel lists); offset: the text's start. token_ids
    is ours (the page sends them back to ask why a token was chosen)."""
    texts = [token_text(tokenizer, i)[0] for i, _ in tokens]
    offsets = list(itertools.accumulate((len(t) for t in texts), initial=offset))[:-1]  # where each token starts
    return {"tokens": texts, "token_logprobs": [lp for _, (lp, _) in tokens],
            "top_logprobs": [{token_text(tokenizer, j)[0]: v for j, v in top} for _, (_, top) in tokens],
            "text_offset": offsets, "token_ids": [i for i, _ in tokens]}


def usage(request, sample):
    n = len(sample.ids)
    return {"prompt_tokens": len(request.prompt_ids), "completion_tokens": n,
            "total_tokens": len(request.prompt_ids) + n}


def calculator_calls(calls):
    """[(expression, output, token ids)] -> the "nanoforge_calculator" list (see the module docstring)."""
    return [{"expression": e, "output": out, "token_ids": ids} for e, out, ids in calls]


def response(request, rid, model_name, sample, tokens, tokenizer, text=None, calls=()):
    """The whole answer of a request that did not stream. text: what the client reads (the final text of a reply
    with tools; sample.text when None); calls: its calculator calls [(expression, output, token ids)]."""
    text = sample.text if text is None else text
    if request.kind == "chat":
        logprobs = chat_logprobs(tokenizer, tokens) if request.top_logprobs is not None else None
        message = {"role": "assistant", "content": text}
        if request.tools:
            message["nanoforge_calculator"] = calculator_calls(calls)
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason(sample)}
    else:
        logprobs = text_logprobs(tokenizer, tokens) if request.top_logprobs is not None else None
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(sample)}
    return {"id": rid, "object": "chat.completion" if request.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": [choice], "usage": usage(request, sample)}


def chunk(request, rid, model_name, text=None, tokens=(), tokenizer=None, sample=None, offset=0, first=False,
          calls=()):
    """One server-sent event's JSON of a streamed answer: a piece of text (and the log-probabilities of the
    tokens it came from), a calculator call (calls: [(expression, output, token ids)]), or the end (sample
    given: its finish reason)."""
    logprobs = None
    if request.top_logprobs is not None and tokens:
        logprobs = (chat_logprobs if request.kind == "chat" else text_logprobs)(tokenizer, tokens, *(
            () if request.kind == "chat" else (offset,)))
    reason = finish_reason(sample) if sample is not None else None
    if request.kind == "chat":
        delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
        if calls:
            delta["nanoforge_calculator"] = calculator_calls(calls)
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    return {"id": rid, "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": [choice]}


def usage_chunk(request, rid, model_name, sample):
    """The last chunk when stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": [], "usage": usage(request, sample)}
