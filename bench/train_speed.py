"""
Time to the same validation loss: the nanoGPT recipe (configs/shakespeare_char_cpu.toml) against
the fast recipe (configs/shakespeare_char_fast.toml), trained side by side in one run.

    python prepare.py shakespeare_char --source path/to/input.txt --out data/shakespeare_char
    python -m bench.train_speed                 # one comparison
    python -m bench.train_speed --data DIR DIR  # one comparison on each prepared corpus (held-out ones)
    python -m bench.train_speed --runs 3        # three, each with its own ratio
    python -m bench.train_speed --throughput    # the fast recipe's step time: threads, bf16, compile
    python -m bench.train_speed --breakdown     # where each recipe's step time goes, against the CPU's peak

The target is the val loss the nanoGPT recipe reaches at its last step (2000). Each recipe's
time to the target is the training time, evaluations included, until its first evaluation at or
below the target; the ratio is fast / nanoGPT (the goal: at most 0.25, reached by 80% of the fast
recipe's steps, so that a corpus a little harder than the ones it was tuned on still gets there).

How it is made fair on a shared machine:
- Both recipes train in this one process, interleaved: the one that has used less time so far
  takes the next step, so both see the same machine load at the same moments.
- Both use the same thread count (--threads, default 1: on a 2-core machine shared with other
  jobs, two threads per process spend most of their time waiting; see docs/performance.md).
- Both evaluate, at their own configs' eval_interval, on the same val windows: nanoGPT's
  (its batch_size x eval_iters windows of the shared block_size), so the two losses compare and an
  evaluation costs both the same.
- Steps are the real training code: nanoforge.training's get_lr, train_step, apply_update and estimate_loss.
"""

import argparse
import dataclasses
import os
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nanoforge.config import build_config
from nanoforge.data import Dataset
from nanoforge.machine import probe
from nanoforge.device import resolve_dtype
from nanoforge.distributed import Distributed
from nanoforge.optim import build_optimizer, set_lr
from nanoforge.runs import RunState, build_model
from nanoforge.training import apply_update, estimate_loss, get_lr, train_step

RECIPES = {"nanoGPT": "configs/shakespeare_char_cpu.toml", "fast": "configs/shakespeare_char_fast.toml"}


class Run:
    """One recipe's training, advanced a step at a time; `seconds` counts only its own work."""

    def __init__(self, name, path, data_dir):
        self.name = name
        self.cfg = build_config(path, [f"--data_dir={data_dir}", "--device=cpu"])
        self.eval_cfg = self.cfg  # compare() gives both recipes the same val windows
        self.data = Dataset(self.cfg.data_dir, self.cfg.block_size)
        self.ddp = Distributed()
        self.device = torch.device("cpu")
        dtype = resolve_dtype(self.cfg.dtype, "cpu")
        self.autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else nullcontext()
        torch.manual_seed(self.cfg.seed)
        start = time.perf_counter()
        self.model, _ = build_model(self.cfg, self.data, self.device)
        self.runner = torch.compile(self.model) if self.cfg.compile else self.model
        self.optimizer = build_optimizer(self.model, self.cfg, "cpu")
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.state = RunState.start(self.cfg, self.device)
        self.seconds = time.perf_counter() - start  # building the model counts too
        self.evals = []  # (step, seconds, val loss)

    @property
    def done(self):
        return self.state.step >= self.cfg.max_iters

    def next_batch(self):
        return self.data.get_batch("train", self.cfg.batch_size, self.state.batches)

    def step(self):
        start = time.perf_counter()
        cfg, state = self.cfg, self.state
        set_lr(self.optimizer, get_lr(state.step, cfg), cfg)
        loss = train_step(self.runner, self.optimizer, self.scaler, self.next_batch,
                          cfg.gradient_accumulation_steps, self.autocast, self.ddp)
        apply_update(self.model, self.optimizer, self.scaler, loss, cfg, state)
        state.step += 1
        if state.step % cfg.eval_interval == 0 or self.done:
            val = estimate_loss(self.runner, self.data, self.eval_cfg, self.autocast, self.device, self.ddp)["val"]
            self.seconds += time.perf_counter() - start
            self.evals.append((state.step, self.seconds, val))
            print(f"  {self.name:<8} step {state.step:>5}: val {val:.4f} at {self.seconds:7.1f} s", flush=True)
            return
        self.seconds += time.perf_counter() - start

    def time_to(self, target):
        """(step, seconds) of the first evaluation at or below target, or None."""
        return next(((step, seconds) for step, seconds, val in self.evals if val <= target), None)


