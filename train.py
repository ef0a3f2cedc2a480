"""
Train a GPT from a config file.

    python train.py configs/quickstart.toml [--key=value ...] [--resume]
    python train.py configs/depth12_124m.toml --plan   # parameters, memory, time: nothing allocated or written
    python train.py --help        # every config key with its type, default and meaning

The story: read the config -> pick device and precision -> open the prepared data ->
build (or restore) the model and optimizer -> loop: learning rate, forward/backward over
gradient-accumulation micro-batches, clip, step -> log, evaluate, checkpoint.
"""

import dataclasses
import errno
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nanoforge import checkpoint, cli, hellaswag, loading, planning, sharding
from nanoforge import gpt2
from nanoforge.config import MODEL_KEYS, ConfigError, build_config, help_text, keys_from_weights, load_saved
from nanoforge.data import Dataset
from nanoforge.device import peak_flops, resolve_device, resolve_dtype
from nanoforge.machine import probe
from nanoforge.distributed import Distributed, end_process
from nanoforge.lock import DirectoryLock
from model import GPT, GPTConfig, padded_vocab_size
from nanoforge.optim import build_optimizer, set_lr
from nanoforge.tracking import Trackers, check_installed

# Keys that fix the model's shape (and the optimizer, whose saved state fits only itself): a
# checkpoint can only be resumed with the same values.
SHAPE_KEYS = (*(key for key in MODEL_KEYS if key != "dropout"), "vocab_multiple", "optimizer")
# Keys a resumed run may change without changing what it computes up to the old end.
SAFE_TO_CHANGE = ("max_iters", "eval_interval", "eval_iters", "log_interval", "checkpoint_interval",
                  "keep_last_n", "max_bad_steps", "out_dir", "device", "compile",
                  "wandb_log", "wandb_project", "wandb_run_name", "tensorboard_log", "hellaswag_interval",
                  "hellaswag_max", "hellaswag_data", "parallel", "activation_checkpointing")

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
    """Mean loss over eval_iters batches of each split (in each process, averaged over processes).
    The batches come from their own fixed-seed generator: every evaluation sees the same batches,
    and training's random stream is untouched."""
    model.eval()
    losses = torch.zeros(2, device=device)
    for i, split in enumerate(("train", "val")):
        generator = torch.Generator().manual_seed(cfg.seed + 1 + ddp.rank)
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, generator)
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            losses[i] += loss.float()
    model.train()
    train_loss, val_loss = (ddp.mean(losses) / cfg.eval_iters).tolist()
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


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ConfigError(f"out_dir '{out_dir}' is not writable ({e.strerror}): choose another with --out_dir=PATH")


def resume_changes(saved, cfg):
    """Compare a checkpoint's config with the new one: refuse shape changes, describe the rest."""
    new = cfg.to_dict()
    differing = {k: (saved.get(k), new[k]) for k in new if saved.get(k) != new[k]}
    shape = {k: v for k, v in differing.items() if k in SHAPE_KEYS}
    if shape:
        details = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in shape.items())
        raise ConfigError(f"cannot resume: the model's shape or optimizer differs ({details}); use the checkpoint's "
                          "values")
    notes = []
    # With lr_decay_iters = 0 the decay ends at max_iters: then changing max_iters changes the learning rates.
    decay_follows_max_iters = cfg.lr_decay_iters == 0 and cfg.lr_schedule != "constant"
    safe = [k for k in SAFE_TO_CHANGE if not (k == "max_iters" and decay_follows_max_iters)]
    for key, (old, new_value) in differing.items():
        caveat = "" if key in safe else " (changes training: the run will differ from an uninterrupted one)"
        notes.append(f"resume: {key} changed from {old!r} to {new_value!r}{caveat}")
    return notes


