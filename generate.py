"""
The generation engine: a KV cache, sampling filters, stop conditions and streaming text.

    from generate import Generator
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
"""

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from chat import ChatError, render_for_reply, require_chat_tokens
from checkpoint import load_model
from device import resolve_device
from model import CausalSelfAttention
from quantize import Int8Linear


class KVCache:
    """Keys and values of every layer for a batch of sequences, allocated once for
    block_size positions. pos counts the positions already filled: a forward pass with the
    cache writes its T positions at pos .. pos + T - 1, and the caller then advances pos."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (batch_size, config.kv_heads, config.block_size, config.n_embd // config.n_head)
        self.layers = [LayerKVCache(self, shape, device, dtype) for _ in range(config.n_layer)]
        self.pos = 0


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


class PackedLinear(nn.Module):
    """nn.Linear's function for decoding on a CPU, with the weight reordered once into the blocked
    layout oneDNN's matrix kernels stream fastest. At batch 1 a step is one vector times every
    weight matrix, so its speed is how fast the weights are read: whole decode steps of the GPT-2
    124M shape ran 16-18 tok/s packed against 9-14 with nn.Linear's [out, in] and 14-18 with a
    pre-transposed [in, out] copy in float32, and 24-35 against 19-32 and 17-23 in bfloat16 (issue
    13; one thread, loaded machine). The result equals F.linear's to float32 round-off."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # tuned for 1 row
        self.bias = linear.bias

    def forward(self, x):
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class LastPositions(nn.Module):
    """The decoder's lm_head: logits for the last `keep` positions only. Prefill needs only the
    next token's logits, and the un-embedding is the biggest matrix: for a 256-token prompt of
    GPT-2 124M, all positions' logits would cost 256 x 50257 x 768 multiply-adds."""

    def __init__(self, head):
        super().__init__()
        self.head, self.keep = head, 1

    def forward(self, x):
        return self.head(x[:, -self.keep :])  # (B, keep, vocab_size)


class OneQueryAttention(CausalSelfAttention):
    """CausalSelfAttention for decoding in 16-bit floats on a CPU: one new query (a decode step) is
    attended in float32 by two plain matrix-vector products and a softmax. torch's fused CPU kernel is
    built for many queries at a time; for one query in bfloat16 it took, per layer of the 124M shape,
    254 us over 256 cached positions where this took 72 (and the same product in bfloat16, 134: its
    small bfloat16 matrix products are slow here). Whole bfloat16 generations, interleaved in one
    process: 124M, 512 tokens, 68.4 against 61.0 tok/s; shakespeare_char, 256 tokens, 456 against
    434. In float32 the fused kernel is as fast and stays; prefill (many queries) keeps it too."""

    def attend(self, q, k, v):
        B, n_head, T, head_dim = q.size()
        if T > 1:
            return super().attend(q, k, v)
        group = n_head // self.n_kv_head  # query heads per key/value head (grouped-query attention)
        q = q.view(B, self.n_kv_head, group, head_dim).float()  # each kv head's group of one-position queries
        scores = q @ k.float().transpose(-2, -1) / math.sqrt(head_dim)  # (B, n_kv_head, group, S)
        y = scores.softmax(dim=-1) @ v.float()  # (B, n_kv_head, group, head_dim)
        return y.to(v.dtype).view(B, n_head, 1, head_dim)


def fast_attention(device, dtype):
    """The attention decoding uses on this device and dtype (None: the model's own)."""
    return OneQueryAttention if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else None


def fast_linear(device, dtype, quantize=None):
    """The Linear replacement decoding uses on this device and dtype (None: nn.Linear itself,
    which on CUDA already runs cuBLAS on the layout it streams fastest)."""
    if quantize == "int8":
        return Int8Linear
    cpu_packs = device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
    return PackedLinear if cpu_packs else None


