"""
Where a model runs and in what precision: device and dtype resolution, and each GPU's peak FLOP/s
(the denominator of MFU). train.py, sample.py and the Generator API pick devices the same way here.
"""

import torch

from nanoforge.config import ConfigError
from nanoforge.machine import probe

# Dense bf16/fp16 tensor-core peak FLOP/s, matched against torch.cuda.get_device_name().
# Order matters: the first substring that matches wins ("H100 PCIe" before "H100").
GPU_PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("V100", 125e12),
    ("T4", 65e12),
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name):
    """'auto' (cuda, then mps, then cpu) or a torch device name -> torch.device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available: use --device=cpu or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but MPS is not available: use --device=cpu or auto")
    return device


def resolve_dtype(name, device_type):
    """'auto' (bfloat16 on a GPU that multiplies it natively, else float16; float32 elsewhere: a CPU's
    bfloat16 is fast for decoding only, and only with avx512_bf16/AMX, docs/machines.md) or a dtype name."""
    if name == "auto":
        if device_type == "cuda":  # torch.cuda.is_bf16_supported() alone also counts pre-Ampere emulation
            return torch.bfloat16 if probe(cuda=True).cuda_bf16 else torch.float16
        return torch.float32
    return DTYPES[name]


def peak_flops(device, dtype):
    """The device's peak FLOP/s for this dtype, or None when unknown (CPU, MPS, fp32, unlisted GPU)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)