def truncate_log(path, step):
    """Keep the log records up to `step` (those after it will be written again by the resumed run),
    dropping a last line cut short by a crash."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record["step"] > step:
                break
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def save_failed(error, out_dir):
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return TrainingStopped(
            f"no space left to write a checkpoint in '{out_dir}' ({error.strerror}); the previous checkpoint is "
            "intact: free some space, then continue with --resume", 1)
    return TrainingStopped(f"could not write a checkpoint in '{out_dir}' ({error}); the previous checkpoint is "
                           "intact: fix the problem, then continue with --resume", 1)


@dataclasses.dataclass
class RunState:
    """Everything a checkpoint carries about the run besides the weights and the optimizer: where
    it is, how it has gone, and the random streams. Created in start(), saved in to_checkpoint(),
    restored in from_checkpoint(); nothing else holds this state."""

    step: int  # optimizer updates done
    best_val_loss: float
    skipped_steps: int  # updates skipped by the NaN guard
    # The running loss of the current log window: a resumed run logs the same averages.
    window_steps: int
    loss_sum: torch.Tensor
    # The batch sampler: one stream, the same in every process, each keeping its share (Dataset.get_batch).
    batches: torch.Generator
    # Wall seconds the run had trained before this process took it over (0 for a new run); the
    # clock started when it did: elapsed() counts on across resumes.
    elapsed_before: float = 0.0
    clock_start: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.clock_start

    @classmethod
    def start(cls, cfg, device):
        return cls(step=0, best_val_loss=float("inf"), skipped_steps=0, window_steps=0,
                   loss_sum=torch.zeros((), device=device), batches=torch.Generator().manual_seed(cfg.seed))

    def to_checkpoint(self, ddp, device):
        """(JSON-able info, tensors). Every process must call it: each contributes its RNG states."""
        rng_tensors, rng_info = checkpoint.rng_state(device)
        rng_tensors["rng_batches"] = self.batches.get_state()
        everyone = ddp.gather((rng_tensors, rng_info))
        info = {"step": self.step, "best_val_loss": self.best_val_loss, "skipped_steps": self.skipped_steps,
                "window_steps": self.window_steps, "elapsed_s": self.elapsed(),
                "rng": [rank_info for _, rank_info in everyone]}
        tensors = {f"rank{rank}.{name}": t for rank, (ts, _) in enumerate(everyone) for name, t in ts.items()}
        tensors["loss_sum"] = self.loss_sum
        return info, tensors

    @classmethod
    def from_checkpoint(cls, ckpt, cfg, ddp, device):
        """The state a checkpoint saved, with this process's random streams set back to where they were."""
        info = ckpt.info
        state = cls(step=info["step"], best_val_loss=info["best_val_loss"], skipped_steps=info["skipped_steps"],
                    window_steps=info["window_steps"], loss_sum=ckpt.extra["loss_sum"].to(device),
                    batches=torch.Generator(), elapsed_before=info.get("elapsed_s", 0.0))
        if len(info["rng"]) == ddp.world_size:
            prefix = f"rank{ddp.rank}."
            rng = {k[len(prefix):]: v for k, v in ckpt.extra.items() if k.startswith(prefix)}
            checkpoint.set_rng_state(rng, info["rng"][ddp.rank], device)
            state.batches.set_state(rng["rng_batches"])
        else:
            # The batch stream is every process's and advances by gradient_accumulation_steps draws a
            # step, whatever the number of processes: it goes on exactly. Dropout's streams are per process.
            print(f"resume: the run had {len(info['rng'])} processes, now {ddp.world_size}: the batches go on as "
                  "they would have, dropout's random masks differ from an uninterrupted run", file=sys.stderr)
            torch.manual_seed(cfg.seed + ddp.rank + 1_000_003 * state.step)  # not the masks the run began with
            state.batches.set_state(ckpt.extra["rank0.rng_batches"])
        return state


def build_model(cfg, data, device):
    """A new model from the config's keys, or one of our checkpoints (fine-tuning), or pretrained GPT-2;
    a checkpoint's or GPT-2's weights then fix cfg's shape keys."""
    if cfg.init_from == "scratch":
        vocab_size = padded_vocab_size(data.vocab_size, cfg.vocab_multiple)
        return GPT(cfg.model_config(vocab_size)).to(device), cfg
    if checkpoint.is_checkpoint(cfg.init_from):
        model = loading.init_for_training(cfg.init_from, data.tokenizer, cfg.block_size, cfg.dropout,
                                             cfg.vocab_multiple)
        return model.to(device), keys_from_weights(cfg, model.config)
    model, cfg = gpt2.init_for_training(cfg, data.tokenizer)
    return model.to(device), cfg


