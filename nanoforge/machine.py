"""
What this machine can do, found once: the CPU and the instruction set torch dispatches to, whether its
bfloat16 matrix products are native, whether oneDNN's packed-linear op and torch's int8 weight-only kernel can
run here, CUDA (and its bfloat16) and MPS. Every fast path that only some machines have asks `probe()` and takes
the plain path otherwise; train.py, sample.py and the benches print its one-line summary, and train.py
records it in log.jsonl's first record, so a figure always says which machine made it.

Forcing the fast paths off, to see how a CPU without them behaves (docs/machines.md):
- NANOFORGE_FAST_PATHS=off: the probe reports none of the CPU's fast paths (no native bfloat16, no packed
  linear, no int8 kernel), so every check takes its plain path. It can be set in-process (the tests do, then
  probe.cache_clear()).
- ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 (torch's and oneDNN's own, read when torch starts): on an
  AVX-512 CPU, torch's kernels and oneDNN then use AVX2 only. Measured on a Zen 4: bfloat16 matrix products
  drop from 214 to 2.2 GFLOP/s and the packed bfloat16 op raises the same error as on an AVX2-only Zen 3,
  which is what an AVX2 laptop does. The probe reads oneDNN's own answer, so it sees this too.
"""

import functools
import os
import platform
from dataclasses import asdict, dataclass

import torch

from nanoforge.config import ConfigError

SWITCH = "NANOFORGE_FAST_PATHS"


class MachineError(ConfigError):
    """A bad value of the fast-paths switch (configuration, like a bad config key)."""


@dataclass(frozen=True)
class Machine:
    cpu: str  # the CPU's model name
    isa: str  # the vector instructions torch's CPU kernels use: AVX512, AVX2, DEFAULT (none), ...
    fast_paths: bool  # False when NANOFORGE_FAST_PATHS=off
    native_bf16: bool  # bfloat16 matrix products in hardware (avx512_bf16, amx_bf16 or avx_ne_convert)
    packed_linear: bool  # oneDNN's packed-weight linear op runs, in float32
    packed_linear_bf16: bool  # ... and in bfloat16 (oneDNN needs avx512bw/vl/dq or avx_ne_convert for it)
    int8_kernel: bool  # torch's CPU int8 weight-only matrix kernel (_weight_int8pack_mm) is there
    cuda: str | None  # the GPU's name, None without CUDA (or when not probed)
    cuda_bf16: bool  # the GPU multiplies bfloat16 natively (Ampere and later), not by emulation
    mps: bool
    cuda_probed: bool = True  # False: the run uses no GPU, and the probe left CUDA alone

    def summary(self):
        """One line: what a figure made on this machine depends on."""
        flags = [name for name, on in [("native bf16", self.native_bf16), ("packed linear", self.packed_linear),
                                       ("packed linear bf16", self.packed_linear_bf16),
                                       ("int8 kernel", self.int8_kernel)] if on]
        cpu = f"{self.cpu} ({self.isa}; {', '.join(flags) or 'no CPU fast paths'}"
        cpu += f"; {SWITCH}=off)" if not self.fast_paths else ")"
        gpu = f"CUDA {self.cuda}{' bf16' if self.cuda_bf16 else ''}" if self.cuda else "no CUDA"
        if not self.cuda_probed:
            gpu = "CUDA not probed (unused)"
        return f"machine: {cpu}, {gpu}, {'MPS' if self.mps else 'no MPS'}"

    def as_dict(self):
        return asdict(self)


def probe(cuda=None):
    """This machine's Machine, computed once (probe.cache_clear() after changing NANOFORGE_FAST_PATHS).
    CUDA is probed when cuda is true, or (None) when this process has initialised CUDA already: asking a GPU
    its name initialises CUDA, which a run on the CPU must not do (it takes a GPU's memory and time)."""
    return probe_once(torch.cuda.is_initialized() if cuda is None else bool(cuda))


@functools.cache
def probe_once(with_cuda):
    switch = os.environ.get(SWITCH, "on")
    if switch not in ("on", "off"):
        raise MachineError(f"{SWITCH} must be 'on' or 'off', got '{switch}': unset it or use one of those")
    fast = switch == "on"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    onednn = fast and x86 and torch.backends.mkldnn.is_available()
    # oneDNN's own answer honours ONEDNN_MAX_CPU_ISA; the CPU's flags (cpuinfo) do not.
    onednn_bf16 = onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    bf16_instructions = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported() \
        or "avx_ne_convert" in cpu_flags()
    cuda = with_cuda and torch.cuda.is_available()
    return Machine(
        cpu=cpu_model(),
        isa=torch.backends.cpu.get_cpu_capability(),
        fast_paths=fast,
        native_bf16=onednn_bf16 and bf16_instructions,
        packed_linear=onednn,
        packed_linear_bf16=onednn_bf16,
        int8_kernel=fast and hasattr(torch.ops.aten, "_weight_int8pack_mm"),
        cuda=torch.cuda.get_device_name() if cuda else None,
        cuda_bf16=cuda and torch.cuda.is_bf16_supported(including_emulation=False),
        mps=torch.backends.mps.is_available(),
        cuda_probed=with_cuda,
    )


probe.cache_clear = probe_once.cache_clear


def cpuinfo_lines():
    try:
        with open("/proc/cpuinfo") as f:
            return f.read().splitlines()
    except OSError:  # not Linux
        return []


def cpu_flags():
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    line = next((l for l in cpuinfo_lines() if l.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_model():
    line = next((l for l in cpuinfo_lines() if l.startswith("model name")), "")
    return line.partition(":")[2].strip() or platform.processor() or platform.machine() or "unknown CPU"