def decoder_for(model, linear, attention, dtype):
    """A copy of model for decoding in dtype: every nn.Linear replaced by linear(it) (None: kept),
    every CausalSelfAttention made an `attention` (a subclass with the same weights; None: kept),
    and an lm_head that computes the last position's logits only. The model's own forward runs
    it, so architecture options in model.py apply unchanged. In the model's dtype the copy shares
    every other parameter with it (embeddings, norms, biases) and costs one re-laid-out copy of the
    matrices; in another dtype (int8 decodes in bfloat16) it owns its converted parameters."""
    same_dtype = next(model.parameters()).dtype == dtype
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]} if same_dtype else {}
    decoder = copy.deepcopy(model, memo=shared).eval()
    if linear is not None:
        for module in list(decoder.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(module, name, linear(child))
    if attention is not None:
        for module in decoder.modules():
            if type(module) is CausalSelfAttention:
                module.__class__ = attention  # the same module, attending its own way: no new state
    decoder.lm_head = LastPositions(decoder.lm_head)
    return decoder if same_dtype else decoder.to(dtype)  # .to converts in place: never on shared parameters


def candidates(logits, top_k=None, top_p=1.0):
    """The tokens sampling may pick from. logits (B, V) -> (values, ids), each (B, K).

    values are logits, set to -inf outside the top_k most likely tokens and outside the top_p
    nucleus: the smallest set of most likely tokens whose probabilities sum to at least top_p
    (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"). ids maps column j
    back to a token id; it is None when no filter applies and column j is token j."""
    ids = None
    if top_k:
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)))  # sorted, most likely first
    if top_p < 1.0:
        if ids is None:
            logits, ids = logits.sort(dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens; 0 for the most likely
        logits = logits.masked_fill(before >= top_p, float("-inf"))
    return logits, ids


def penalize_repetition(logits, seen, penalty):
    """Make tokens already in the sequence less likely: positive logits are divided by the
    penalty, negative ones multiplied (Keskar et al. 2019, CTRL). seen: (B, V) bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_from(values, ids, uniforms):
    """Pick one token per row by inverse transform: the first column whose cumulative
    probability exceeds u * total. Columns of probability 0 (-inf logits) can never be picked.
    values (B, K) logits, uniforms (B,) in [0, 1) -> token ids (B,)."""
    cdf = F.softmax(values.float(), dim=-1).double().cumsum(dim=-1)  # float64: no round-off past the end
    # u < 1 is a float32, so u * total stays below total: the search never runs off the end.
    choice = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(1), right=True)  # (B, 1)
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)


class TextStream:
    """One sample's tokens turned into text as they arrive. Text is released only once it
    is final: never partway through a multi-byte character (a byte or BPE token can end inside
    one, and the tokenizer decodes an incomplete character as U+FFFD), and never while its end
    could be the start of a stop string. The stop string and anything after it are dropped."""

    MAX_PENDING = 16  # a character has at most 4 bytes; past this the bytes are just invalid

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.pending = []  # tokens not yet decoded into text
        self.text = ""
        self.released = 0  # characters of text already handed out
        self.stopped = False  # a stop string was found

    def push(self, token):
        """Add one token; returns the text that became final (often "")."""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < self.MAX_PENDING:
            return ""  # wait: the next token may complete the character
        self.pending = []
        self.add(piece)
        return self.release()

    def finish(self):
        """The sample ended: release everything that is left."""
        if self.pending and not self.stopped:
            self.add(self.tokenizer.decode(self.pending))
            self.pending = []
        self.stopped = True
        return self.release()

    def add(self, piece):
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def release(self):
        end = len(self.text)
        if not self.stopped:  # hold back a tail that may grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out, self.released = self.text[self.released : end], max(self.released, end)
        return out


def lookup_draft(tokens, k, max_ngram=3):
    """Prompt lookup decoding (Saxena 2023): the up to k tokens that followed the latest earlier
    occurrence of the sequence's last n tokens, trying n = max_ngram first; [] when none. Free to
    compute and often right on text that repeats itself (code, quotes, lists, names)."""
    if k < 1:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


@dataclass
class Sample:
    """One generated continuation. ids are the generated token ids (ending with the
    end-of-text or stop token when that stopped it); text is their decoding, cut before a stop
    string. finish_reason: "length" (max_new_tokens), "eot", "stop" (a stop string) or "end"
    (a token of stop_ids, such as a chat reply's <|assistant_end|>)."""

    prompt_ids: list
    ids: list
    text: str
    finish_reason: str


class SettingError(ValueError):
    """A generation setting out of its range; name is the keyword argument's name."""

    def __init__(self, name, expected, value):
        super().__init__(f"{name} must be {expected}, got {value!r}")
        self.name, self.expected, self.value = name, expected, value


def check_lookup(lookup, temperature, repetition_penalty, n_prompts):
    """Prompt lookup is exact for greedy decoding of one prompt only."""
    if lookup and not (lookup > 0 and temperature == 0 and repetition_penalty == 1.0 and n_prompts == 1):
        raise SettingError("lookup", "0 (off), or above 0 with one prompt (--num-samples 1), temperature 0 and "
                           "repetition_penalty 1", lookup)


def check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, slide, block_size):
    if max_new_tokens < 1:
        raise SettingError("max_new_tokens", "at least 1", max_new_tokens)
    if not temperature >= 0:
        raise SettingError("temperature", "at least 0 (0 picks the most likely token)", temperature)
    if top_k is not None and top_k < 0:
        raise SettingError("top_k", "at least 0 (0 keeps every token)", top_k)
    if not 0 < top_p <= 1:
        raise SettingError("top_p", "in (0, 1] (1 keeps every token)", top_p)
    if not repetition_penalty > 0:
        raise SettingError("repetition_penalty", "above 0 (1 leaves the logits alone)", repetition_penalty)
    if not 1 <= slide <= block_size:
        raise SettingError("slide", f"between 1 and the model's block_size {block_size}", slide)


class Generator:
    """A model and its tokenizer, ready to generate. Decoding runs self.decoder, a copy of the
    model with its matrices in the layout this device reads fastest (decoder_for); the model is
    left as it is. The decoder is a snapshot of the matrices: after changing the model's weights
    (training), make a new Generator. quantize="int8" stores the matrices as int8 with one scale per output channel
    (quantize.py) and decodes in bfloat16. compile=True compiles the one-position decode step with
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
                 on_text=None, lookup=0):
        """Generate one continuation per prompt, all as one batch; returns a list of Sample.

        prompts: strings or lists of token ids. temperature 0 is greedy (argmax). top_k 0 or
        None keeps every token. seed: row i uses seed + i (None: a random seed). stop: strings
        that end a sample (not included in its text). stop_ids: token ids that end a sample (kept in
        its ids, never in its text). stop_at_eot: end a sample at the tokenizer's end-of-text token.
        slide: see the module docstring (None: block_size // 4). on_text(row, text, done) is called
        with each piece of text as soon as it is final (streaming), and once more with done=True (and
        the rest of the text, maybe "") when the row's sample ends. lookup: draft up to this many tokens per step by
        prompt lookup and check them in one forward pass (greedy decoding of one prompt only; the output
        is greedy decoding's, faster on repetitive text)."""
        cfg = self.config
        if not prompts:
            return []
        slide = max(1, cfg.block_size // 4) if slide is None else slide
        check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, slide, cfg.block_size)
        check_lookup(lookup, temperature, repetition_penalty, len(prompts))
        # The model sees at most block_size tokens, so a longer prompt keeps its end (as in GPT.generate).
        batch = Batch([self.encode(p)[-cfg.block_size :] for p in prompts], max_new_tokens, cfg.vocab_size,
                      self.device, seed)
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
        end_ids = {i: "end" for i in stop_ids}
        if stop_at_eot and self.tokenizer.eot_id is not None:
            end_ids[self.tokenizer.eot_id] = "eot"
        finisher = RowFinisher(batch, self.tokenizer, stop, end_ids, on_text)

        cache = KVCache(cfg, batch.size, self.device, self.dtype)
        t = min(batch.lengths)  # index of the next token; tokens 0 .. t - 1 exist in every row
        logits = self.prefill(batch.seq[:, :t], cache)
        while True:
            batch.append(t, self.pick_next_tokens(logits, batch, t, **sampling))
            if finisher.after_token(t):
                return finisher.results
            t += 1  # token t - 1 is new: feed it
            room = min(cfg.block_size - cache.pos - 1, max_new_tokens - (t - batch.lengths[0]) - 1)
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
        A reply ends at <|assistant_end|> (finish reason "end"), or at any other chat token, since
        none can be part of a reply; chat tokens are kept in ids, never in text."""
        require_chat_tokens(self.tokenizer)
        prompts = [render_for_reply(self.tokenizer, messages) for messages in conversations]
        for i, ids in enumerate(prompts):
            if len(ids) > self.config.block_size:  # cutting its start would lose <|bos|> and the first turns
                raise ChatError(f"conversation {i + 1} is {len(ids)} tokens, more than the model's block_size "
                                f"{self.config.block_size}: drop its oldest turns first (chat.fit_to_context)")
        return self.generate(prompts, stop_ids=self.tokenizer.chat_ids.values(), **settings)

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

    def pick_next_tokens(self, logits, batch, t, temperature, top_k, top_p, repetition_penalty):
        """Token t of every row (B,) from the logits (B, V): greedy or sampled with the row's own
        random numbers; rows still reading their prompt take its token t instead."""
        if repetition_penalty != 1.0:
            logits = penalize_repetition(logits, batch.seen, repetition_penalty)
        if temperature == 0:
            next_ids = logits.argmax(dim=-1)
        else:
            values, ids = candidates(logits / temperature, top_k, top_p)
            n = (t - batch.prompt_len).clamp(0, batch.max_new_tokens - 1)  # how many tokens each row has generated
            next_ids = sample_from(values, ids, batch.uniforms.gather(1, n.unsqueeze(1)).squeeze(1))
        return torch.where(batch.prompt_len > t, batch.seq[:, t], next_ids)


class Batch:
    """The token ids of a batch of rows as they grow, and each row's random numbers for sampling."""

    def __init__(self, prompt_ids, max_new_tokens, vocab_size, device, seed):
        self.prompt_ids, self.max_new_tokens = prompt_ids, max_new_tokens
        self.size, self.lengths = len(prompt_ids), [len(p) for p in prompt_ids]
        seq = torch.zeros(self.size, max(self.lengths) + max_new_tokens, dtype=torch.long)  # row b's token t at [b, t]
        seen = torch.zeros(self.size, vocab_size, dtype=torch.bool)  # tokens in each sequence so far
        for b, ids in enumerate(prompt_ids):
            seq[b, : len(ids)] = torch.tensor(ids)
            seen[b, ids] = True
        self.seq, self.seen = seq.to(device), seen.to(device)
        seed = torch.randint(2**62, ()).item() if seed is None else seed
        self.uniforms = torch.stack([
            torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(seed + b)) for b in range(self.size)
        ]).to(device)  # (B, max_new_tokens): row b's n-th generated token uses uniforms[b, n]
        self.prompt_len = torch.tensor(self.lengths, device=device)

    def append(self, t, next_ids):
        self.seq[:, t] = next_ids
        self.seen.scatter_(1, next_ids.unsqueeze(1), True)
        self.last_ids = next_ids.tolist()  # the one host sync per step


class RowFinisher:
    """Streams each row's new text and decides when it is done: a token of end_ids ({id: finish
    reason}, end-of-text among them), a stop string, or max_new_tokens. results[b] is row b's Sample
    once it has finished, None before."""

    def __init__(self, batch, tokenizer, stop, end_ids, on_text):
        self.batch, self.end_ids, self.on_text = batch, end_ids, on_text
        self.streams = [TextStream(tokenizer, stop) for _ in range(batch.size)]
        self.results = [None] * batch.size

    def after_token(self, t):
        """Handle token t of every row (just appended); returns True when every row has finished."""
        batch = self.batch
        for b, token in enumerate(batch.last_ids):
            if self.results[b] is not None or t < batch.lengths[b]:
                continue
            generated = t - batch.lengths[b] + 1
            stream = self.streams[b]
            text, reason = "", self.end_ids.get(token)
            if reason is None:
                text = stream.push(token)
                reason = "stop" if stream.stopped else "length" if generated == batch.max_new_tokens else None
            if reason:
                text += stream.finish()
                ids = batch.seq[b, batch.lengths[b] : t + 1].tolist()
                self.results[b] = Sample(batch.prompt_ids[b], ids, stream.text, reason)
            if self.on_text and (text or reason):
                self.on_text(b, text, reason is not None)
        return all(r is not None for r in self.results)
