"""
The generation engine: a KV cache, prefill and decode, batches of prompts and their stop conditions. What to
pick at each step is sampling.py's; the layers a CPU decodes with are cpu_decoding.py's.

    from nanoforge.engine import Generator
    gen = Generator.from_checkpoint("out/shakespeare_char_cpu")
    for s in gen.generate(["ROMEO:", "JULIET:"], max_new_tokens=100, top_p=0.9, seed=1):
        print(s.text, s.ids, s.finish_reason)

How it works:
- The prompts are run through the model once (prefill), filling each layer's pre-allocated
  key/value buffers; after that every step feeds one new position per sequence (decode), so
  a token costs one position's work instead of re-running the whole context as
  GPT.generate (the reference the tests compare against) does.
- The rows of a batch advance in lockstep, one position per step. Prompts of different
  lengths: the length they all have is prefilled together, then longer prompts feed their
  remaining tokens one per step (what is sampled for them is ignored until their prompt is
  used up) while shorter ones already generate. Each row's token t sits at position t,
  exactly as when it is generated alone.
- When the context would pass block_size, the oldest `slide` tokens are dropped and the rest
  is prefilled again (learned position embeddings cannot be shifted in place). That happens
  once per `slide` new tokens, and each token attends over between block_size - slide + 1 and
  block_size tokens. The default slide is block_size // 4. slide=1 makes every step see the
  last block_size tokens, exactly as GPT.generate does, at the cost of one full forward pass
  per token, the same work as the reference.
- Sampling draws its random numbers per row, before generation starts: row i uses a CPU
  torch.Generator seeded with seed + i, one uniform number per generated token, and picks the
  token by inverse transform of the (filtered) distribution. So sample i of a batch equals a
  single generation with seed + i, on any device, and a row's draws do not depend on how many
  tokens other rows need.
- Rows may have settings of their own (a server batches requests that asked for different
  things): max_new_tokens, temperature, top_p, seed and stop take one value per prompt. Rows
  that share temperature and top_p are filtered and sampled together, exactly as they would be
  alone, so a request's reply does not depend on what it was batched with.
- Tools (tools=True, chat models): each row may call the calculator. When a row's tokens complete a call
  (<|python_start|> expression <|python_end|>), tools.ToolCalls evaluates it and the result is queued for that row
  (<|output_start|> result <|output_end|>); queued tokens are fed one per step instead of sampled, as a prompt
  still being read is, and the row samples again once its queue is empty. Sample.forced marks them.
"""

from collections import deque
from dataclasses import dataclass

import torch

from nanoforge.chat_format import ChatError, render_for_reply, require_chat_tokens
from nanoforge.cpu_decoding import decoder_for, fast_attention, fast_linear
from nanoforge.device import resolve_device
from nanoforge.loading import load_model
from nanoforge.tokenizer import TOOL_TOKENS, has_tools
from nanoforge.tools import ToolCalls
from nanoforge.sampling import (
    SettingError,
    TextStream,
    candidates,
    check_lookup,
    check_settings,
    lookup_draft,
    penalize_repetition,
    sample_from,
)


