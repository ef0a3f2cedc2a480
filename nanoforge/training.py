"""
One training step and what surrounds it, shared by every training loop (train.py's pretraining and fine-tuning,
rl.py's policy updates): the learning-rate schedule, forward/backward over micro-batches, the update with its
NaN guard, evaluation of the loss, stopping on a signal or a streak of bad steps, and the log window's speed.
"""

import json
import math
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from nanoforge import sharding

def get_lr(step, cfg):
    """Learning rate for the update that follows `step` completed updates: linear warmup, then constant,
    or cosine down to min_lr at lr_decay_iters, or (wsd: warmup-stable-decay, as the speedruns use)
    constant until the last decay_fraction of lr_decay_iters and a straight line down to min_lr there."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    end = cfg.decay_end
    if cfg.lr_schedule == "wsd":
        decay_start = max(cfg.warmup_iters, end - round(cfg.decay_fraction * end))
        if step < decay_start:
            return cfg.learning_rate
        progress = min(1.0, (step - decay_start) / max(1, end - decay_start))
        return cfg.learning_rate + progress * (cfg.min_lr - cfg.learning_rate)
    if step >= end:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, data, cfg, autocast, device, ddp):
    """Mean loss over eval_iters batches of each split: the same figure whatever the number of processes.
    The batches come from one fixed-seed stream (every evaluation sees the same batches, and training's random
    stream is untouched), dealt out in turn: process r evaluates batches r, r + W, ... of the eval_iters one
    process would, and the sums are added up. Each process runs the same number of forward passes (a batch
    past eval_iters counts for nothing): FSDP gathers weights in every process at once."""
    model.eval()
    losses = torch.zeros(2, device=device)
    rounds = -(-cfg.eval_iters // ddp.world_size)  # ceil
    for i, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        for r in range(rounds):
            x, y = data.get_batch(split, cfg.batch_size, generator, share=(ddp.rank, ddp.world_size))
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            if r * ddp.world_size + ddp.rank < cfg.eval_iters:
                losses[i] += loss.float()
    model.train()
    train_loss, val_loss = (ddp.mean(losses) * ddp.world_size / cfg.eval_iters).tolist()
    return {"train": train_loss, "val": val_loss}


class TrainingStopped(Exception):
    """Training ended early (a signal, or a run of non-finite steps); the message says what to do next."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """The first SIGINT or SIGTERM asks the loop to stop after the current step (and checkpoint);
    a second one stops at once."""

    def __init__(self):
        self.received = None

    def __enter__(self):
        self.previous = {}
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        tqdm.write(f"{signal.Signals(signum).name}: finishing this step and writing a checkpoint "
                   "(send it again to stop at once)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train_step(runner, optimizer, scaler, next_batch, micro_steps, autocast, ddp):
    """Forward and backward over micro_steps micro-batches; returns the step's mean loss (a 0-d tensor,
    the same in every process). Gradients are left in the parameters, unscaled."""
    step_loss = 0.0
    x, y = next_batch()
    for micro_step in range(micro_steps):
        last = micro_step + 1 == micro_steps
        # Across processes, gradients are averaged once per step: on the last micro-batch's backward.
        with sharding.gradient_sync(runner, last):
            with autocast:
                _, loss = runner(x, y)
                loss = loss / micro_steps  # the sum of micro-losses is the batch mean
            if not last:  # fetch the next micro-batch while this one runs
                x, y = next_batch()
            scaler.scale(loss).backward()
        step_loss = step_loss + loss.detach()
    ddp.mean(step_loss)  # every process then takes the same decisions
    scaler.unscale_(optimizer)
    return step_loss


def apply_update(model, optimizer, scaler, step_loss, cfg, state):
    """Clip and step, unless the loss or gradient norm is non-finite (the NaN guard: such a step
    never reaches the weights, costing one sync per step). Returns whether the update was applied."""
    # Under FSDP the norm is of the whole gradient (its shards' norms combined), whole in every process.
    grad_norm = sharding.full(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
    # With float16, overflowing gradients are routine while the loss scale calibrates: GradScaler
    # skips those steps itself, so only the loss is checked.
    finite = torch.isfinite(step_loss) if scaler.is_enabled() else torch.isfinite(step_loss + grad_norm)
    applied = bool(finite.item())
    if applied:
        scaler.step(optimizer)
        scaler.update()
        state.loss_sum += step_loss
        state.window_steps += 1
    else:
        state.skipped_steps += 1
    optimizer.zero_grad(set_to_none=True)
    return applied


class LogWindow:
    """Counts the tokens fed and times them between two log records, for tokens/s and MFU. Tokens are
    counted as fed, not as batch_size x block_size: a chat batch is only as long as its longest
    conversation."""

    def __init__(self, flops_per_token, peak, processes):
        self.flops_per_token, self.peak, self.processes = flops_per_token, peak, processes
        self.reset()

    def reset(self):
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, x):
        """A micro-batch x (B, T) was fed in each process (the processes' batches have one shape, or close)."""
        self.tokens += x.numel() * self.processes

    def record(self, state, lr):
        """The log record of the window that ends now (its losses) and its speed."""
        tokens_per_sec = self.tokens / (time.perf_counter() - self.start)
        mfu = self.flops_per_token * tokens_per_sec / self.peak if self.peak else None
        loss = state.loss_sum.item() / state.window_steps if state.window_steps else None
        return {"step": state.step, "loss": round(loss, 6) if loss is not None else None, "lr": lr,
                "tokens_per_sec": round(tokens_per_sec, 1), "mfu": round(mfu, 4) if mfu else None,
                "skipped_steps": state.skipped_steps}


def check_bad_streak(bad_streak, step, cfg, say):
    """Say that a step's update was skipped; stop after max_bad_steps of them in a row."""
    if bad_streak:
        say(f"step {step}: non-finite loss or gradient norm, update skipped ({bad_streak} in a row)", file=sys.stderr)
    if bad_streak >= cfg.max_bad_steps:
        raise TrainingStopped(
            f"stopped at step {step}: {bad_streak} steps in a row had a non-finite loss or gradient norm (none "
            f"reached the weights; the checkpoints in '{cfg.out_dir}' are untouched): lower learning_rate or check "
            "the data, then continue with --resume", 1)


def write_record(log, bar, trackers, record):
    log.write(json.dumps(record) + "\n")
    log.flush()
    trackers.log(record)
    mfu = record["mfu"]
    bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
                    tok_s=f"{record['tokens_per_sec']:,.0f}", mfu=f"{mfu:.1%}" if mfu else "n/a", refresh=False)
