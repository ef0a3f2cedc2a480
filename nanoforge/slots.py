"""
Continuous (iteration-level) batching, as Orca schedules it (Yu et al., OSDI '22; vLLM and SGLang do the same):
a fixed number of KV-cache slots, one request's row in each. At every step the rows that finished or were
cancelled give their slot back and waiting requests take it, so a short request never waits for a long one.

    decoder = SlotDecoder(generator, slots=16)
    decoder.add(job)        # while decoder.has_room(); job: a batching.Job
    while decoder.rows:
        decoder.step()      # each row's events go to its own job.emit

One step:
1. prefill: rows with tokens queued to feed (a new request's prompt, the kept context after a window slide, a
   calculator's output) feed them in chunks, at most `prefill_chunk` tokens per step over all rows, so that a
   long prompt neither stalls the others for long nor is fed one token per step;
2. sample: every row whose queue is empty picks its next token from its own logits with its own settings and
   random numbers, streams it, and either ends (max_new_tokens, an end token, a stop string, cancelled, its
   deadline) or queues it to be fed; when it closes a calculator call (a row with tools), the call's output is
   taken at once as forced tokens, never sampled, and queued after it (step 1 feeds the lot);
3. decode: the rows with one token queued feed it in one forward pass of (rows, 1), each at its own position.

A row sees what it would see alone: its positions are its own (a (rows, 1) tensor of positions and a mask of the
keys each row may see), its random numbers come from its own seed, drawn as engine.Generator.generate draws
them, and every setting is its own. A row whose settings or whose sampling fail ends alone, with its error.
Tools run as in generate(tools=True): a forced token counts toward max_new_tokens and uses up its random number
(a row's n-th token, forced or sampled, is paired with uniforms[n]), so a seed gives the same reply here as there.
"""

import time
from collections import deque

import torch

from nanoforge.engine import Sample
from nanoforge.sampling import SettingError, TextStream, candidates, check_settings, sample_from
from nanoforge.tokenizer import has_tools
from nanoforge.tools import ReplyText, ToolCalls

PREFILL_CHUNK = 64  # prompt tokens fed per step, over all rows: bounds how long one step holds the others


class SlotCache:
    """Keys and values of every layer for `slots` rows, allocated once: per layer k and v of shape
    (slots, n_kv_head, block_size, head_dim). Zeros rather than empty: a decode step reads (masked) positions
    past a row's own, and a masked-out NaN would still turn 0 x NaN into NaN."""

    def __init__(self, config, slots, device, dtype):
        shape = (slots, config.kv_heads, config.block_size, config.n_embd // config.n_head)
        self.buffers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                        for _ in range(config.n_layer)]

    def move(self, source, target, length):
        """Copy slot source's first length positions into slot target (keeping the rows packed at the front)."""
        for k, v in self.buffers:
            k[target, :, :length] = k[source, :, :length]
            v[target, :, :length] = v[source, :, :length]


class CacheView:
    """What one forward pass sees of a SlotCache, with the attributes model.py reads (pos, mask, layers):
    slots `rows` (a slice), at pos: an int when one row feeds its next T positions (a prefill chunk), or a
    (rows, 1) tensor when each row feeds one token at its own position (a decode step; mask (rows, 1, 1, S))."""

    def __init__(self, cache, rows, pos, mask=None):
        self.pos, self.mask = pos, mask
        self.layers = [LayerView(self, k[rows], v[rows]) for k, v in cache.buffers]


class LayerView:
    """One layer's part of a CacheView: k and v are views (rows, n_kv_head, block_size, head_dim) of the cache."""

    def __init__(self, view, k, v):
        self.cache, self.k, self.v = view, k, v

    def update(self, k, v):
        """Store the new keys and values (rows, n_kv_head, T, head_dim); return every row's first S positions."""
        pos = self.cache.pos
        if isinstance(pos, int):
            end = pos + k.size(2)
            self.k[:, :, pos:end], self.v[:, :, pos:end] = k, v
        else:  # one position per row, each at its own place
            end = self.cache.mask.size(-1)
            rows = torch.arange(k.size(0), device=k.device)
            self.k[rows, :, pos[:, 0]], self.v[rows, :, pos[:, 0]] = k[:, :, 0], v[:, :, 0]
        return self.k[:, :, :end], self.v[:, :, :end]


