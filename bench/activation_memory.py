"""
Activation checkpointing (train.py's activation_checkpointing = true) against keeping the activations: the
memory a training step takes and the time it costs, side by side in one run.

    python -m bench.activation_memory                      # CPU: a GPT-2-shaped model, 6 layers, 384 wide
    python -m bench.activation_memory --device cuda --n_layer 12 --n_embd 768 --batch_size 16 --block_size 1024

Three figures per variant:
- kept for backward: the bytes of the tensors autograd keeps from the forward pass for the backward pass, the
  weights left out (counted with torch.autograd.graph.saved_tensors_hooks, each storage once): exact, the same
  on any machine. Checkpointing covers the blocks; the logits (B x T x vocab, and their float32 copy for the
  loss) stay, and with GPT-2's 50k vocabulary at short context they are a large share.
- peak step memory: on CUDA, torch.cuda.max_memory_allocated during a step minus what was allocated before it
  (weights only); on the CPU, the growth of the process's peak resident memory (ru_maxrss) over a step, in a
  fresh process per variant (the peak of a process never comes down, so each variant needs its own). Both hold
  the gradients and AdamW's two moments as well as the activations: those are the same in both rows.
- step time: forward, backward and AdamW update; the variants take turns, round after round, so both see
  the same machine load; the median.
"""

import argparse
import concurrent.futures
import multiprocessing
import os
import resource
import statistics
import time

import torch

from model import GPT, GPTConfig
from nanoforge.machine import probe


def build(args, device, checkpointing):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                          vocab_size=args.vocab_size, dropout=0.0)).to(device)
    model.activation_checkpointing = checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(args.vocab_size, (args.batch_size, args.block_size), device=device)  # (B, T)
    return model, optimizer, x


def step(model, optimizer, x):
    _, loss = model(x, x)  # the targets do not matter for memory or time
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if x.device.type == "cuda":
        torch.cuda.synchronize()


def kept_for_backward(model, x):
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward, weights left out
    (they are kept anyway)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        _, loss = model(x, x)
    del loss
    return sum(storages.values())


def peak_step_memory(args, checkpointing):
    """Bytes a training step adds at its peak over the weights (see the top). On the CPU, run in a fresh process."""
    model, optimizer, x = build(args, torch.device(args.device), checkpointing)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(model, optimizer, x)
        step(model, optimizer, x)
        return torch.cuda.max_memory_allocated() - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    step(model, optimizer, x)
    step(model, optimizer, x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def peak_in_fresh_process(args, checkpointing):
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
        return pool.submit(peak_step_memory, args, checkpointing).result()


def step_times(args, device):
    """{checkpointing: [seconds per step]}, the two variants taking turns."""
    variants = {flag: build(args, device, flag) for flag in (False, True)}
    for model, optimizer, x in variants.values():
        step(model, optimizer, x)  # warm-up: allocator, optimizer state
    times = {flag: [] for flag in variants}
    for _ in range(args.rounds):
        for flag, (model, optimizer, x) in variants.items():
            start = time.perf_counter()
            step(model, optimizer, x)
            times[flag].append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--n_layer", type=int, default=6)
    parser.add_argument("--n_head", type=int, default=6)
    parser.add_argument("--n_embd", type=int, default=384)
    parser.add_argument("--block_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=50304)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)

    print(probe().summary())
    print(f"load average {os.getloadavg()[0]:.2f} at the start; torch threads {torch.get_num_threads()}")
    print(f"GPT n_layer={args.n_layer} n_head={args.n_head} n_embd={args.n_embd} vocab_size={args.vocab_size}, "
          f"batch {args.batch_size} x {args.block_size} tokens, float32, AdamW")
    kept = {flag: kept_for_backward(*build(args, device, flag)[::2]) for flag in (False, True)}
    measure = peak_in_fresh_process if args.device == "cpu" else peak_step_memory
    peak = {flag: measure(args, flag) for flag in (False, True)}
    times = step_times(args, device)
    print(f"{'activation checkpointing':<26}{'kept for backward':>20}{'peak step memory':>20}{'step time':>14}")
    for flag in (False, True):
        print(f"{'on' if flag else 'off':<26}{kept[flag] / 2**20:>16.1f} MiB{peak[flag] / 2**20:>16.1f} MiB"
              f"{statistics.median(times[flag]):>12.3f} s")
    print(f"checkpointing keeps {kept[True] / kept[False]:.1%} of the activations, its step peaks at "
          f"{peak[True] / peak[False]:.1%} of the memory, and takes {statistics.median(times[True]) / statistics.median(times[False]):.2f}x "
          f"the time; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