def model_for_resume(cfg, ckpt, device):
    """The model a resumed run continues: the shape its own checkpoint records (dropout from cfg), so a
    fine-tuned run does not read its base weights again, nor need them to still exist. Its weights come in
    restore(). A run started from pretrained weights gets cfg's shape keys from them, as build_model did."""
    model_config = GPTConfig(**{**ckpt.info["model"], "dropout": cfg.dropout})
    if cfg.init_from != "scratch":
        cfg = keys_from_weights(cfg, model_config)
    return GPT(model_config).to(device), cfg


def start_run_directory(cfg, resume, ddp):
    """Check out_dir can take this run; the master clears what a crashed run left behind."""
    if not resume and os.path.exists(checkpoint.run_files(cfg.out_dir)["latest"]):
        raise ConfigError(
            f"out_dir '{cfg.out_dir}' already holds a run: continue it with --resume, "
            "or choose a new --out_dir=PATH (or delete the old one)"
        )
    if ddp.is_master:
        checkpoint.remove_stale_temporaries(cfg.out_dir)
        log_path = os.path.join(cfg.out_dir, "log.jsonl")
        if not resume and os.path.exists(log_path):
            os.remove(log_path)  # left by a run that stopped before its first checkpoint


def restore(ckpt, cfg, data, model, optimizer, scaler, ddp, device):
    """Load ckpt (out_dir's newest intact checkpoint) into model, optimizer and scaler; returns its RunState."""
    for note in resume_changes(ckpt.info["config"], cfg):
        print(note, file=sys.stderr)
    if ckpt.info["tokenizer"] != data.tokenizer.to_dict():
        raise ConfigError(f"cannot resume: '{cfg.data_dir}' was prepared with another tokenizer than the "
                          "checkpoint's: use the data the run was trained on")
    sharding.load_model_state(model, ckpt.model_state)  # whole tensors, cut to shards under FSDP
    sharding.load_optimizer_state(optimizer, ckpt.optimizer_state)
    if ckpt.info["scaler"]:
        scaler.load_state_dict(ckpt.info["scaler"])
    state = RunState.from_checkpoint(ckpt, cfg, ddp, device)
    if ddp.is_master:
        truncate_log(os.path.join(cfg.out_dir, "log.jsonl"), state.step)
        print(f"resumed from {ckpt.path} at step {state.step}", file=sys.stderr)
    return state


def save_checkpoint(path, cfg, model, optimizer, scaler, tokenizer, state, ddp, device):
    """Write the whole training state to `path`, or to latest (keeping previous and step copies) when
    path is None. Every process takes part; the master writes."""
    run_info, tensors = state.to_checkpoint(ddp, device)
    # Under FSDP every process takes part in gathering the whole tensors; the master writes them.
    model_state, optimizer_state = sharding.full_model_state(model), sharding.full_optimizer_state(optimizer)
    if not ddp.is_master:
        return
    info = {"config": cfg.to_dict(), "model": dataclasses.asdict(model.config),
            "tokenizer": tokenizer.to_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            **run_info}
    args = (model_state, info, optimizer_state, tensors)
    try:
        if path is None:
            checkpoint.save_latest(cfg.out_dir, cfg.keep_last_n, state.step, *args)
        else:
            checkpoint.save(path, *args)
    except OSError as e:
        raise save_failed(e, cfg.out_dir) from None


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


def train(cfg, resume=False, ddp=None):
    ddp = ddp or Distributed()
    device = ddp.start(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device.type)
    sharding.check_dtype(cfg, dtype, ddp)
    if cfg.gradient_accumulation_steps % ddp.world_size:
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of "
                          f"the number of processes ({ddp.world_size}): each process takes an equal share")
    # Each process runs its share of the micro-batches, so a step sees the same number of tokens
    # whatever the number of processes.
    micro_steps = cfg.gradient_accumulation_steps // ddp.world_size
    data = Dataset(cfg.data_dir, cfg.block_size)
    check_writable(cfg.out_dir)
    check_installed(cfg)  # the trackers start with the loop: a missing one is said before anything is written
    # Only the master holds the run directory's lock: under torchrun the other processes are its own.
    lock = DirectoryLock(cfg.out_dir, "train.py", "wait for that run to finish or stop it, or choose another "
                         "--out_dir=PATH") if ddp.is_master else nullcontext()
    with lock:
        return run_training(cfg, resume, ddp, device, dtype, micro_steps, data)


