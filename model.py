"""
A GPT language model in one file, drawn the way the transformer is taught.

Design decisions:
- GPT-2's architecture: learned position embeddings, pre-norm blocks
  (x + attn(ln_1(x)), x + mlp(ln_2(x))), a final LayerNorm, and an lm_head that
  shares its weight with the token embedding (weight tying, Press & Wolf 2017).
- Module and parameter names match GPT-2's checkpoints (transformer.wte, h.N.attn.c_attn,
  ...) so loading OpenAI's weights is a name-for-name copy.
- Attention has two paths that compute the same function: PyTorch's fused
  scaled_dot_product_attention (fast, used in training) and an explicit math path that
  also returns the attention weights (for study and for the tests that compare the two).
- Generation can pass a KV cache (generate.KVCache): each layer writes the keys and values
  of the new positions into pre-allocated buffers and attends over everything cached so far,
  so a new token costs one position's work instead of re-running the whole context.
- GPT-2 initialisation: N(0, 0.02) everywhere, residual output projections scaled by
  1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.

Opt-in choices of the speedruns (modded-nanogpt, nanochat), each a GPTConfig field that is off by
default, so the default stays GPT-2 and its weights load name for name:
- pos_emb="rope": rotary position embeddings (Su et al. 2021) rotate q and k by their position
  (class Rotary) instead of adding a learned vector per position to the input.
- norm="rmsnorm": RMSNorm (Zhang & Sennrich 2019): no mean subtraction, no bias (class RMSNorm).
- mlp="relu2" | "swiglu": ReLU squared (So et al. 2021, "Primer") or a SwiGLU gate (Shazeer 2020)
  in place of GELU (MLP.forward).
- qk_norm: RMSNorm on each head's queries and keys before attention, which bounds the attention
  logits and tolerates higher learning rates (Dehghani et al. 2023).
- n_kv_head < n_head: grouped-query attention (Ainslie et al. 2023): heads share keys and values
  in groups, which shrinks the KV cache by n_head / n_kv_head.
- tie_embeddings=False: a separate un-embedding matrix (lm_head) instead of sharing wte's.
- zero_init_proj: the residual branches' output projections start at zero, so every block starts
  as the identity (as modded-nanogpt does).
- logit_softcap > 0: logits squashed smoothly into (-cap, cap) by cap * tanh(logits / cap)
  (Gemma 2), so no logit runs away early in training.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


# The GPTConfig fields that choose between architectures (train.py's config keys of the same names).
ARCH_KEYS = ("pos_emb", "norm", "mlp", "qk_norm", "n_kv_head", "tie_embeddings", "zero_init_proj", "logit_softcap")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the model can attend over
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2 has them
    # Opt-in architecture choices (the module docstring says what each does); defaults are GPT-2's.
    pos_emb: str = "learned"  # "learned" (GPT-2) or "rope"
    norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm"
    mlp: str = "gelu"  # "gelu" (GPT-2), "relu2" or "swiglu"
    qk_norm: bool = False
    n_kv_head: int = 0  # key/value heads; 0 means n_head (plain multi-head attention)
    tie_embeddings: bool = True
    zero_init_proj: bool = False
    logit_softcap: float = 0.0  # 0 means no capping

    @property
    def kv_heads(self):
        return self.n_kv_head or self.n_head

    def gpt2_differences(self):
        """The options set away from GPT-2's architecture: [(field, value)], empty for GPT-2 itself."""
        gpt2 = GPTConfig()
        # zero_init_proj only changes the initial weights; n_kv_head matters only when it differs from n_head
        fields = ("bias",) + tuple(k for k in ARCH_KEYS if k not in ("zero_init_proj", "n_kv_head"))
        differences = [(f, getattr(self, f)) for f in fields if getattr(self, f) != getattr(gpt2, f)]
        if self.kv_heads != self.n_head:
            differences.append(("n_kv_head", self.n_kv_head))
        return differences


def padded_vocab_size(vocab_size, multiple):
    """vocab_size rounded up to a multiple (64 makes the embedding and lm_head matmuls faster on GPUs)."""
    return math.ceil(vocab_size / multiple) * multiple


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's own cannot drop just the bias)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean subtraction and the bias."""

    def __init__(self, ndim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)


def make_norm(config, ndim):
    return RMSNorm(ndim) if config.norm == "rmsnorm" else LayerNorm(ndim, bias=config.bias)


