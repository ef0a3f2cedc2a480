"""
Looking inside a trained GPT: what it predicts at each position, where each head looks, what
each layer would predict if the network stopped there (the logit lens), and one forward pass
told stage by stage. Everything is computed by the model's own modules, in eval mode, without
gradients; nothing here changes the model.

explain.py shows these in the terminal, as PNG heatmaps and as a self-contained HTML page
(inspect_html.py). They work for any checkpoint of ours and for GPT-2.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from nanoforge.engine import KVCache
from nanoforge.tokenizer import EOT


def token_bytes(tokenizer, i):
    """The text of token i: bytes for a byte-level token (byte tokenizer, BPE), which may hold part of
    a UTF-8 character; otherwise (char tokens, special tokens) the str the tokenizer decodes it to."""
    if i == tokenizer.eot_id:
        return EOT
    if tokenizer.kind == "byte" and i < 256:
        return bytes([i])
    base = getattr(tokenizer, "base", tokenizer)  # a ChatTokenizer adds its tokens to a base tokenizer
    enc = getattr(base, "enc", None)  # BPE: tiktoken knows each token's bytes
    if enc is not None and i < enc.n_vocab:
        return enc.decode_single_token_bytes(i)
    return tokenizer.decode([i])


CONTROL_NAMES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def token_label(tokenizer, i):
    """Token i as readable text: bytes that are not valid UTF-8 on their own are written \\xNN,
    newlines and tabs as \\n and \\t so a label stays on one line, and other control characters
    as \\xNN so none reaches the terminal."""
    text = token_bytes(tokenizer, i)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="backslashreplace")
    return "".join(CONTROL_NAMES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c) for c in text)


def fit_prompt(ids, max_tokens, block_size):
    """The last min(max_tokens, block_size) ids, and how many were dropped from the front."""
    keep = min(max_tokens, block_size)
    return ids[-keep:], max(0, len(ids) - keep)


@torch.no_grad()
def residual_streams(model, idx):
    """The residual stream (1, T, n_embd) entering the first block and leaving each block:
    n_layer + 1 tensors, captured by hooks while the model runs its own forward pass."""
    captured = []
    modules = [model.transformer.drop, *model.transformer.h]
    hooks = [m.register_forward_hook(lambda module, args, out: captured.append(out)) for m in modules]
    try:
        model(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return captured


@torch.no_grad()
def logit_lens(model, idx):
    """For each residual stream (after the embeddings, then after each block): the logits
    (T, vocab_size) the model would output if the network ended there, i.e. the stream through
    the final norm and the un-embedding (nostalgebraist, "interpreting GPT: the logit lens",
    2020). Yields them one at a time: for GPT-2 all of them at once would take gigabytes."""
    for x in residual_streams(model, idx):
        yield model.unembed(x)[0].float()  # final norm, lm_head (and soft-capping): the model's own


@dataclass
class Explanation:
    """What explain.py shows about one prompt (T tokens)."""

    tokenizer: object
    ids: list  # the T token ids
    labels: list  # their readable text (token_label)
    probs: torch.Tensor  # (T, vocab_size) next-token probabilities
    patterns: torch.Tensor  # (n_layer, n_head, T, T) attention weights, rows = queries
    lens_ids: torch.Tensor  # (n_layer + 1, T, k) each layer's top-k predictions under the logit lens
    lens_probs: torch.Tensor  # (n_layer + 1, T, k) and their probabilities

    def loss(self):
        """Mean cross-entropy of the prompt's own next tokens (T - 1 predictions), or None for T = 1."""
        if len(self.ids) < 2:
            return None
        targets = torch.tensor(self.ids[1:])
        return -self.probs[:-1].gather(1, targets[:, None]).log().mean().item()

    def label(self, token):
        return token_label(self.tokenizer, token)

    def rank(self, t, token):
        """1-based rank of `token` among the predictions at position t."""
        return int((self.probs[t] > self.probs[t, token]).sum()) + 1


