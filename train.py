"""
Train a GPT from a config file.

    python train.py configs/quickstart.toml [--key=value ...] [--resume]
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

import checkpoint
import gpt2
from config import ConfigError, build_config, help_text, load_saved
from data import DataError, Dataset
from distributed import Distributed
from model import GPT, GPTConfig

# Keys that fix the model's shape: a checkpoint can only be resumed with the same values.
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_multiple")
# Keys a resumed run may change without changing what it computes up to the old end.
SAFE_TO_CHANGE = ("max_iters", "eval_interval", "eval_iters", "log_interval", "checkpoint_interval",
                  "keep_last_n", "max_bad_steps", "lr_decay_iters", "min_lr", "out_dir", "device", "compile")

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


def resolve_device(name):
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
    if name == "auto":
        if device_type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def peak_flops(device, dtype):
    """The device's peak FLOP/s for this dtype, or None when unknown (CPU, MPS, fp32, unlisted GPU)."""
    if device.type != "cuda" or dtype == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS if key in name), None)


def get_lr(step, cfg):
    """Learning rate for the update that follows `step` completed updates: linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
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
    new = dataclasses.asdict(cfg)
    differing = {k: (saved.get(k), new[k]) for k in new if saved.get(k) != new[k]}
    shape = {k: v for k, v in differing.items() if k in MODEL_KEYS}
    if shape:
        details = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in shape.items())
        raise ConfigError(f"cannot resume: the model's shape differs ({details}); use the checkpoint's values")
    notes = []
    for key, (old, new_value) in differing.items():
        caveat = "" if key in SAFE_TO_CHANGE else " (changes training: the run will differ from an uninterrupted one)"
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


def train(cfg, resume=False, ddp=None):
    ddp = ddp or Distributed()
    device = ddp.start(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device.type)
    if cfg.gradient_accumulation_steps % ddp.world_size:
        raise ConfigError(f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}) must be a multiple of "
                          f"the number of processes ({ddp.world_size}): each process takes an equal share")
    # Each process runs its share of the micro-batches, so a step sees the same number of tokens
    # whatever the number of processes.
    micro_steps = cfg.gradient_accumulation_steps // ddp.world_size
    data = Dataset(cfg.data_dir, cfg.block_size)
    check_writable(cfg.out_dir)
    files = checkpoint.run_files(cfg.out_dir)
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if not resume and os.path.exists(files["latest"]):
        raise ConfigError(
            f"out_dir '{cfg.out_dir}' already holds a run: continue it with --resume, "
            "or choose a new --out_dir=PATH (or delete the old one)"
        )
    if ddp.is_master:
        checkpoint.remove_stale_temporaries(cfg.out_dir)
    say = tqdm.write if ddp.is_master else (lambda *args, **kwargs: None)

    # model and optimizer
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    if cfg.init_from == "scratch":
        vocab_size = math.ceil(data.vocab_size / cfg.vocab_multiple) * cfg.vocab_multiple
        model_cfg = GPTConfig(cfg.block_size, vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias)
        model = GPT(model_cfg).to(device)
    else:  # pretrained GPT-2: its weights fix the model's shape, and cfg records the values they set
        model, cfg = gpt2.init_for_training(cfg, data.tokenizer)
        model_cfg = model.config
        model = model.to(device)
    torch.manual_seed(cfg.seed + ddp.rank)  # but each process its own dropout masks ...
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    # Loss scaling only for float16 on CUDA: bfloat16 and float32 have float32's exponent range.
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16 and device.type == "cuda"))
    batch_generator = torch.Generator().manual_seed(cfg.seed + ddp.rank)  # ... and its own batches
    step, best_val_loss, skipped_steps = 0, float("inf"), 0
    # The running loss of the current log window is part of the state: a resumed run logs the same averages.
    loss_sum, window_steps = torch.zeros((), device=device), 0

    if resume:
        ckpt = checkpoint.load_for_resume(cfg.out_dir, device=device)
        for note in resume_changes(ckpt.info["config"], cfg):
            print(note, file=sys.stderr)
        if ckpt.info["tokenizer"] != data.tokenizer.to_dict():
            raise ConfigError(f"cannot resume: '{cfg.data_dir}' was prepared with another tokenizer than the "
                              "checkpoint's: use the data the run was trained on")
        load_model_state(model, ckpt.model_state)
        optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.info["scaler"]:
            scaler.load_state_dict(ckpt.info["scaler"])
        step, best_val_loss = ckpt.info["step"], ckpt.info["best_val_loss"]
        skipped_steps, window_steps = ckpt.info["skipped_steps"], ckpt.info["window_steps"]
        loss_sum = ckpt.extra["loss_sum"].to(device)
        if len(ckpt.info["rng"]) == ddp.world_size:
            prefix = f"rank{ddp.rank}."
            rng = {k[len(prefix):]: v for k, v in ckpt.extra.items() if k.startswith(prefix)}
            checkpoint.set_rng_state(rng, ckpt.info["rng"][ddp.rank], device)
            batch_generator.set_state(rng["rng_batches"])
        else:
            print(f"resume: the run had {len(ckpt.info['rng'])} processes, now {ddp.world_size}: batches and "
                  "dropout will differ from an uninterrupted run", file=sys.stderr)
            fresh_seed = cfg.seed + ddp.rank + 1_000_003 * step  # not the batches the run began with
            torch.manual_seed(fresh_seed)
            batch_generator.manual_seed(fresh_seed)
        if ddp.is_master:
            truncate_log(log_path, step)
            print(f"resumed from {ckpt.path} at step {step}", file=sys.stderr)
    elif ddp.is_master and os.path.exists(log_path):
        os.remove(log_path)  # left by a run that stopped before its first checkpoint

    if ddp.is_master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    def save(path=None):
        """Write the whole training state: latest (default) or the given file. Every process takes
        part (each contributes its RNG states); the master writes."""
        rng_tensors, rng_info = checkpoint.rng_state(device)
        rng_tensors["rng_batches"] = batch_generator.get_state()
        everyone = ddp.gather((rng_tensors, rng_info))
        if not ddp.is_master:
            return
        info = {
            "config": dataclasses.asdict(cfg),
            "model": dataclasses.asdict(model_cfg),
            "tokenizer": data.tokenizer.to_dict(),
            "step": step,
            "best_val_loss": best_val_loss,
            "skipped_steps": skipped_steps,
            "window_steps": window_steps,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": [rank_info for _, rank_info in everyone],
        }
        extra = {f"rank{rank}.{name}": t for rank, (tensors, _) in enumerate(everyone) for name, t in tensors.items()}
        extra["loss_sum"] = loss_sum
        args = (model.state_dict(), info, optimizer.state_dict(), extra)
        try:
            if path is None:
                checkpoint.save_latest(cfg.out_dir, cfg.keep_last_n, step, *args)
            else:
                checkpoint.save(path, *args)
        except OSError as e:
            raise save_failed(e, cfg.out_dir) from None

    runner = torch.compile(model) if cfg.compile else model  # `model` stays uncompiled: plain state-dict names
    if ddp.enabled:
        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    pin = device.type == "cuda"  # pinned host memory lets the copy to the GPU overlap compute

    def to_device(x, y):
        if pin:
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps  # all processes
    peak = peak_flops(device, dtype)
    peak = peak * ddp.world_size if peak else None
    flops_per_token = model.flops_per_token()
    log = open(log_path if ddp.is_master else os.devnull, "a")
    # Off a terminal (a log file, CI) a redraw every 30 s keeps the log readable.
    bar = tqdm(total=cfg.max_iters, initial=step, desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30, disable=not ddp.is_master)
    window_start, window_timed_steps = time.perf_counter(), 0
    bad_streak = 0

    with StopSignals() as stop, log, bar:
        while step < cfg.max_iters:
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            x, y = to_device(*data.get_batch("train", cfg.batch_size, batch_generator))
            for micro_step in range(micro_steps):
                last = micro_step + 1 == micro_steps
                # Across processes, gradients are averaged once per step: on the last micro-batch's backward.
                with runner.no_sync() if ddp.enabled and not last else nullcontext():
                    with autocast:
                        _, loss = runner(x, y)
                        loss = loss / micro_steps  # the sum of micro-losses is the batch mean
                    if not last:  # fetch the next micro-batch while this one runs
                        x, y = to_device(*data.get_batch("train", cfg.batch_size, batch_generator))
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            ddp.mean(step_loss)  # every process then takes the same decisions below
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            # NaN guard: a non-finite loss or gradient never reaches the weights. This costs one sync per step.
            # With float16, overflowing gradients are routine while the loss scale calibrates: GradScaler
            # skips those steps itself, so only the loss is checked.
            finite = torch.isfinite(step_loss) if scaler.is_enabled() else torch.isfinite(step_loss + grad_norm)
            if finite.item():
                scaler.step(optimizer)
                scaler.update()
                bad_streak = 0
                loss_sum += step_loss
                window_steps += 1
            else:
                bad_streak += 1
                skipped_steps += 1
                say(f"step {step + 1}: non-finite loss or gradient norm, update skipped ({bad_streak} in a row)",
                    file=sys.stderr)
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_timed_steps += 1
            bar.update(1)
            if bad_streak >= cfg.max_bad_steps:
                raise TrainingStopped(
                    f"stopped at step {step}: {bad_streak} steps in a row had a non-finite loss or gradient norm "
                    f"(none reached the weights; the checkpoints in '{cfg.out_dir}' are untouched): lower "
                    "learning_rate or check the data, then continue with --resume", 1)

            is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
            improved = False
            if step % cfg.log_interval == 0 or is_eval:
                train_loss = loss_sum.item() / window_steps if window_steps else float("nan")
                elapsed = time.perf_counter() - window_start
                tokens_per_sec = tokens_per_step * window_timed_steps / elapsed
                mfu = flops_per_token * tokens_per_sec / peak if peak else None
                record = {"step": step, "loss": round(train_loss, 6) if window_steps else None, "lr": lr,
                          "tokens_per_sec": round(tokens_per_sec, 1), "mfu": round(mfu, 4) if mfu else None,
                          "skipped_steps": skipped_steps}
                if is_eval:
                    losses = estimate_loss(runner, data, cfg, autocast, device, ddp)
                    record.update(train_loss=round(losses["train"], 6), val_loss=round(losses["val"], 6))
                    say(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    improved = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                                mfu=f"{mfu:.1%}" if mfu else "n/a", refresh=False)
                loss_sum.zero_()
                window_steps = 0
                window_start, window_timed_steps = time.perf_counter(), 0
            if improved:  # saved after the log window closes, so a run resumed from it logs the same losses
                save(files["best"])
            stopping = ddp.any(stop.received is not None)  # all processes stop at the same step
            if step % cfg.checkpoint_interval == 0 or step == cfg.max_iters or stopping:
                save()
            if stopping and step < cfg.max_iters:
                signum = stop.received or signal.SIGTERM
                raise TrainingStopped(
                    f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint written to "
                    f"{files['latest']}: continue with the same command plus --resume", 128 + signum)
    return best_val_loss


def load_model_state(model, state):
    """Load a checkpoint's weights; the tied lm_head is stored once, as the token embedding."""
    state = dict(state)
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model.load_state_dict(state)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text())
        return
    resume = "--resume" in argv
    args = [a for a in argv if a != "--resume"]
    path = None
    if args and not args[0].startswith("--"):
        path, args = args[0], args[1:]
    stray = [a for a in args if not a.startswith("--")]
    ddp = Distributed()
    try:
        if stray:
            raise ConfigError(f"unexpected argument '{stray[0]}': overrides are written --key=value")
        # `--resume` without a config file continues with the run directory's saved config.
        base = load_saved(args) if resume and path is None else None
        cfg = build_config(path, args, base)
        best = train(cfg, resume=resume, ddp=ddp)
    except (ConfigError, DataError, checkpoint.CheckpointError, gpt2.GPT2Error) as e:
        sys.exit(f"train.py: error: {e}")
    except TrainingStopped as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted; the last checkpoint written is intact: continue with --resume")
    finally:
        ddp.close()
    if ddp.is_master:
        print(f"done: best val loss {best:.4f}; sample with `python sample.py --ckpt {cfg.out_dir}`")


if __name__ == "__main__":
    main()