def compare(data_dir):
    """One side-by-side comparison on one prepared corpus; returns (ratio, the fraction of the fast recipe's
    steps done when it reached the target), the ratio nan when it never did."""
    runs = [Run(name, path, data_dir) for name, path in RECIPES.items()]
    base, fast = runs
    if fast.cfg.block_size != base.cfg.block_size:
        raise SystemExit(f"the recipes' block_size differ ({base.cfg.block_size}, {fast.cfg.block_size}): a val "
                         "loss over longer contexts is lower for free, so they would not compare")
    fast.eval_cfg = dataclasses.replace(fast.cfg, batch_size=base.cfg.batch_size, eval_iters=base.cfg.eval_iters)
    while not all(r.done for r in runs):
        min((r for r in runs if not r.done), key=lambda r: r.seconds).step()  # the one behind in time goes next
    target = base.evals[-1][2]
    print(f"target: nanoGPT's val loss at step {base.state.step}: {target:.4f}")
    print(f"{'recipe':<8} {'steps':>6} {'final val':>9} {'to target':>22} {'total s':>8}")
    for r in runs:
        reached = r.time_to(target)
        when = f"{reached[1]:7.1f} s @ {reached[0]:>5} ({reached[0] / r.cfg.max_iters:4.0%})" if reached else \
            "not reached"
        print(f"{r.name:<8} {r.state.step:>6} {r.evals[-1][2]:>9.4f} {when:>22} {r.seconds:>8.1f}")
    reached = fast.time_to(target)
    ratio = reached[1] / base.time_to(target)[1] if reached else float("nan")
    fraction = reached[0] / fast.cfg.max_iters if reached else float("nan")
    print(f"ratio fast / nanoGPT: {ratio:.3f}, reached at {fraction:.0%} of the fast recipe's steps")
    return ratio, fraction