@torch.no_grad()
def explain(model, tokenizer, ids, lens_k=3):
    """An Explanation of ids (a list of at most block_size token ids) under model (in eval mode)."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    patterns = torch.stack([w[0] for w in model.attention_weights(idx)]).float().cpu()
    lens = []
    for logits in logit_lens(model, idx):
        probs = F.softmax(logits, dim=-1)  # after the last block: the model's own next-token probabilities
        lens.append(torch.topk(probs, lens_k))
    return Explanation(
        tokenizer=tokenizer, ids=list(ids), labels=[token_label(tokenizer, i) for i in ids],
        probs=probs.cpu(), patterns=patterns,
        lens_ids=torch.stack([top.indices for top in lens]).cpu(),
        lens_probs=torch.stack([top.values for top in lens]).cpu(),
    )


# ----------------------------------------------------------------------------- the trace

@dataclass
class Stage:
    """One step of the forward pass: its name in the vocabulary of the transformer, and its output."""

    name: str
    value: torch.Tensor
    block: int = None  # the block it belongs to, None outside the blocks
    scores: bool = False  # a (B, n_head, T, T) tensor of queries by keys


@torch.no_grad()
def trace(model, idx):
    """One forward pass of idx (1, T), stage by stage, through the model's own modules: a list of
    Stages ending with the next-token probabilities, which equal softmax(model(idx) logits)."""
    stages = []

    def stage(name, value, block=None, scores=False):
        stages.append(Stage(name, value, block, scores))
        return value

    tr = model.transformer
    T = idx.size(1)
    stage("token ids", idx)
    tokens = stage("token embeddings: wte[token id]", tr.wte(idx))  # (1, T, n_embd)
    if "wpe" in tr:
        positions = stage("position embeddings: wpe[position]", tr.wpe(torch.arange(T, device=idx.device)))
        x = stage("token + position embeddings: the residual stream", tr.drop(tokens + positions))
    else:  # rotary: positions enter each block by rotating its queries and keys
        x = stage("token embeddings: the residual stream (rotary positions act in attention)", tr.drop(tokens))
    for i, block in enumerate(tr.h):
        x = trace_block(block, x, lambda name, value, scores=False: stage(name, value, i, scores))
    x = stage("final norm (ln_f)", tr.ln_f(x))
    logits = stage("un-embedding (lm_head): logits", model.lm_head(x))  # (1, T, vocab_size)
    cap = model.config.logit_softcap
    if cap > 0:
        logits = stage(f"soft-capped: {cap:g} * tanh(logits / {cap:g})", model.soft_cap(logits))
    stage("softmax: next-token probabilities", F.softmax(logits.float(), dim=-1))
    return stages


def trace_block(block, x, stage):
    """A pre-norm block, x + attn(ln_1(x)) then x + mlp(ln_2(x)), one stage at a time."""
    h = stage("norm (ln_1)", block.ln_1(x))
    x = stage("residual add: x + attention", x + trace_attention(block.attn, h, stage))
    h = stage("norm (ln_2)", block.ln_2(x))
    return stage("residual add: x + MLP", x + trace_mlp(block.mlp, h, stage))


def trace_attention(attn, x, stage):
    """CausalSelfAttention.forward's explicit path, keeping every intermediate tensor."""
    B, T, C = x.size()
    kv_width = attn.n_kv_head * attn.head_dim
    q, k, v = attn.c_attn(x).split([C, kv_width, kv_width], dim=2)  # the Q, K, V projections (c_attn)
    q = q.view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
    k, v = (t.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2) for t in (k, v))  # (B, n_kv_head, T, hd)
    stage("queries Q per head", q)
    stage("keys K per head" + (f" ({attn.n_kv_head} shared by {attn.n_head} query heads)"
                               if attn.n_kv_head != attn.n_head else ""), k)
    stage("values V per head", v)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
        stage("QK-norm: queries normalised", q)
        stage("QK-norm: keys normalised", k)
    if attn.rotary is not None:
        q, k = attn.rotary(q, 0), attn.rotary(k, 0)
        stage("rotary: queries rotated by position", q)
        stage("rotary: keys rotated by position", k)
    steps = {}
    y, weights = attn.attention_math(q, k, v, steps)
    stage("scores Q K^T", steps["scores"], scores=True)  # (B, n_head, T, T)
    stage(f"scaled by 1/sqrt(d_head) = 1/sqrt({attn.head_dim})", steps["scaled"], scores=True)
    stage("masked: -inf above the diagonal (no looking ahead)", steps["masked"], scores=True)
    stage("softmax: attention weights (the pattern)", weights, scores=True)
    stage("weights x V", y)  # (B, n_head, T, head_dim)
    y = stage("heads merged", y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)
    return stage("output projection (attn.c_proj)", attn.resid_dropout(attn.c_proj(y)))