class Row:
    """One request in its slot. tokens: its whole sequence so far (prompt, then generated, forced tokens included).
    to_feed: the tokens the model must read before sampling resumes (the prompt while it is prefilled, the kept
    context after a window slide, a sampled token with the tool output forced after it). logits: the next token's
    logits (V,), once to_feed is empty. pos: the positions of its slot filled so far. tools: its ToolCalls when
    it runs the calculator (settings["tools"]), else None; its stream then is a ReplyText, which streams the
    final text only (no calls, outputs or tool tokens)."""

    def __init__(self, job, tokenizer, block_size, number):
        self.job, self.settings, self.number = job, job.settings, number  # number: the order rows came in
        self.prompt_ids = list(job.prompt_ids)[-block_size:]  # the model sees at most block_size tokens
        self.tokens = list(self.prompt_ids)
        self.to_feed = deque(self.tokens)
        self.pos, self.logits, self.generated = 0, None, 0
        self.forced = []  # per generated token: whether the engine fed it (a tool's output) rather than sampled it
        self.tools = ToolCalls(tokenizer) if self.settings.get("tools") else None
        self.stream = (ReplyText if self.tools else TextStream)(tokenizer, self.settings["stop"])
        self.call_start = None  # where in tokens the call being written starts
        seed = self.settings["seed"]
        seed = torch.randint(2**62, ()).item() if seed is None else seed
        # The n-th generated token uses uniforms[n]: the numbers generate() draws for a row with this seed.
        self.uniforms = torch.rand(self.settings["max_new_tokens"], generator=torch.Generator().manual_seed(seed))


def check_row(settings, tokenizer, vocab_size, block_size):
    """A job's settings, checked before it takes a slot (SettingError names the first one out of range)."""
    check_settings(settings["max_new_tokens"], settings["temperature"], None, settings["top_p"], 1.0, 1, block_size)
    k = settings.get("top_logprobs")
    if k is not None and not 0 <= k <= vocab_size:
        raise SettingError("top_logprobs", f"between 0 and the vocabulary's {vocab_size}", k)
    if settings.get("tools") and not has_tools(tokenizer):
        raise SettingError("tools", "False: this model's tokenizer has no tool tokens", settings["tools"])


def pick(logits, temperature, top_p, uniform):
    """One row's next token from its logits (V,): greedy at temperature 0, else sampled with its uniform number,
    exactly as engine.Generator.pick_next_tokens does for a row."""
    if temperature == 0:
        return int(logits.argmax())
    values, ids = candidates(logits[None] / temperature, None, top_p)
    return int(sample_from(values, ids, uniform[None]))


