"""
The layers a CPU decodes with: each replaces one of model.py's during decoding (Generator.decoder) and computes
the same function, faster where the machine has what it needs. Every private torch op of the project is here.

- PackedLinear: nn.Linear with its weight reordered once into the blocked layout oneDNN streams fastest; at
  batch 1 a decode step is one vector times every matrix, so its speed is how fast the weights are read.
  In bfloat16 one row goes to torch's own matrix-vector kernel instead (oneDNN off for the call), which
  streams faster there.
- Int8Linear: weight-only int8 with one scale per output channel (w ~ scale[o] * q[o, i]), a quarter of
  float32's bytes, through torch's int8 weight-only kernel with bfloat16 activations (the kernel is vectorised
  for bfloat16 inputs only). On a GPU there is no such kernel here, so Generator refuses int8 there.
- OneQueryAttention: a decode step's single query attended in float32 by two matrix-vector products, where
  torch's fused kernel (built for many queries) is slow in 16-bit floats.

Each fast path is taken only where nanoforge.machine.probe() says it runs, with the plain path beside it that
the tests compare it to: PackedLinear's ops need x86 and, for bfloat16, avx512bw/vl/dq or avx_ne_convert
(elsewhere they raise from inside torch); without them decoding keeps nn.Linear. Int8Linear without the int8
kernel multiplies by its dequantized weight (correct, not fast). The measurements behind these choices are
in docs/performance.md and docs/machines.md.
"""

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CausalSelfAttention
from nanoforge.machine import probe


def quantize_per_channel(weight):
    """weight (out, in) float -> (q int8 (out, in), scale float32 (out,)): the scale maps each
    row's largest magnitude to 127, so rounding moves a weight by at most scale / 2."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear's function with an int8 weight and per-output-channel scales: torch's int8 kernel where
    the machine has it, else a float32 product with the dequantized weight (the reference it is tested against)."""

    def __init__(self, linear):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,), converted with the module (bfloat16 when decoding)
        self.bias = linear.bias
        self.kernel = probe().int8_kernel

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.kernel:
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale.to(torch.bfloat16))
        else:
            y = F.linear(x.float(), self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1).to(x.dtype)

    def dequantized(self):
        """The weight this layer multiplies by, as a float32 (out, in) matrix (for tests and error bounds)."""
        return self.weight.float() * self.scale.float()[:, None]


class PackedLinear(nn.Module):
    """nn.Linear's function for decoding on a CPU, with the weight reordered once into the blocked
    layout oneDNN's matrix kernels stream fastest (tuned for one row: a decode step). The result equals
    F.linear's to float32 round-off.

    In bfloat16, one row (a batch-1 decode step) goes instead to torch's own matrix-vector kernel on the
    plain weight, with oneDNN switched off for the call: measured on Zen 4 it streamed the 124M model's
    bfloat16 weights 1.25 to 1.4x faster than the packed layout (docs/performance.md). The plain weight is
    the model's own (shared, not copied); prompts and batches keep the packed path."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # tuned for 1 row
        self.bias = linear.bias
        self.weight = linear.weight if linear.weight.dtype == torch.bfloat16 else None  # for one row

    def forward(self, x):
        rows = x.reshape(-1, x.size(-1))
        if self.weight is not None and rows.size(0) == 1:
            y = one_row_without_onednn(rows, self.weight, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


def one_row_without_onednn(x, weight, bias):
    """F.linear for one row with oneDNN off, so torch's own matrix-vector kernel runs. The switch is
    process-wide; it is put back at once, and what another thread computes meanwhile is still right."""
    enabled = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, weight, bias)
    finally:
        torch._C._set_mkldnn_enabled(enabled)


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
    built for many queries at a time and is slow for one in bfloat16 (docs/performance.md has the
    figures). In float32 the fused kernel is as fast and stays; prefill (many queries) keeps it too."""

    def attend(self, q, k, v, mask=None):
        B, n_head, T, head_dim = q.size()
        if T > 1:
            return super().attend(q, k, v, mask)
        group = n_head // self.n_kv_head  # query heads per key/value head (grouped-query attention)
        q = q.view(B, self.n_kv_head, group, head_dim).float()  # each kv head's group of one-position queries
        scores = q @ k.float().transpose(-2, -1) / math.sqrt(head_dim)  # (B, n_kv_head, group, S)
        if mask is not None:  # (B, 1, 1, S): rows at different positions (the engine's slots)
            scores = scores.masked_fill(~mask, float("-inf"))
        y = scores.softmax(dim=-1) @ v.float()  # (B, n_kv_head, group, head_dim)
        return y.to(v.dtype).view(B, n_head, 1, head_dim)


def fast_attention(device, dtype):
    """The attention decoding uses on this device and dtype (None: the model's own)."""
    return OneQueryAttention if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) else None


def fast_linear(device, dtype, quantize=None):
    """The Linear replacement decoding uses on this device and dtype (None: nn.Linear itself,
    which on CUDA already runs cuBLAS on the layout it streams fastest, and is the CPU's plain path)."""
    if quantize == "int8":
        return Int8Linear
    machine = probe()
    packs = {torch.float32: machine.packed_linear, torch.bfloat16: machine.packed_linear_bf16}.get(dtype, False)
    return PackedLinear if device.type == "cpu" and packs else None


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
