"""
Train a GPT from a config file.

    python train.py configs/quickstart.toml [--key=value ...] [--resume]
    python train.py configs/depth12_124m.toml --plan   # parameters, memory, time: nothing allocated or written
    python train.py --help        # every config key with its type, default and meaning

The story: read the config -> pick device and precision -> open the prepared data ->
build (or restore) the model and optimizer -> loop: learning rate, forward/backward over
gradient-accumulation micro-batches, clip, step -> log, evaluate, checkpoint.
"""

import json
import os
import signal
import sys
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nanoforge import checkpoint, cli, hellaswag, planning, sharding, training
from nanoforge.config import ConfigError, build_config, help_text, load_saved, split_arguments
from nanoforge.data import Dataset
from nanoforge.device import peak_flops, resolve_device, resolve_dtype
from nanoforge.distributed import Distributed, end_process
from nanoforge.lock import DirectoryLock
from nanoforge.machine import probe
from nanoforge.optim import set_lr
from nanoforge.runs import check_writable, save_checkpoint, start_model, start_run_directory
from nanoforge.tracking import Trackers, check_installed
# training.get_lr is looked up at each step (the resume tests interrupt a run through it).
from nanoforge.training import (LogWindow, StopSignals, TrainingStopped, apply_update, check_bad_streak,
                                estimate_loss, train_step, write_record)

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
    say(probe(cuda=device.type == "cuda").summary(), file=sys.stderr)
    machine = {"machine": probe(cuda=device.type == "cuda").as_dict()}  # in the run's first record (and a resumed run's): who made the figures

    with StopSignals() as stop, log, bar, trackers:
        while state.step < cfg.max_iters:
            lr = training.get_lr(state.step, cfg)
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


@cli.command(interrupted="interrupted; the last checkpoint written is intact: continue with --resume")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(help_text())
        return
    path, args, flags = split_arguments(argv, ("--resume", "--plan"))
    resume, plan = "--resume" in flags, "--plan" in flags
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