class Rotary(nn.Module):
    """Rotary position embedding: each pair of channels (i, i + head_dim/2) of a query or key at
    position p is rotated by the angle p * base^(-2i/head_dim). The dot product of a rotated query
    and key then depends only on their distance, and no position vector enters the residual stream."""

    def __init__(self, head_dim, block_size, base=10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), inv_freq)  # (block_size, head_dim/2)
        # Derived from the config, not learned: left out of the state dict.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x, start=0):
        """x: (B, heads, T, head_dim) at positions start .. start + T - 1 -> the same shape, rotated.
        start: an int, or a (B, 1) tensor when each row goes on from its own position (the engine's slots)."""
        pos = start + torch.arange(x.size(-2), device=x.device)  # (T,), or (B, T) with a start per row
        cos, sin = self.cos[pos].to(x.dtype), self.sin[pos].to(x.dtype)  # (T, head_dim/2) or (B, T, head_dim/2)
        if pos.dim() == 2:  # a start per row: the same angles for every head of the row
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, head_dim/2)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        assert config.n_head % config.kv_heads == 0, "n_kv_head must divide n_head"
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        # Q, K and V projections for all heads, fused into one matrix multiply
        # (K and V have n_kv_head heads each: fewer than Q's with grouped-query attention).
        kv_width = self.n_kv_head * self.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_width, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.q_norm = RMSNorm(self.head_dim) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if config.qk_norm else None
        self.rotary = Rotary(self.head_dim, config.block_size) if config.pos_emb == "rope" else None
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, return_weights=False, kv_cache=None):
        """Returns the attended output, and with return_weights=True also the attention
        pattern (B, n_head, T, S), computed on the explicit math path. Without a cache S = T;
        with one (this layer's part of a generate.KVCache), x holds the T positions after those
        already cached, and S = cached + T. A cache whose rows sit at different positions (the
        engine's slots) also carries the mask of the keys each row may see."""
        B, T, C = x.size()
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_width, kv_width], dim=2)  # (B, T, C), 2 x (B, T, kv_width)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, n_head, T, head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, n_kv_head, T, head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            start = 0 if kv_cache is None else kv_cache.cache.pos  # the new positions follow the cached ones
            q, k = self.rotary(q, start), self.rotary(k, start)
        mask = None
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # the cached positions and these: (B, n_kv_head, S, head_dim)
            mask = kv_cache.cache.mask  # (B, 1, T, S), or None when every row is at the same position

        if return_weights:
            y, weights = self.attention_math(q, k, v)
        else:
            y, weights = self.attend(q, k, v, mask), None
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads merged: (B, T, C)
        y = self.resid_dropout(self.c_proj(y))
        return (y, weights) if return_weights else y

    def attend(self, q, k, v, mask=None):
        """The fused path: softmax(QK^T / sqrt(d_head) + causal mask) V in one kernel (flash attention
        where the device has it). q (B, n_head, T, head_dim), k and v (B, n_kv_head, S, head_dim), the T
        queries being the last T of the S positions -> (B, n_head, T, head_dim). mask: True where a
        query may look, given when the rows' positions differ; else the causal mask is made here."""
        # is_causal aligns the mask to the top left, which is right only when the queries start at
        # position 0 (T == S). A single new query sees every key: no mask. A chunk of T queries after
        # S - T cached positions needs the mask aligned to the bottom right.
        T, S = q.size(-2), k.size(-2)
        if mask is None and T not in (1, S):
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        dropout_p = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=mask is None and T > 1,
                                              enable_gqa=self.n_kv_head != self.n_head)

    def attention_math(self, q, k, v, steps=None):
        """softmax(QK^T / sqrt(d_head) + causal mask) V, written out step by step. The T queries
        are the last T of the S key positions (S > T when earlier keys come from a cache). With
        grouped-query attention each key/value head serves n_head / n_kv_head query heads.
        Given a dict as `steps`, the scores before scaling, after scaling and after masking are
        stored in it (explain.py's --trace shows them)."""
        T, S = q.size(-2), k.size(-2)
        group = self.n_head // self.n_kv_head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, n_head, S, head_dim)
        raw = q @ k.transpose(-2, -1)  # (B, n_head, T, S)
        scaled = raw / math.sqrt(self.head_dim)
        future = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(diagonal=S - T + 1)
        masked = scaled.masked_fill(future, float("-inf"))  # mask before softmax: exp(-inf) = 0
        weights = F.softmax(masked, dim=-1)  # each row sums to 1 over positions <= t
        y = self.attn_dropout(weights) @ v  # (B, n_head, T, head_dim)
        if steps is not None:
            steps.update(scores=raw, scaled=scaled, masked=masked)
        return y, weights