def row_logprobs(logits, token, k):
    """(log-probability of token, [(id, log-probability)] of the k most likely tokens) under logits (V,)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, k)
    return logprobs[token].item(), list(zip(top.indices.tolist(), top.values.tolist()))


class SlotDecoder:
    """Rows of requests decoding together in a SlotCache of `slots` rows; row i sits in slot i. stop_ids: token
    ids that end every reply (a chat model's engine.reply_end_ids); end-of-text ends every reply too."""

    def __init__(self, generator, slots, stop_ids=(), prefill_chunk=PREFILL_CHUNK):
        self.generator, self.config, self.slots = generator, generator.config, slots
        self.cache = SlotCache(self.config, slots, generator.device, generator.dtype)
        self.rows = []
        self.added = 0  # rows added so far: each row's number
        self.prefill_chunk = prefill_chunk
        self.slide = max(1, self.config.block_size // 4)  # as generate()'s default slide
        self.end_ids = {i: "end" for i in stop_ids}
        if generator.tokenizer.eot_id is not None:
            self.end_ids[generator.tokenizer.eot_id] = "eot"
        self.cancelled = 0  # rows that ended because their client went away

    def has_room(self):
        return len(self.rows) < self.slots

    def add(self, job):
        """Give job a slot. Settings out of range end the job at once with its error, taking no slot."""
        try:
            check_row(job.settings, self.generator.tokenizer, self.config.vocab_size, self.config.block_size)
            row = Row(job, self.generator.tokenizer, self.config.block_size, self.added)
        except Exception as e:
            job.emit(("error", e))
            return
        self.added += 1
        self.rows.append(row)

    def step(self):
        self.prefill()
        self.sample()
        self.decode()

    @torch.no_grad()
    def prefill(self):
        """Feed queued tokens, oldest row first, up to prefill_chunk tokens in all (one forward pass per row).
        A row's chunks are always prefill_chunk tokens (the last one what is left, or what its slot has room for),
        never cut to fit what other rows left of the step's budget, so its numbers (and its reply) do not depend
        on the other rows."""
        budget = self.prefill_chunk
        # Oldest first: free() packs the rows into the lowest slots, so a row's slot says nothing of its age.
        waiting = sorted((row.number, i) for i, row in enumerate(self.rows) if row.to_feed)
        for _, i in waiting:
            row = self.rows[i]
            n = min(self.prefill_chunk, len(row.to_feed), self.config.block_size - row.pos)
            if n > budget:
                break  # its next chunk goes first in the next step
            ids = torch.tensor([[row.to_feed.popleft() for _ in range(n)]], device=self.generator.device)
            logits = self.generator.forward(ids, CacheView(self.cache, slice(i, i + 1), row.pos))  # (1, V)
            row.pos += n
            budget -= n
            self.make_room(row)
            row.logits = None if row.to_feed else logits[0]

    def make_room(self, row):
        """A row whose slot is full while it has tokens to feed keeps the newest block_size - slide + 1 tokens up
        to the next one to feed and prefills them again, as generate() slides its window (learned position
        embeddings cannot be shifted in place)."""
        if row.pos == self.config.block_size and row.to_feed:
            upto = len(row.tokens) - len(row.to_feed) + 1  # tokens[upto - 1] is the next one to feed
            keep = self.config.block_size - self.slide + 1
            row.to_feed, row.pos = deque(row.tokens[upto - keep:]), 0

    def sample(self):
        for row in list(self.rows):
            if row.job.cancelled or (row.job.deadline is not None and time.monotonic() > row.job.deadline):
                self.finish(row, "cancelled" if row.job.cancelled else "deadline")
                continue
            if row.to_feed:
                continue  # still reading its prompt
            try:
                reason = self.next_token(row)
            except Exception as e:  # this row's failure is this row's alone
                self.free(row)
                row.job.emit(("error", e))
                continue
            if reason:
                self.finish(row, reason)

    def next_token(self, row):
        """Pick, stream and queue row's next token, and the output of a call it closes; returns the finish reason
        when the row ends, else None."""
        token = pick(row.logits, row.settings["temperature"], row.settings["top_p"], row.uniforms[row.generated])
        reason = self.take(row, token, forced=False)
        if reason:
            return reason
        output = self.call_output(row, token) if row.tools else []
        for forced in output:  # taken now, fed with the token: the model reads them but never picks them
            reason = self.take(row, forced, forced=True)
            if reason:
                break
        if output:
            expression, result = row.tools.calls[-1]
            row.job.emit(("call", expression, result, row.tokens[row.call_start:]))
        if reason:
            return reason
        row.to_feed.extend([token, *output])
        self.make_room(row)
        return None

    def take(self, row, token, forced):
        """Add token to row's reply and stream it (forced: fed by the engine, not sampled); returns the finish
        reason when it ends the row, else None. Every token counts toward max_new_tokens, as in generate()."""
        job, settings = row.job, row.settings
        shown = row.tools is None or row.stream.shows(token)  # a call, an output or a tool token is not text
        row.tokens.append(token)
        row.forced.append(forced)
        row.generated += 1
        reason = self.end_ids.get(token)
        if reason is not None:
            return reason
        if settings.get("top_logprobs") is not None and shown:
            job.emit(("token", token, row_logprobs(row.logits, token, settings["top_logprobs"])))
        text = row.stream.push(token)
        if text:
            job.emit(("text", text))
        if row.stream.stopped:
            return "stop"
        if row.generated == settings["max_new_tokens"]:
            return "length"
        return None

    def call_output(self, row, token):
        """The tokens to force after row's sampled token: a call's output when token closes one, else []."""
        if token == row.tools.start and row.tools.expression is None:
            row.call_start = len(row.tokens) - 1  # a call opens: its tokens start here
        return row.tools.after(token)

    @torch.no_grad()
    def decode(self):
        """One forward pass feeding every row's one queued token at the row's own position. Rows still
        prefilling ride along with a dummy token at their next position, which their next chunk overwrites:
        cheaper than gathering the other rows out of the cache."""
        feeding = [len(row.to_feed) == 1 for row in self.rows]
        if not any(feeding):
            return
        device = self.generator.device
        ids = torch.tensor([[row.to_feed[0] if f else 0] for row, f in zip(self.rows, feeding)], device=device)
        pos = torch.tensor([[row.pos] for row in self.rows], device=device)  # (rows, 1)
        keys = torch.arange(int(pos.max()) + 1, device=device)  # (S,)
        mask = (keys <= pos)[:, None, None, :]  # (rows, 1, 1, S): each row sees its own positions only
        logits = self.generator.forward(ids, CacheView(self.cache, slice(0, len(self.rows)), pos, mask))  # (rows, V)
        for row, f, row_logits in zip(self.rows, feeding, logits):
            if f:
                row.to_feed.popleft()
                row.pos += 1
                row.logits = row_logits

    def finish(self, row, reason):
        self.free(row)
        self.cancelled += reason == "cancelled"
        rest = row.stream.finish()
        if rest:
            row.job.emit(("text", rest))
        ids = row.tokens[len(row.prompt_ids):]
        calls = list(row.tools.calls) if row.tools else []
        row.job.emit(("done", Sample(row.prompt_ids, ids, row.stream.text, reason, row.forced, calls)))

    def free(self, row):
        """Give row's slot back; the last row moves into it, so the rows stay packed in slots 0 .. n - 1."""
        i, last = self.rows.index(row), self.rows[-1]
        if last is not row:
            self.cache.move(len(self.rows) - 1, i, last.pos)
            self.rows[i] = last
        self.rows.pop()