def check_bad_streak(bad_streak, step, cfg, say):
    """Say that a step's update was skipped; stop after max_bad_steps of them in a row."""
    if bad_streak:
        say(f"step {step}: non-finite loss or gradient norm, update skipped ({bad_streak} in a row)", file=sys.stderr)
    if bad_streak >= cfg.max_bad_steps:
        raise TrainingStopped(
            f"stopped at step {step}: {bad_streak} steps in a row had a non-finite loss or gradient norm (none "
            f"reached the weights; the checkpoints in '{cfg.out_dir}' are untouched): lower learning_rate or check "
            "the data, then continue with --resume", 1)


def start_model(cfg, resume, ddp, device, dtype, data):
    """The model, its optimizer, the loss scaler and the run's state: new, or as the checkpoint left them."""
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    if resume:
        ckpt = checkpoint.load_for_resume(cfg.out_dir, device=device)
        model, cfg = model_for_resume(cfg, ckpt, device)
    else:
        model, cfg = build_model(cfg, data, device)
    torch.manual_seed(cfg.seed + ddp.rank)  # but each process its own dropout masks
    model.activation_checkpointing = cfg.activation_checkpointing
    if sharding.sharded(cfg, ddp):  # before the optimizer, which then holds the shards
        model = sharding.shard(model, device, dtype)
    optimizer = build_optimizer(model, cfg, device.type)
    # Loss scaling only for float16 on CUDA: bfloat16 and float32 have float32's exponent range.
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16 and device.type == "cuda"))
    state = RunState.start(cfg, device)
    if resume:
        state = restore(ckpt, cfg, data, model, optimizer, scaler, ddp, device)
    return model, cfg, optimizer, scaler, state