class ReLUSquared(torch.autograd.Function):
    """relu(x)^2 (mlp="relu2"), with its gradient written out: d/dx relu(x)^2 = 2 relu(x), which is already 0
    where x < 0. Autograd through F.relu(x).square() gives the same numbers (tests/test_model.py) in five passes
    over the (B, T, hidden) activations and keeps two of them; this takes two and keeps one. In a small model
    on a CPU those passes are a visible part of a training step."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return grad * (2 * r)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.activation = config.mlp
        hidden = 4 * config.n_embd
        if config.mlp == "swiglu":  # two input matrices instead of one: 2/3 the width keeps the parameter count
            hidden = 64 * math.ceil(8 * config.n_embd / 3 / 64)
        fan_out = 2 * hidden if config.mlp == "swiglu" else hidden  # swiglu: gate and value in one multiply
        self.c_fc = nn.Linear(config.n_embd, fan_out, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU; keep it so pretrained weights match exactly.
        self.gelu = nn.GELU(approximate="tanh") if config.mlp == "gelu" else None
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.activate(self.c_fc(x))  # (B, T, hidden)
        x = self.c_proj(x)  # (B, T, n_embd)
        return self.dropout(x)

    def activate(self, x):
        """The nonlinearity: (B, T, hidden), or (B, T, 2 * hidden) for swiglu -> (B, T, hidden)."""
        if self.activation == "gelu":
            return self.gelu(x)
        if self.activation == "relu2":
            return ReLUSquared.apply(x)
        gate, value = x.chunk(2, dim=-1)  # swiglu
        return F.silu(gate) * value


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache=kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if config.pos_emb == "learned":  # with rope, positions enter inside attention instead
            modules["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        modules.update(drop=nn.Dropout(config.dropout), h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                       ln_f=make_norm(config, config.n_embd))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Trade compute for memory in training (train.py's activation_checkpointing; forward's block loop).
        self.activation_checkpointing = False
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # weight tying

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # Each block adds two residual branches; scale them so depth does not grow the variance
                # (or start them at zero, so each block starts as the identity).
                std = 0.0 if config.zero_init_proj else 0.02 / math.sqrt(2 * config.n_layer)
                torch.nn.init.normal_(p, mean=0.0, std=std)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count. Embeddings that are only looked up (no matrix work per token) are left
        out by default: the position embedding, and the token embedding unless it is the lm_head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.transformer.wte.weight.numel()
        return n

    def embed(self, idx, start=0):
        """Token ids (B, T) at positions start .. start + T - 1 -> the residual stream (B, T, n_embd).
        start: an int, or a (B, 1) tensor of each row's own start (the engine's slots)."""
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            pos = start + torch.arange(idx.size(1), device=idx.device)  # (T,), or (B, T) when start is (B, 1)
            x = x + self.transformer.wpe(pos)
        return self.transformer.drop(x)

    def unembed(self, x):
        """The final norm and the lm_head: (B, T, n_embd) -> logits (B, T, vocab_size)."""
        return self.soft_cap(self.lm_head(self.transformer.ln_f(x)))

    def soft_cap(self, logits):
        """logit_softcap > 0: cap * tanh(logits / cap), smooth and within (-cap, cap); else the logits."""
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx, targets=None, kv_cache=None):
        """idx: (B, T) token ids. Returns logits (B, T, vocab_size) and, given targets
        (B, T), the mean cross-entropy loss; positions whose target is -1 are ignored.
        With a kv_cache (generate.KVCache), idx continues the sequence the cache holds: its
        positions start at kv_cache.pos. The caller advances kv_cache.pos afterwards."""
        B, T = idx.size()
        start = 0 if kv_cache is None else kv_cache.pos  # an int, or (B, 1): each row's own (the engine's slots)
        end = (start if isinstance(start, int) else int(start.max())) + T
        if end > self.config.block_size:
            raise ValueError(f"sequence of length {end} is longer than block_size {self.config.block_size}")
        x = self.embed(idx, start)  # (B, T, n_embd)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training:
                # Keep only each block's input; its activations are recomputed in the backward pass
                # (non-reentrant: works under FSDP, and dropout draws the same masks again).
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache=None if kv_cache is None else kv_cache.layers[i])
        logits = self.unembed(x)  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def attention_weights(self, idx):
        """The attention pattern of every layer: a list of n_layer tensors (B, n_head, T, T)."""
        x = self.embed(idx)
        patterns = []
        for block in self.transformer.h:
            attended, weights = block.attn(block.ln_1(x), return_weights=True)
            patterns.append(weights)
            x = x + attended
            x = x + block.mlp(block.ln_2(x))
        return patterns

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper
        (appendix B): 6N for the weight matrix multiplies plus 12 * L * T * C for attention."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """The reference sampler: re-run the whole (cropped) context for every new token.
        idx: (B, T) prompt ids -> (B, T + max_new_tokens). temperature 0 means greedy."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]  # the model sees at most block_size tokens
            logits, _ = self(context)
            logits = logits[:, -1, :]  # (B, vocab_size): only the last position predicts the next token
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
