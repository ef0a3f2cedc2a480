"""
Train a GPT from a config file.

    python train.py configs/quickstart.toml [--key=value ...] [--resume]
    python train.py --help        # every config key with its type, default and meaning

The story: read the config -> pick device and precision -> open the prepared data ->
build (or restore) the model and optimizer -> loop: learning rate, forward/backward over
gradient-accumulation micro-batches, clip, step -> log, evaluate, checkpoint.
"""

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

import checkpoint
import gpt2
from config import ConfigError, build_config, help_text
from data import DataError, Dataset
from model import GPT, GPTConfig

# Keys that fix the model's shape: a checkpoint can only be resumed with the same values.
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_multiple")

# Dense bf16/fp16 tensor-core peak FLOP/s, matched against torch.cuda.get_device_name().
# Order matters: the first substring that matches wins ("H100 PCIe" before "H100").
GPU_PEAK_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 125e12),
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
def estimate_loss(model, data, cfg, autocast, device):
    """Mean loss over eval_iters batches of each split. The batches come from their own fixed-seed
    generator: every evaluation sees the same batches, and training's random stream is untouched."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = data.get_batch(split, cfg.batch_size, generator)
            with autocast:
                _, loss = model(x.to(device), y.to(device))
            total += loss.item()
        losses[split] = total / cfg.eval_iters
    model.train()
    return losses


def check_writable(out_dir):
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ConfigError(f"out_dir '{out_dir}' is not writable ({e.strerror}): choose another with --out_dir=PATH")


def resume_changes(saved, cfg):
    """Compare a checkpoint's config with the new one: refuse shape changes, report the rest."""
    new = dataclasses.asdict(cfg)
    differing = {k: (saved.get(k), new[k]) for k in new if saved.get(k) != new[k]}
    shape = {k: v for k, v in differing.items() if k in MODEL_KEYS}
    if shape:
        details = ", ".join(f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in shape.items())
        raise ConfigError(f"cannot resume: the model's shape differs ({details}); use the checkpoint's values")
    return differing


def train(cfg, resume=False):
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device.type)
    data = Dataset(cfg.data_dir, cfg.block_size)
    check_writable(cfg.out_dir)
    latest_path = os.path.join(cfg.out_dir, "latest.safetensors")
    best_path = os.path.join(cfg.out_dir, "best.safetensors")
    if not resume and os.path.exists(latest_path):
        raise ConfigError(
            f"out_dir '{cfg.out_dir}' already holds a run: continue it with --resume, "
            "or choose a new --out_dir=PATH (or delete the old one)"
        )

    # model and optimizer
    torch.manual_seed(cfg.seed)
    if cfg.init_from == "scratch":
        vocab_size = math.ceil(data.vocab_size / cfg.vocab_multiple) * cfg.vocab_multiple
        model_cfg = GPTConfig(cfg.block_size, vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias)
        model = GPT(model_cfg).to(device)
    else:  # pretrained GPT-2: its weights fix the model's shape, and cfg records the values they set
        model, cfg = gpt2.init_for_training(cfg, data.tokenizer)
        model_cfg = model.config
        model = model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    # Loss scaling only for float16 on CUDA: bfloat16 and float32 have float32's exponent range.
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16 and device.type == "cuda"))
    batch_generator = torch.Generator().manual_seed(cfg.seed)
    step, best_val_loss = 0, float("inf")

    if resume:
        ckpt = checkpoint.load(latest_path, device=device)
        for key, (old, new) in resume_changes(ckpt.info["config"], cfg).items():
            print(f"resume: {key} changed from {old!r} to {new!r}", file=sys.stderr)
        load_model_state(model, ckpt.model_state)
        optimizer.load_state_dict(ckpt.optimizer_state)
        if ckpt.info.get("scaler"):
            scaler.load_state_dict(ckpt.info["scaler"])
        step, best_val_loss = ckpt.info["step"], ckpt.info["best_val_loss"]
        torch.set_rng_state(ckpt.extra["rng_torch"])
        batch_generator.set_state(ckpt.extra["rng_batches"])
        if device.type == "cuda" and "rng_cuda" in ckpt.extra:
            torch.cuda.set_rng_state(ckpt.extra["rng_cuda"], device)
        print(f"resumed from {latest_path} at step {step}", file=sys.stderr)

    with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=2)

    def save(path):
        info = {
            "config": dataclasses.asdict(cfg),
            "model": dataclasses.asdict(model_cfg),
            "tokenizer": data.tokenizer.to_dict(),
            "step": step,
            "best_val_loss": best_val_loss,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
        }
        extra = {"rng_torch": torch.get_rng_state(), "rng_batches": batch_generator.get_state()}
        if device.type == "cuda":
            extra["rng_cuda"] = torch.cuda.get_rng_state(device)
        checkpoint.save(path, model.state_dict(), info, optimizer.state_dict(), extra)

    runner = torch.compile(model) if cfg.compile else model  # `model` stays uncompiled: plain state-dict names
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    pin = device.type == "cuda"  # pinned host memory lets the copy to the GPU overlap compute

    def to_device(x, y):
        if pin:
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    peak = peak_flops(device, dtype)
    flops_per_token = model.flops_per_token()
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a")
    # Off a terminal (a log file, CI) a redraw every 30 s keeps the log readable.
    bar = tqdm(total=cfg.max_iters, initial=step, desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    window_start, window_steps = time.perf_counter(), 0
    loss_sum = torch.zeros((), device=device)

    while step < cfg.max_iters:
        lr = get_lr(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = to_device(*data.get_batch("train", cfg.batch_size, batch_generator))
        for micro_step in range(cfg.gradient_accumulation_steps):
            with autocast:
                _, loss = runner(x, y)
                loss = loss / cfg.gradient_accumulation_steps  # the sum of micro-losses is the batch mean
            if micro_step + 1 < cfg.gradient_accumulation_steps:  # fetch the next micro-batch while this one runs
                x, y = to_device(*data.get_batch("train", cfg.batch_size, batch_generator))
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        bar.update(1)

        is_eval = step % cfg.eval_interval == 0 or step == cfg.max_iters
        if step % cfg.log_interval == 0 or is_eval:
            train_loss = loss_sum.item() / window_steps  # .item() waits for the GPU, so the timing below is real
            elapsed = time.perf_counter() - window_start
            tokens_per_sec = tokens_per_step * window_steps / elapsed
            mfu = flops_per_token * tokens_per_sec / peak if peak else None
            record = {"step": step, "loss": round(train_loss, 6), "lr": lr,
                      "tokens_per_sec": round(tokens_per_sec, 1), "mfu": round(mfu, 4) if mfu else None}
            if is_eval:
                losses = estimate_loss(runner, data, cfg, autocast, device)
                record.update(train_loss=round(losses["train"], 6), val_loss=round(losses["val"], 6))
                tqdm.write(f"step {step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if losses["val"] < best_val_loss:
                    best_val_loss = losses["val"]
                    save(best_path)
                save(latest_path)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}",
                            mfu=f"{mfu:.1%}" if mfu else "n/a", refresh=False)
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
    bar.close()
    log.close()
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
    try:
        if stray:
            raise ConfigError(f"unexpected argument '{stray[0]}': overrides are written --key=value")
        cfg = build_config(path, args)
        best = train(cfg, resume=resume)
    except (ConfigError, DataError, checkpoint.CheckpointError, gpt2.GPT2Error) as e:
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted")
    print(f"done: best val loss {best:.4f}; sample with `python sample.py --ckpt {cfg.out_dir}`")


if __name__ == "__main__":
    main()