ACTIVATION_NAMES = {"gelu": "GELU", "relu2": "ReLU squared", "swiglu": "SwiGLU: SiLU(gate) * value"}


def trace_mlp(mlp, x, stage):
    """MLP.forward, one stage at a time."""
    x = stage("MLP up-projection (c_fc)", mlp.c_fc(x))  # (B, T, hidden), or (B, T, 2 * hidden) for swiglu
    x = stage(f"nonlinearity ({ACTIVATION_NAMES[mlp.activation]})", mlp.activate(x))  # (B, T, hidden)
    return stage("MLP down-projection (mlp.c_proj)", mlp.dropout(mlp.c_proj(x)))  # (B, T, n_embd)


# ----------------------------------------------------------------------------- one step of a reply

@dataclass
class Step:
    """Why the token after `ids` came out as it did: the model's next-token probabilities there and where
    the last position looked. The same numbers as explain() at the last position, without the T x T rest."""

    labels: list  # the T context tokens as readable text
    probs: torch.Tensor  # (vocab_size,) next-token probabilities after the context
    attention: torch.Tensor  # (n_layer, n_head, T): the last position's attention over the context

    def top(self, k):
        """[(token id, probability)] of the k most likely next tokens."""
        top = torch.topk(self.probs, min(k, self.probs.size(0)))
        return list(zip(top.indices.tolist(), top.values.tolist()))

    def rank(self, token):
        """1-based rank of token among the predictions."""
        return int((self.probs > self.probs[token]).sum()) + 1


@torch.no_grad()
def explain_step(model, tokenizer, ids):
    """A Step for the token after ids (at most block_size token ids), under model (eval mode). Only what the
    Step holds is computed: the context before the last token fills a KV cache through the fused attention,
    and the last position alone is attended on the math path (its weights, (n_head, T) per layer) and
    un-embedded, so no T x T pattern and no T x vocab_size logits are ever made."""
    param = next(model.parameters())
    idx = torch.tensor([ids], dtype=torch.long, device=param.device)  # (1, T)
    cache = KVCache(model.config, 1, param.device, param.dtype)
    if len(ids) > 1:
        x = model.embed(idx[:, :-1])  # (1, T - 1, n_embd)
        for block, layer in zip(model.transformer.h, cache.layers):
            x = block(x, kv_cache=layer)
        cache.pos = len(ids) - 1
    x = model.embed(idx[:, -1:], cache.pos)  # (1, 1, n_embd)
    attention = []
    for block, layer in zip(model.transformer.h, cache.layers):
        attended, weights = block.attn(block.ln_1(x), return_weights=True, kv_cache=layer)  # (1, n_head, 1, T)
        attention.append(weights[0, :, 0])
        x = x + attended
        x = x + block.mlp(block.ln_2(x))
    logits = model.unembed(x)[0, -1]  # (vocab_size,)
    return Step(labels=[token_label(tokenizer, i) for i in ids], probs=F.softmax(logits.float(), dim=-1).cpu(),
                attention=torch.stack(attention).float().cpu())
