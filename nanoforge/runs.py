"""
A training run's directory and state: where a run starts (a new model, a checkpoint to fine-tune, GPT-2, or its
own latest checkpoint to resume), what a checkpoint carries about it (RunState), and writing and restoring it.
Shared by every command that trains (train.py, rl.py).
"""

import dataclasses
import errno
import json
import os
import sys
import tempfile
import time

import torch

from model import GPT, GPTConfig, padded_vocab_size
from nanoforge import checkpoint, loading, lora, sharding
from nanoforge.config import MODEL_KEYS, ConfigError, keys_from_weights
from nanoforge.optim import build_optimizer
from nanoforge.training import TrainingStopped

# Keys that fix the model's shape (and the optimizer, whose saved state fits only itself): a
# checkpoint can only be resumed with the same values.
SHAPE_KEYS = (*(key for key in MODEL_KEYS if key != "dropout"), "vocab_multiple", "optimizer", "lora_rank",
              "lora_targets")
# Keys a resumed run may change without changing what it computes up to the old end.
SAFE_TO_CHANGE = ("max_iters", "eval_interval", "eval_iters", "log_interval", "checkpoint_interval",
                  "keep_last_n", "max_bad_steps", "out_dir", "device", "compile",
                  "wandb_log", "wandb_project", "wandb_run_name", "tensorboard_log", "hellaswag_interval",
                  "hellaswag_max", "hellaswag_data", "parallel", "activation_checkpointing")


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
    # A LoRA run's base weights, by path and content hash (lora.base_reference): its checkpoints hold only the
    # adapters, and name the base they need.
    lora_base: dict = None

    def elapsed(self):
        return self.elapsed_before + time.perf_counter() - self.clock_start

    @classmethod
    def start(cls, cfg, device):
        return cls(step=0, best_val_loss=float("inf"), skipped_steps=0, window_steps=0,
                   loss_sum=torch.zeros((), device=device), batches=torch.Generator().manual_seed(cfg.seed),
                   lora_base=lora.base_reference(cfg.init_from) if cfg.lora_rank else None)

    def to_checkpoint(self, ddp, device):
        """(JSON-able info, tensors). Every process must call it: each contributes its RNG states."""
        rng_tensors, rng_info = checkpoint.rng_state(device)
        rng_tensors["rng_batches"] = self.batches.get_state()
        everyone = ddp.gather((rng_tensors, rng_info))
        info = {"step": self.step, "best_val_loss": self.best_val_loss, "skipped_steps": self.skipped_steps,
                "window_steps": self.window_steps, "elapsed_s": self.elapsed(),
                "rng": [rank_info for _, rank_info in everyone]}
        if self.lora_base:
            info["lora_base"] = self.lora_base
        tensors = {f"rank{rank}.{name}": t for rank, (ts, _) in enumerate(everyone) for name, t in ts.items()}
        tensors["loss_sum"] = self.loss_sum
        return info, tensors

    @classmethod
    def from_checkpoint(cls, ckpt, cfg, ddp, device):
        """The state a checkpoint saved, with this process's random streams set back to where they were."""
        info = ckpt.info
        state = cls(step=info["step"], best_val_loss=info["best_val_loss"], skipped_steps=info["skipped_steps"],
                    window_steps=info["window_steps"], loss_sum=ckpt.extra["loss_sum"].to(device),
                    batches=torch.Generator(), elapsed_before=info.get("elapsed_s", 0.0),
                    lora_base=info.get("lora_base"))
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
    model, cfg = loading.pretrained(cfg, data.tokenizer)
    return model.to(device), cfg


def lora_model_for_resume(cfg, ckpt, data, device):
    """The model a resumed LoRA run continues: its base, rebuilt from the path its checkpoint names (refused in
    one line when missing or changed), with adapters of the checkpoint's shape. Their weights come in restore()."""
    recorded = ckpt.info["lora_base"]
    lora.check_base(recorded, ckpt.path)
    model, base_cfg = build_model(dataclasses.replace(cfg, init_from=lora.base_location(recorded)), data, device)
    saved = ckpt.info["config"]  # a differing rank or targets is refused in restore(), with the other shape keys
    lora.add_adapters(model, dataclasses.replace(cfg, lora_rank=saved["lora_rank"],
                                                 lora_targets=saved["lora_targets"]), data.tokenizer)
    return model, dataclasses.replace(base_cfg, init_from=cfg.init_from)


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
    if "lora_base" in ckpt.info:  # the adapters alone, cut to shards under FSDP
        own = dict(model.named_parameters())
        lora.load_adapter_state(model, {name: sharding.shard_like(t, own[name]) if name in own else t
                                        for name, t in ckpt.model_state.items()})
    else:
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
    if state.lora_base:  # the base is named in run_info: the file keeps only what trained
        model_state = lora.adapter_state(model, model_state)
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


def start_model(cfg, resume, ddp, device, dtype, data):
    """The model, its optimizer, the loss scaler and the run's state: new, or as the checkpoint left them."""
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    if resume:
        ckpt = checkpoint.load_for_resume(cfg.out_dir, device=device)
        if "lora_base" in ckpt.info:
            model, cfg = lora_model_for_resume(cfg, ckpt, data, device)
        else:
            model, cfg = model_for_resume(cfg, ckpt, device)
    else:
        model, cfg = build_model(cfg, data, device)
        if cfg.lora_rank:
            lora.add_adapters(model, cfg, data.tokenizer)
    if cfg.lora_rank and device.type == "cuda" and dtype == torch.bfloat16 and not sharding.sharded(cfg, ddp):
        lora.freeze_base(model, torch.bfloat16)  # FSDP's policy casts instead: it wants one dtype per unit
    torch.manual_seed(cfg.seed + ddp.rank)  # but each process its own dropout masks
    model.activation_checkpointing = cfg.activation_checkpointing
    if sharding.sharded(cfg, ddp):  # before the optimizer, which then holds the shards
        model = sharding.shard(model, device, dtype)
    optimizer = build_optimizer(model, cfg, device.type)
    # Loss scaling only for float16 on CUDA: bfloat16 and float32 have float32's exponent range.
    scaler = torch.amp.GradScaler("cuda", enabled=(dtype == torch.float16 and device.type == "cuda"))
    if resume:
        state = restore(ckpt, cfg, data, model, optimizer, scaler, ddp, device)
    else:
        state = RunState.start(cfg, device)
    return model, cfg, optimizer, scaler, state