class KVCache:
    """Keys and values of every layer for a batch of sequences, allocated once for
    block_size positions. pos counts the positions already filled: a forward pass with the
    cache writes its T positions at pos .. pos + T - 1, and the caller then advances pos."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.kv_heads, config.block_size, config.n_embd // config.n_head)
        self.layers = [LayerKVCache(self, shape, device, dtype) for _ in range(config.n_layer)]
        self.pos = 0
        self.mask = None  # every row is at the same position: attention makes the causal mask itself


class LayerKVCache:
    """One layer's part of a KVCache: k and v are (B, n_kv_head, block_size, head_dim)."""

    def __init__(self, cache, shape, device, dtype):
        self.cache = cache
        self.k = torch.empty(shape, device=device, dtype=dtype)  # only filled positions are ever read
        self.v = torch.empty(shape, device=device, dtype=dtype)

    def update(self, k, v):
        """Store the keys and values (B, n_kv_head, T, head_dim) of positions pos .. pos + T - 1;
        return those of positions 0 .. pos + T - 1: (B, n_kv_head, pos + T, head_dim)."""
        start, end = self.cache.pos, self.cache.pos + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class Sample:
    """One generated continuation. ids are the generated token ids (ending with the
    end-of-text or stop token when that stopped it); text is their decoding, cut before a stop
    string. finish_reason: "length" (max_new_tokens), "eot", "stop" (a stop string), "end"
    (a token of stop_ids, such as a chat reply's <|assistant_end|>) or "cancelled". forced[i] is whether ids[i] was
    fed by the engine (a tool's output) rather than sampled; calls the row's (expression, output) tool calls."""

    prompt_ids: list
    ids: list
    text: str
    finish_reason: str
    forced: list = None
    calls: list = ()


