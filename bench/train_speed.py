"""
Time to the same validation loss: the nanoGPT recipe (configs/shakespeare_char_cpu.toml) against
the fast recipe (configs/shakespeare_char_fast.toml), trained side by side in one run.

    python prepare.py shakespeare_char --source path/to/input.txt --out data/shakespeare_char
    python -m bench.train_speed                 # one comparison
    python -m bench.train_speed --runs 3        # three, each with its own ratio
    python -m bench.train_speed --throughput    # the fast recipe's step time: threads, bf16, compile

The target is the val loss the nanoGPT recipe reaches at its last step (2000). Each recipe's
time to the target is the training time, evaluations included, until its first evaluation at or
below the target; the ratio is fast / nanoGPT (the goal: at most 0.5).

How it is made fair on a shared machine:
- Both recipes train in this one process, interleaved: the one that has used less time so far
  takes the next step, so both see the same machine load at the same moments.
- Both use the same thread count (--threads, default 1: on a 2-core machine shared with other
  jobs, two threads per process spend most of their time waiting; see docs/performance.md).
- Both evaluate on the same val split with their own configs' eval settings; the fast recipe's
  evaluation must cover at least as many val tokens as nanoGPT's (checked).
- Steps are the real training code: nanoforge.training's get_lr, train_step, apply_update and estimate_loss.
"""

import argparse
import dataclasses
import os
import time
from contextlib import nullcontext

import torch

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

    @property
    def val_tokens(self):
        return self.cfg.eval_iters * self.cfg.batch_size * self.cfg.block_size

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
            val = estimate_loss(self.runner, self.data, cfg, self.autocast, self.device, self.ddp)["val"]
            self.seconds += time.perf_counter() - start
            self.evals.append((state.step, self.seconds, val))
            print(f"  {self.name:<8} step {state.step:>5}: val {val:.4f} at {self.seconds:7.1f} s", flush=True)
            return
        self.seconds += time.perf_counter() - start

    def time_to(self, target):
        """(step, seconds) of the first evaluation at or below target, or None."""
        return next(((step, seconds) for step, seconds, val in self.evals if val <= target), None)


def compare(data_dir):
    runs = [Run(name, path, data_dir) for name, path in RECIPES.items()]
    base, fast = runs
    if fast.val_tokens < base.val_tokens:
        raise SystemExit(f"the fast recipe evaluates on {fast.val_tokens} val tokens, fewer than nanoGPT's "
                         f"{base.val_tokens}: raise its eval_iters")
    while not all(r.done for r in runs):
        min((r for r in runs if not r.done), key=lambda r: r.seconds).step()  # the one behind in time goes next
    target = base.evals[-1][2]
    print(f"target: nanoGPT's val loss at step {base.state.step}: {target:.4f}")
    print(f"{'recipe':<8} {'steps':>6} {'final val':>9} {'to target':>16} {'total s':>8}")
    for r in runs:
        reached = r.time_to(target)
        when = f"{reached[1]:7.1f} s @ {reached[0]:>5}" if reached else "not reached"
        print(f"{r.name:<8} {r.state.step:>6} {r.evals[-1][2]:>9.4f} {when:>16} {r.seconds:>8.1f}")
    reached = fast.time_to(target)
    ratio = reached[1] / base.time_to(target)[1] if reached else float("nan")
    print(f"ratio fast / nanoGPT: {ratio:.3f}")
    return ratio


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/shakespeare_char", help="prepared shakespeare_char directory")
    parser.add_argument("--runs", type=int, default=1, help="comparisons to run one after another")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both recipes")
    parser.add_argument("--throughput", action="store_true", help="instead: the fast recipe's step time with "
                        "1 or 2 threads, bf16 autocast and torch.compile")
    args = parser.parse_args()
    print(probe().summary())
    if not os.path.exists(os.path.join(args.data, "train.bin")):
        raise SystemExit(f"no prepared data in '{args.data}': run `python prepare.py shakespeare_char "
                         f"--out {args.data}` (add --source PATH for a local copy of tinyshakespeare)")
    if args.throughput:
        return throughput(args.data, args.runs)
    torch.set_num_threads(args.threads)
    ratios = []
    for i in range(args.runs):
        load = os.getloadavg()[0]
        print(f"--- run {i + 1} of {args.runs} (threads {args.threads}, load average {load:.2f} at start)")
        ratios.append(compare(args.data))
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print("ratios: " + ", ".join(f"{r:.3f}" for r in ratios))


if __name__ == "__main__":
    main()