def run_training(cfg, resume, ddp, device, dtype, micro_steps, data):
    """The training run itself, in a run directory this process has locked."""
    say = tqdm.write if ddp.is_master else (lambda *args, **kwargs: None)
    hellaswag_examples = hellaswag.during_training(cfg, say)  # a bad file stops the run before it writes
    # The processes split the examples, except under FSDP: there every forward pass is collective (it gathers
    # the weights), so each process scores them all and the counts of one are the totals.
    hellaswag_split = None if sharding.sharded(cfg, ddp) else ddp
    start_run_directory(cfg, resume, ddp)
    for note in data.notes:  # e.g. how many conversations are cut to block_size
        say(f"data: {note}", file=sys.stderr)
    model, cfg, optimizer, scaler, state = start_model(cfg, resume, ddp, device, dtype, data)
    if ddp.is_master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)

    runner = torch.compile(model) if cfg.compile else model  # `model` stays uncompiled: plain state-dict names
    if ddp.enabled and not sharding.sharded(cfg, ddp):
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    peak = peak_flops(device, dtype)
    window = LogWindow(model.flops_per_token(), peak * ddp.world_size if peak else None, ddp.world_size)

    def next_batch():
        x, y = data.get_batch("train", cfg.batch_size, state.batches, share=(ddp.rank, ddp.world_size))
        window.add(x)
        if device.type == "cuda":  # pinned host memory lets the copy to the GPU overlap compute
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def save(path=None):
        save_checkpoint(path, cfg, model, optimizer, scaler, data.tokenizer, state, ddp, device)

    log = open(os.path.join(cfg.out_dir, "log.jsonl") if ddp.is_master else os.devnull, "a")
    # Off a terminal (a log file, CI) a redraw every 30 s keeps the log readable.
    bar = tqdm(total=cfg.max_iters, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30, disable=not ddp.is_master)
    bad_streak = 0
    # W&B, TensorBoard (only the master logs): made here, from the config build_model completed, so
    # that an error before the loop leaves no tracker run open.
    trackers = Trackers(cfg, enabled=ddp.is_master)
    say(probe().summary(), file=sys.stderr)
    machine = {"machine": probe().as_dict()}  # in the run's first record (and a resumed run's): who made the figures

    with StopSignals() as stop, log, bar, trackers:
        while state.step < cfg.max_iters:
            lr = get_lr(state.step, cfg)
            set_lr(optimizer, lr, cfg)
            step_loss = train_step(runner, optimizer, scaler, next_batch, micro_steps, autocast, ddp)
            bad_streak = 0 if apply_update(model, optimizer, scaler, step_loss, cfg, state) else bad_streak + 1
            state.step += 1
            bar.update(1)
            check_bad_streak(bad_streak, state.step, cfg, say)
            is_eval = state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters
            is_hellaswag = bool(hellaswag_examples) and (state.step % cfg.hellaswag_interval == 0
                                                         or state.step == cfg.max_iters)
            improved = False
            if state.step % cfg.log_interval == 0 or is_eval or is_hellaswag:
                record, machine = {**window.record(state, lr), **machine}, {}
                if is_eval:
                    losses = estimate_loss(runner, data, cfg, autocast, device, ddp)
                    record.update(train_loss=round(losses["train"], 6), val_loss=round(losses["val"], 6))
                    say(f"step {state.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    improved = losses["val"] < state.best_val_loss
                    state.best_val_loss = min(state.best_val_loss, losses["val"])
                if is_hellaswag:
                    record.update(hellaswag.log_fields(model, data.tokenizer, hellaswag_examples, hellaswag_split, autocast))
                    say(f"step {state.step}: hellaswag acc_norm {record['hellaswag_acc_norm']:.2%}")
                record["elapsed_s"] = round(state.elapsed(), 3)  # after the evaluation: time-to-loss includes it
                write_record(log, bar, trackers, record)
                state.loss_sum.zero_()
                state.window_steps = 0
                window.reset()
            if improved:  # saved after the log window closes, so a run resumed from it logs the same losses
                save(checkpoint.run_files(cfg.out_dir)["best"])
            stopping = ddp.any(stop.received is not None)  # all processes stop at the same step
            if state.step % cfg.checkpoint_interval == 0 or state.step == cfg.max_iters or stopping:
                save()
            if stopping and state.step < cfg.max_iters:
                signum = stop.received or signal.SIGTERM
                raise TrainingStopped(
                    f"stopped by {signal.Signals(signum).name} at step {state.step}; checkpoint written to "
                    f"{checkpoint.run_files(cfg.out_dir)['latest']}: continue with the same command plus --resume",
                    128 + signum)
    return state.best_val_loss


def write_record(log, bar, trackers, record):
    log.write(json.dumps(record) + "\n")
    log.flush()
    trackers.log(record)
    mfu = record["mfu"]
    bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "nan",
                    tok_s=f"{record['tokens_per_sec']:,.0f}", mfu=f"{mfu:.1%}" if mfu else "n/a", refresh=False)


@cli.command(interrupted="interrupted; the last checkpoint written is intact: continue with --resume")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text())
        return
    resume, plan = "--resume" in argv, "--plan" in argv
    args = [a for a in argv if a not in ("--resume", "--plan")]
    path = None
    if args and not args[0].startswith("--"):
        path, args = args[0], args[1:]
    stray = [a for a in args if not a.startswith("--")]
    if stray:
        raise ConfigError(f"unexpected argument '{stray[0]}': overrides are written --key=value")
    ddp = Distributed()
    try:
        # `--resume` without a config file continues with the run directory's saved config.
        base = load_saved(args) if resume and path is None else None
        cfg = build_config(path, args, base)
        if plan:
            print(planning.describe(cfg))
            return
        best = train(cfg, resume=resume, ddp=ddp)
    except TrainingStopped as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        ddp.close()
    if ddp.is_master:
        print(f"done: best val loss {best:.4f}; sample with `python sample.py --ckpt {cfg.out_dir}`")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        end_process(e.code)
    end_process(0)