def step_time(cfg, data, threads, bf16, compiled, batch_size, steps=20):
    """Milliseconds per training step, the median after warm-up steps, and the first step's seconds
    (with compile, the compilation)."""
    cfg = dataclasses.replace(cfg, batch_size=batch_size)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg, "cpu")
    start = time.perf_counter()
    runner = torch.compile(model) if compiled else model
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
    batches = torch.Generator().manual_seed(0)
    timings = []
    for i in range(steps + 3):
        x, y = data.get_batch("train", cfg.batch_size, batches)
        with autocast:
            _, loss = runner(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - start)
        start = time.perf_counter()
    return 1000 * sorted(timings[3:])[len(timings[3:]) // 2], timings[0]


def throughput(data_dir, rounds):
    """The fast recipe's step time under each CPU choice, the variants interleaved round by round."""
    cfg = build_config(RECIPES["fast"], [f"--data_dir={data_dir}", "--device=cpu"])
    data = Dataset(cfg.data_dir, cfg.block_size)
    plain = dict(threads=1, bf16=False, compiled=False, batch_size=cfg.batch_size)
    variants = [("1 thread", plain),
                ("2 threads", {**plain, "threads": 2}),
                ("1 thread, batch x2", {**plain, "batch_size": 2 * cfg.batch_size}),
                ("1 thread, bf16 autocast", {**plain, "bf16": True}),
                ("1 thread, torch.compile", {**plain, "compiled": True})]
    results = {name: [] for name, _ in variants}
    for _ in range(rounds):
        for name, kwargs in variants:
            results[name].append(step_time(cfg, data, **kwargs))
    print(f"fast recipe's model; best of {rounds} round(s) (median step of each); load average "
          f"{os.getloadavg()[0]:.2f}")
    base = None
    for name, kwargs in variants:
        ms, first = min(results[name])
        tokens_per_s = kwargs["batch_size"] * cfg.block_size / ms * 1000
        base = base or tokens_per_s
        print(f"{name:<26} {ms:7.1f} ms/step  {tokens_per_s:8.0f} tok/s  {tokens_per_s / base:5.2f}x  "
              f"(first step {first:.1f} s)")


def median_ms(fn, repeats=15, warmup=3):
    """The median wall-clock milliseconds of fn() after warm-up calls."""
    timings = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return 1000 * sorted(timings[warmup:])[repeats // 2]


def peak_flops(size=1024):
    """This thread count's float32 matrix-product speed (FLOP/s) on a square product large enough to run
    at the kernel's best: the ceiling the model's products are set against."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / (median_ms(lambda: a @ b, repeats=9) / 1000)


def linear_products(model, tokens):
    """A closure running every nn.Linear's three products of one training step (forward x W^T; backward
    dY W and dY^T x) with this step's shapes, nothing else; and their FLOPs."""
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    tensors = [(torch.randn(tokens, i), torch.randn(o, i), torch.randn(tokens, o)) for i, o in shapes]

    def run():
        for x, w, dy in tensors:
            x @ w.T, dy @ w, dy.T @ x

    return run, sum(6 * tokens * i * o for i, o in shapes)


def attention_products(cfg):
    """A closure running one training step's causal attention (forward and backward, every layer) alone; and
    the FLOPs of its two products (QK^T and AV: forward plus twice that backward, half of it masked)."""
    head_dim = cfg.n_embd // cfg.n_head
    q, k, v = (torch.randn(cfg.batch_size, cfg.n_head, cfg.block_size, head_dim, requires_grad=True)
               for _ in range(3))

    def run():
        for _ in range(cfg.n_layer):
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    return run, cfg.n_layer * 3 * 2 * 2 * cfg.batch_size * cfg.n_head * cfg.block_size**2 * head_dim // 2


class OpCounter(TorchDispatchMode):
    """Counts the torch operators run beneath it, autograd's backward ones included: each call pays dispatch
    overhead however small its tensors."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step):
    with OpCounter() as counter:
        step()
    return counter.calls


def breakdown(name, path, data_dir, peak):
    """Where one recipe's training step goes: the matrix products and attention run alone with the step's
    shapes (and their FLOP/s against the peak), the optimizer, the rest of the forward and backward passes
    (norms, activations, embeddings, the loss, autograd's bookkeeping) and evaluation spread over the steps."""
    cfg = build_config(path, [f"--data_dir={data_dir}", "--device=cpu"])
    data = Dataset(cfg.data_dir, cfg.block_size)
    torch.manual_seed(cfg.seed)
    model, _ = build_model(cfg, data, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg, "cpu")
    batches = torch.Generator().manual_seed(0)
    ddp = Distributed()

    def forward_backward():
        x, y = data.get_batch("train", cfg.batch_size, batches)
        model(x, y)[1].backward()

    passes = median_ms(lambda: (forward_backward(), optimizer.zero_grad(set_to_none=True)))
    forward_backward()  # gradients for the optimizer to step on
    optimizer_ms = median_ms(optimizer.step)  # timed alone: as a difference of two noisy medians it got lost
    matrices, matrix_flops = linear_products(model, cfg.batch_size * cfg.block_size)
    attention, attention_flops = attention_products(cfg)
    matrix_ms, attention_ms = median_ms(matrices), median_ms(attention)
    evaluation = median_ms(lambda: estimate_loss(model, data, cfg, nullcontext(), torch.device("cpu"), ddp),
                           repeats=3, warmup=1) / cfg.eval_interval
    total = passes + optimizer_ms + evaluation
    calls = ops_per_step(lambda: (forward_backward(), optimizer.step()))
    print(f"{name}: {total:.1f} ms per step, evaluation included ({calls} torch operator calls a step)")
    rows = [("matrix products (Linear, fwd+bwd)", matrix_ms, matrix_flops),
            ("attention (fwd+bwd)", attention_ms, attention_flops),
            ("rest of fwd+bwd (norms, activations, loss, autograd)", passes - matrix_ms - attention_ms, None),
            ("optimizer step", optimizer_ms, None),
            ("evaluation, per step", evaluation, None)]
    for label, ms, flops in rows:
        speed = f"{flops / ms / 1e6:6.1f} GFLOP/s, {flops * 1000 / ms / peak:4.0%} of peak" if flops else ""
        print(f"  {label:<54} {ms:7.1f} ms {100 * ms / total:4.0f}%  {speed}")


def breakdowns(data_dir):
    peak = peak_flops()
    print(f"peak: {peak / 1e9:.1f} GFLOP/s float32 on {torch.get_num_threads()} thread(s) (a 1024^3 product); "
          f"load average {os.getloadavg()[0]:.2f}")
    for name, path in RECIPES.items():
        breakdown(name, path, data_dir, peak)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["data/shakespeare_char"],
                        help="prepared character-level corpora, each compared on its own (default: shakespeare_char)")
    parser.add_argument("--runs", type=int, default=1, help="comparisons to run one after another")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both recipes")
    parser.add_argument("--throughput", action="store_true", help="instead: the fast recipe's step time with "
                        "1 or 2 threads, bf16 autocast and torch.compile")
    parser.add_argument("--breakdown", action="store_true", help="instead: where each recipe's step time goes")
    args = parser.parse_args()
    print(probe().summary())
    for data in args.data:
        if not os.path.exists(os.path.join(data, "train.bin")):
            raise SystemExit(f"no prepared data in '{data}': run `python prepare.py shakespeare_char --out {data}` "
                             "(add --source PATH for a local copy of tinyshakespeare), or `python prepare.py "
                             f"TEXT_FILE --tokenizer char --out {data}` for a corpus of your own")
    torch.set_num_threads(args.threads)
    if args.throughput:
        return throughput(args.data[0], args.runs)
    if args.breakdown:
        return breakdowns(args.data[0])
    results = []
    for data in args.data:
        for i in range(args.runs):
            load = os.getloadavg()[0]
            print(f"--- {data}: run {i + 1} of {args.runs} (threads {args.threads}, load average {load:.2f} at start)")
            results.append((data, *compare(data)))
            print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("corpus, ratio fast / nanoGPT, fraction of the fast recipe's steps at the target:")
    for data, ratio, fraction in results:
        print(f"  {data}: {ratio:.3f} at {fraction:.0%}")


if __name__ == "__main__":
    main()
