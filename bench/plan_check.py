"""
`train.py --plan`'s memory estimate against a real training step, and the step's speed: for each config, the
peak memory of a few training steps (forward, backward, optimizer step: what train.py does in one process) beside
the plan's total, with and without activation checkpointing, and tokens/s and MFU.

    python -m bench.plan_check configs/depth12_124m.toml configs/depth18_350m.toml          # on a CUDA GPU
    python -m bench.plan_check configs/quickstart.toml --device cpu --steps 3                # the CPU path

The batch is the config's micro-batch (batch_size x block_size) of random tokens over GPT-2's padded vocabulary
(the plan's, when data_dir is not prepared); the dtype, the optimizer and compile are the config's. Peak memory on
CUDA is torch.cuda.max_memory_allocated over the steps (the weights included, the CUDA context not: the plan
leaves it out too); on the CPU, the process's peak resident memory, which counts Python and torch themselves,
so there the comparison is loose. Tokens/s is over the timed steps, after two warm-up steps (compile's included).
"""

import argparse
import contextlib
import dataclasses
import io
import os
import resource
import time

import torch

from model import GPT
from nanoforge import planning
from nanoforge.config import build_config
from nanoforge.device import peak_flops, resolve_dtype
from nanoforge.machine import probe
from nanoforge.optim import build_optimizer


def run_steps(cfg, device, dtype, steps):
    """(seconds per step over `steps` timed steps, peak bytes) of cfg's training step on random tokens."""
    meta, _ = planning.meta_model(cfg)
    torch.manual_seed(0)
    model = GPT(meta.config).to(device)
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg, device.type)
    runner = torch.compile(model) if cfg.compile else model
    x = torch.randint(meta.config.vocab_size, (cfg.batch_size, cfg.block_size), device=device)  # (B, T)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step():
        with autocast:
            _, loss = runner(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    del model, optimizer, runner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak


def check(path, device, steps):
    with contextlib.redirect_stderr(io.StringIO()):  # the depth dial's summary: printed by train.py, not here
        cfg = build_config(path, [f"--device={device.type}"])
    dtype = resolve_dtype(cfg.dtype, device.type)
    d = torch.empty((), dtype=dtype).element_size()
    meta, _ = planning.meta_model(cfg)
    tokens = cfg.batch_size * cfg.block_size
    print(f"{os.path.basename(path)}: {meta.num_params(non_embedding=False) / 1e6:.1f}M parameters, micro-batch "
          f"{cfg.batch_size} x {cfg.block_size}, {str(dtype).removeprefix('torch.')}, {cfg.optimizer}, "
          f"compile {str(cfg.compile).lower()}")
    # With checkpointing first: on the CPU the process's peak memory never comes down, so the smaller goes first.
    for checkpointing in (True, False):
        cfg = dataclasses.replace(cfg, activation_checkpointing=checkpointing)
        planned = planning.memory(meta, cfg, d, "ddp", 1).total(checkpointing)
        seconds, peak = run_steps(cfg, device, dtype, steps)
        peak_rate = peak_flops(device, dtype)
        mfu = f"{meta.flops_per_token() * tokens / seconds / peak_rate:.1%}" if peak_rate else "n/a"
        print(f"  activation checkpointing {'on ' if checkpointing else 'off'}: peak {peak / 2**30:.2f} GiB, "
              f"plan {planned / 2**30:.2f} GiB (measured / plan {peak / planned:.2f}); "
              f"{tokens / seconds:,.0f} tokens/s, MFU {mfu}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="+", metavar="CONFIG")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (after 2 warm-up steps)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(probe().summary())
    print(f"load average {os.getloadavg()[0]:.2f}")
    for path in args.configs:
        check(path, device, args.steps)


if __name__ == "__main__":
    main()