class Generator:
    """A model and its tokenizer, ready to generate. Decoding runs self.decoder, a copy of the
    model with its matrices in the layout this device reads fastest (decoder_for); the model is
    left as it is. The decoder is a snapshot of the matrices: after changing the model's weights
    (training), make a new Generator. quantize="int8" stores the matrices as int8 with one scale per output channel
    (cpu_decoding.Int8Linear) and decodes in bfloat16. compile=True compiles the one-position decode step with
    torch.compile; the cache length is a dynamic dimension, so it compiles once (and once more for
    the cache's last position, a size dynamo specialises), not per step."""

    def __init__(self, model, tokenizer, compile=False, quantize=None):
        param = next(model.parameters())
        if quantize not in (None, "int8"):
            raise SettingError("quantize", "None or 'int8'", quantize)
        if quantize and param.device.type != "cpu":  # Int8Linear runs torch's CPU int8 kernel
            raise SettingError("quantize", f"off on {param.device.type} (int8 decoding is built on the CPU's int8 "
                               "kernel; use bfloat16 there)", quantize)
        self.device = param.device
        self.dtype = torch.bfloat16 if quantize else param.dtype
        # torch.compile traces the model's plain Linear layers (it lays weights out itself).
        linear = None if compile and not quantize else fast_linear(self.device, self.dtype, quantize)
        self.decoder = decoder_for(model.eval(), linear, fast_attention(self.device, self.dtype), self.dtype)
        self.tokenizer = tokenizer
        self.config = model.config
        self.decode_step = torch.compile(self.forward, dynamic=True) if compile else self.forward

    @classmethod
    def from_checkpoint(cls, ckpt, device="auto", dtype=torch.float32, compile=False, quantize=None):
        """ckpt: a run directory or checkpoint file. dtype: the weights' dtype for decoding
        (torch.bfloat16 halves the bytes read per token; the logits are sampled in float32)."""
        model, tokenizer = load_model(ckpt, resolve_device(device) if isinstance(device, str) else device)
        return cls(model.to(dtype), tokenizer, compile=compile, quantize=quantize)

    def encode(self, prompt):
        """A prompt (text, or a list of token ids) -> token ids. An empty prompt starts from the
        end-of-text token, or from a newline for tokenizers that have none (character-level)."""
        if not isinstance(prompt, str):
            ids = list(prompt)
            if any(not 0 <= i < self.config.vocab_size for i in ids):
                raise ValueError(f"prompt ids must be in [0, {self.config.vocab_size}), got {ids}")
        else:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            ids = [self.tokenizer.eot_id] if self.tokenizer.eot_id is not None else self.tokenizer.encode("\n")
        return ids

    def forward(self, idx, cache):
        """Run idx (B, T) at the cache's next positions; returns the last position's logits (B, V)."""
        logits, _ = self.decoder(idx, kv_cache=cache)
        return logits[:, -1].float()

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=256, temperature=1.0, top_k=None, top_p=1.0,
                 repetition_penalty=1.0, seed=None, stop=(), stop_ids=(), stop_at_eot=True, slide=None,
                 on_text=None, lookup=0, on_token=None, top_logprobs=0, cancelled=None, tools=False):
        """Generate one continuation per prompt, all as one batch; returns a list of Sample.

        prompts: strings or lists of token ids. temperature 0 is greedy (argmax). top_k 0 or
        None keeps every token. seed: row i uses seed + i (None: a random seed). stop: strings
        that end a sample (not included in its text). stop_ids: token ids that end a sample (kept in
        its ids, never in its text). stop_at_eot: end a sample at the tokenizer's end-of-text token.
        slide: see the module docstring (None: block_size // 4). on_text(row, text, done) is called
        with each piece of text as soon as it is final (streaming), and once more with done=True (and
        the rest of the text, maybe "") when the row's sample ends. lookup: draft up to this many tokens per step by
        prompt lookup and check them in one forward pass (greedy decoding of one prompt only; the output
        is greedy decoding's, faster on repetitive text).

        Per row: max_new_tokens, temperature, top_p and seed may be lists with one value per prompt
        (a list of seeds gives row i seed[i]), stop a list of lists of strings. on_token(row, token,
        logprobs) is called with each generated token that is part of a row's text (not an end token);
        logprobs is (the token's log-probability, [(id, log-probability) of the top_logprobs most likely
        tokens]) under the model's own distribution (before temperature and filters). cancelled(row) ->
        bool is asked after every step; a cancelled row ends with finish reason "cancelled". tools: run the
        calculator in every row (a chat model's tokenizer with the tool tokens; see the module docstring)."""
        cfg = self.config
        if not prompts:
            return []
        n = len(prompts)
        slide = max(1, cfg.block_size // 4) if slide is None else slide
        max_new, temperatures, top_ps, seeds, stops = row_settings(n, max_new_tokens, temperature, top_p, seed, stop)
        for row_max_new, row_temperature, row_top_p in zip(max_new, temperatures, top_ps):
            check_settings(row_max_new, row_temperature, top_k, row_top_p, repetition_penalty, slide, cfg.block_size)
        check_lookup(lookup, temperature, repetition_penalty, n)
        if lookup and on_token:
            raise SettingError("lookup", "0 when per-token log-probabilities are asked for", lookup)
        if lookup and tools:
            raise SettingError("lookup", "0 when the model may call tools (their outputs are fed, not drafted)", lookup)
        if tools and not has_tools(self.tokenizer):
            raise SettingError("tools", "False: this model's tokenizer has no tool tokens (fine-tune it on data "
                               "with tool calls, e.g. `prepare.py arithmetic`)", tools)
        # The model sees at most block_size tokens, so a longer prompt keeps its end (as in GPT.generate).
        batch = Batch([self.encode(p)[-cfg.block_size :] for p in prompts], max_new, cfg.vocab_size,
                      self.device, seeds)
        sampling = dict(groups=sampling_groups(temperatures, top_ps, self.device), top_k=top_k,
                        repetition_penalty=repetition_penalty)
        end_ids = {i: "end" for i in stop_ids}
        if stop_at_eot and self.tokenizer.eot_id is not None:
            end_ids[self.tokenizer.eot_id] = "eot"
        finisher = RowFinisher(batch, self.tokenizer, stops, end_ids, on_text, on_token, cancelled, tools)

        cache = KVCache(cfg, batch.size, self.device, self.dtype)
        t = min(batch.lengths)  # index of the next token; tokens 0 .. t - 1 exist in every row
        logits = self.prefill(batch.seq[:, :t], cache)
        while True:
            batch.append(t, self.pick_next_tokens(logits, batch, t, **sampling))
            if finisher.after_token(t, token_logprobs(logits, batch.seq[:, t], top_logprobs) if on_token else None):
                return finisher.results
            t += 1  # token t - 1 is new: feed it
            room = min(cfg.block_size - cache.pos - 1, max_new[0] - (t - batch.lengths[0]) - 1)
            draft = lookup_draft(batch.seq[0, :t].tolist(), min(lookup, room)) if lookup else []
            if cache.pos == cfg.block_size:  # no room for it: drop the oldest tokens, prefill the rest
                logits = self.slide_window(batch.seq, t, slide, cache)
            elif draft:
                logits, accepted = self.verify_draft(batch.seq[:, t - 1 : t], draft, cache)
                for token in accepted:  # each is the token greedy decoding picks at t
                    batch.append(t, torch.tensor([token], device=self.device))
                    if finisher.after_token(t):
                        return finisher.results
                    t += 1
            else:
                logits = self.decode_one_token(batch.seq[:, t - 1 : t], cache)

    def chat(self, messages, **settings):
        """The next assistant turn of one conversation (a list of {"role", "content"} ending with a
        user message): a Sample whose text is the reply. settings: generate()'s keyword arguments."""
        return self.replies([messages], **settings)[0]

    def replies(self, conversations, **settings):
        """The next assistant turn of each conversation, generated as one batch; a list of Sample.
        A reply ends at <|assistant_end|> (finish reason "end"), or at any other chat token but the tool tokens,
        since none can be part of a reply; chat tokens are kept in ids, never in text. The tool tokens are text's,
        written by their names (tools.reply_parts reads a reply's ids as text, calls and outputs); with
        tools=True the engine answers each call (generate's tools)."""
        require_chat_tokens(self.tokenizer)
        prompts = [render_for_reply(self.tokenizer, messages) for messages in conversations]
        for i, ids in enumerate(prompts):
            if len(ids) > self.config.block_size:  # cutting its start would lose <|bos|> and the first turns
                raise ChatError(f"conversation {i + 1} is {len(ids)} tokens, more than the model's block_size "
                                f"{self.config.block_size}: drop its oldest turns first (chat.fit_to_context)")
        return self.generate(prompts, stop_ids=reply_end_ids(self.tokenizer), **settings)

    def prefill(self, idx, cache):
        """Run the prompts' common part idx (B, T) through the model from position 0, filling the
        cache; returns the logits for the token after it (B, V)."""
        cache.pos = 0
        logits = self.forward(idx, cache)
        cache.pos = idx.size(1)
        return logits

    def decode_one_token(self, idx, cache):
        """Feed one new position per row, idx (B, 1); returns the next logits (B, V)."""
        logits = self.decode_step(idx, cache)
        cache.pos += 1
        return logits

    def verify_draft(self, last, draft, cache):
        """Feed the newest token last (1, 1) and the drafted tokens in one forward pass and keep the
        longest start of the draft that greedy decoding picks. Returns the logits after the last
        kept token (1, V) and the kept tokens; the cache keeps only their positions (the rejected
        ones are overwritten later)."""
        idx = torch.cat([last, torch.tensor([draft], device=self.device)], dim=1)  # (1, 1 + k)
        self.decoder.lm_head.keep = idx.size(1)
        try:
            logits = self.decoder(idx, kv_cache=cache)[0].float()  # (1, 1 + k, V)
        finally:
            self.decoder.lm_head.keep = 1
        predicted = logits[0].argmax(dim=-1).tolist()  # the one host sync of the step
        kept = 0
        while kept < len(draft) and predicted[kept] == draft[kept]:
            kept += 1
        cache.pos += 1 + kept
        return logits[:, kept], draft[:kept]

    def slide_window(self, seq, t, slide, cache):
        """The cache is full: keep the last block_size - slide + 1 of the t tokens and prefill them again
        (learned position embeddings cannot be shifted in place)."""
        keep = self.config.block_size - slide + 1
        return self.prefill(seq[:, t - keep : t], cache)

    def pick_next_tokens(self, logits, batch, t, groups, top_k, repetition_penalty):
        """Token t of every row (B,) from the logits (B, V): greedy or sampled with the row's own
        random numbers; rows still reading their prompt take its token t instead. groups: the rows
        sharing each (temperature, top_p), as sampling_groups makes them."""
        if repetition_penalty != 1.0:
            logits = penalize_repetition(logits, batch.seen, repetition_penalty)
        n = (t - batch.prompt_len).clamp(0, batch.uniforms.size(1) - 1)  # how many tokens each row has generated
        uniforms = batch.uniforms.gather(1, n.unsqueeze(1)).squeeze(1)  # (B,)
        next_ids = torch.empty(batch.size, dtype=torch.long, device=self.device)
        for temperature, top_p, rows in groups:
            part = logits if rows is None else logits[rows]  # (rows, V)
            if temperature == 0:
                picked = part.argmax(dim=-1)
            else:
                values, ids = candidates(part / temperature, top_k, top_p)
                picked = sample_from(values, ids, uniforms if rows is None else uniforms[rows])
            if rows is None:
                next_ids = picked
            else:
                next_ids[rows] = picked
        next_ids = torch.where(batch.prompt_len > t, batch.seq[:, t], next_ids)
        return batch.feed_forced(t, next_ids)


def reply_end_ids(tokenizer):
    """The tokens that end a chat reply: every chat token but the tool tokens, which are part of one."""
    return [i for name, i in tokenizer.chat_ids.items() if name not in TOOL_TOKENS]


def row_settings(n, max_new_tokens, temperature, top_p, seed, stop):
    """generate()'s per-row settings as lists of n values each: (max_new_tokens, temperature, top_p, seed,
    stop). A seed given once gives row i seed + i; stop given once is a list of strings."""
    max_new, temperatures, top_ps = (per_row(v, n, name) for v, name in (
        (max_new_tokens, "max_new_tokens"), (temperature, "temperature"), (top_p, "top_p")))
    seeds = per_row(seed, n, "seed") if isinstance(seed, list) else [None if seed is None else seed + i
                                                                      for i in range(n)]
    stops = stop if stop and isinstance(stop[0], (list, tuple)) else [stop] * n
    if len(stops) != n:
        raise SettingError("stop", f"a list of strings, or {n} such lists (one per prompt)", stop)
    return max_new, temperatures, top_ps, seeds, stops


def per_row(value, n, name):
    """A setting given once for every row, or as a list of one value per row -> a list of n values."""
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise SettingError(name, f"one value, or a list of {n} (one per prompt)", value)
    return value


def sampling_groups(temperatures, top_ps, device):
    """[(temperature, top_p, rows)]: the rows (an index tensor; None when it is every row) that share
    each setting. Filtering and sampling a group together gives each row what it would get alone:
    top-p sorts the candidates, so a row must not be sorted because another row asked for top-p."""
    shared = {}
    for b, setting in enumerate(zip(temperatures, top_ps)):
        shared.setdefault(setting, []).append(b)
    if len(shared) == 1:
        return [(*setting, None) for setting in shared]
    return [(*setting, torch.tensor(rows, device=device)) for setting, rows in shared.items()]


def token_logprobs(logits, chosen, k):
    """The log-probabilities of the chosen tokens (B,) and the k most likely tokens under logits (B, V):
    (chosen (B,), top values (B, k), top ids (B, k)) as lists."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(logprobs, k)
    return (logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist(), top.values.tolist(), top.indices.tolist())


class Batch:
    """The token ids of a batch of rows as they grow, and each row's random numbers for sampling."""

    def __init__(self, prompt_ids, max_new_tokens, vocab_size, device, seeds):
        self.prompt_ids, self.max_new_tokens = prompt_ids, max_new_tokens  # max_new_tokens: one per row
        self.size, self.lengths = len(prompt_ids), [len(p) for p in prompt_ids]
        longest = max(max_new_tokens)
        seq = torch.zeros(self.size, max(self.lengths) + longest, dtype=torch.long)  # row b's token t at [b, t]
        seen = torch.zeros(self.size, vocab_size, dtype=torch.bool)  # tokens in each sequence so far
        for b, ids in enumerate(prompt_ids):
            seq[b, : len(ids)] = torch.tensor(ids)
            seen[b, ids] = True
        self.seq, self.seen = seq.to(device), seen.to(device)
        seeds = [torch.randint(2**62, ()).item() if s is None else s for s in seeds]
        # torch.rand draws a CPU generator's numbers in order, so the first n of `longest` draws are the n a
        # row would draw alone: a row's numbers do not depend on the other rows' lengths.
        self.uniforms = torch.stack([
            torch.rand(longest, generator=torch.Generator().manual_seed(s)) for s in seeds
        ]).to(device)  # (B, longest): row b's n-th generated token uses uniforms[b, n]
        self.prompt_len = torch.tensor(self.lengths, device=device)
        self.queued = [deque() for _ in prompt_ids]  # tokens each row is fed before it samples again (tool outputs)
        self.forced = [set() for _ in prompt_ids]  # the positions t where a row was fed a queued token

    def feed_forced(self, t, next_ids):
        """next_ids (B,) with each row that has queued tokens taking the first of them instead."""
        rows = [b for b, queue in enumerate(self.queued) if queue]
        if not rows:
            return next_ids
        for b in rows:
            self.forced[b].add(t)
        tokens = torch.tensor([self.queued[b].popleft() for b in rows], device=next_ids.device)
        return next_ids.index_put((torch.tensor(rows, device=next_ids.device),), tokens)

    def append(self, t, next_ids):
        self.seq[:, t] = next_ids
        self.seen.scatter_(1, next_ids.unsqueeze(1), True)
        self.last_ids = next_ids.tolist()  # the one host sync per step


class RowFinisher:
    """Streams each row's new text and decides when it is done: a token of end_ids ({id: finish
    reason}, end-of-text among them), a stop string, max_new_tokens, or cancelled(row). results[b] is
    row b's Sample once it has finished, None before."""

    def __init__(self, batch, tokenizer, stops, end_ids, on_text, on_token=None, cancelled=None, tools=False):
        self.batch, self.end_ids, self.on_text = batch, end_ids, on_text
        self.on_token, self.cancelled = on_token, cancelled
        self.streams = [TextStream(tokenizer, stop) for stop in stops]
        self.tools = [ToolCalls(tokenizer) for _ in stops] if tools else None
        self.results = [None] * batch.size

    def after_token(self, t, logprobs=None):
        """Handle token t of every row (just appended); returns True when every row has finished.
        logprobs: token_logprobs of this step, for on_token."""
        batch = self.batch
        for b, token in enumerate(batch.last_ids):
            if self.results[b] is not None or t < batch.lengths[b]:
                continue
            generated = t - batch.lengths[b] + 1
            stream = self.streams[b]
            text, reason = "", self.end_ids.get(token)
            if reason is None and self.cancelled and self.cancelled(b):
                reason = "cancelled"
            elif reason is None:
                if self.on_token:
                    chosen, values, ids = logprobs
                    self.on_token(b, token, (chosen[b], list(zip(ids[b], values[b]))))
                text = stream.push(token)
                reason = "stop" if stream.stopped else "length" if generated == batch.max_new_tokens[b] else None
            if reason is None and self.tools and t not in batch.forced[b]:
                batch.queued[b].extend(self.tools[b].after(token))  # a call that just closed: its output
            if reason:
                text += stream.finish()
                start = batch.lengths[b]
                ids = batch.seq[b, start : t + 1].tolist()
                forced = [u in batch.forced[b] for u in range(start, t + 1)]
                calls = self.tools[b].calls if self.tools else []
                self.results[b] = Sample(batch.prompt_ids[b], ids, stream.text, reason, forced, calls)
            if self.on_text and (text or reason):
                self.on_text(b, text, reason is not None)
        return all(r is not None for r in self.results)
