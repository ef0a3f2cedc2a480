"""
Weight-only int8 quantization for decoding: each Linear's weight is stored as int8 with one
scale per output channel (w ~ scale[o] * q[o, i], q in [-127, 127]), a quarter of float32's
bytes. At batch 1 a decode step reads every weight once, so fewer bytes are fewer seconds.

It runs on the CPU, through torch's int8 weight-only kernel (_weight_int8pack_mm), with bfloat16
activations: the kernel is vectorised for bfloat16 inputs only; with float32 inputs it ran ~10x
slower (0.7 against 7.2 GB/s of weights read, issue 13). On a GPU there is no such kernel here
(dequantizing a whole matrix per step would read more bytes than bfloat16 does), so Generator
refuses int8 there.
"""

import torch
import torch.nn as nn


def quantize_per_channel(weight):
    """weight (out, in) float -> (q int8 (out, in), scale float32 (out,)): the scale maps each
    row's largest magnitude to 127, so rounding moves a weight by at most scale / 2."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """nn.Linear's function with an int8 weight and per-output-channel scales."""

    def __init__(self, linear):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("weight", q)  # (out, in) int8
        self.register_buffer("scale", scale)  # (out,), converted with the module (bfloat16 when decoding)
        self.bias = linear.bias

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale.to(torch.bfloat16))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], -1).to(x.dtype)

    def dequantized(self):
        """The weight this layer multiplies by, as a float32 (out, in) matrix (for tests and error bounds)."""
        return self.weight.float() * self.scale.float()[:, None]
