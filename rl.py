"""
Teach a chat model by reward: reinforcement learning from verifiable rewards on a task with a verifier.

    python rl.py configs/rl_quickstart.toml [--key=value ...] [--resume]
    python rl.py --help          # every config key with its type, default and meaning
    torchrun --standalone --nproc_per_node=2 rl.py configs/rl_quickstart.toml   # the rollouts split over processes

The story: read the config -> load the chat checkpoint (init_from) and the task -> each step: draw problems, sample
G completions of each with the engine (KV cache, one batch, a seed per row; the model may call the calculator),
score each with the task's verifier, advantage = reward - the group's mean, and take a policy-gradient step on the
sampled tokens (prompts and tool outputs masked, normalised per token; PPO's clipped ratio when several updates
share a batch; a KL term to the starting model with kl_beta) -> log the rewards, the held-out pass@1 and pass@k
every eval_interval -> checkpoint. The learning-rate schedule, clipping, NaN guard, checkpoints, resume and run
lock are train.py's (nanoforge/training.py, nanoforge/runs.py). docs/rl.md has the equations and a worked run.
"""

import dataclasses
import json
import os
import signal
import sys
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from nanoforge import checkpoint, cli, reinforce, tasks, training
from nanoforge.chat_format import render_for_reply, require_chat_tokens
from nanoforge.config import ConfigError, load_saved, split_arguments
from nanoforge.device import resolve_device, resolve_dtype
from nanoforge.distributed import Distributed, end_process
from nanoforge.engine import Generator
from nanoforge.lock import DirectoryLock
from nanoforge.optim import set_lr
from nanoforge.reinforce import (RLConfig, build_rl_config, draw_problems, rl_help_text, row_seeds, sample_rollouts,
                                 score_problems, update_policy)
from nanoforge.runs import build_model, check_writable, save_checkpoint, start_model, start_run_directory
from nanoforge.tracking import Trackers, check_installed
from nanoforge.tokenizer import has_tools
from nanoforge.training import StopSignals, TrainingStopped, check_bad_streak, write_record


class Policy:
    """What start_model needs of a dataset, for a run whose data is the checkpoint's tokenizer and the task."""

    def __init__(self, tokenizer, ckpt):
        self.tokenizer, self.vocab_size, self.notes, self.data_dir = tokenizer, tokenizer.vocab_size, [], ckpt


def rl(cfg, resume=False, ddp=None):
    ddp = ddp or Distributed()
    device = ddp.start(resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device.type)
    if cfg.prompts_per_step % ddp.world_size:
        raise ConfigError(f"prompts_per_step ({cfg.prompts_per_step}) must be a multiple of the number of processes "
                          f"({ddp.world_size}): each process samples an equal share")
    if not checkpoint.is_checkpoint(cfg.init_from):
        raise ConfigError(f"init_from '{cfg.init_from}' is not a checkpoint: pass the chat model to start from (a run "
                          "directory or .safetensors file of train.py's SFT)")
    ckpt_tokenizer = checkpoint.load_tokenizer(cfg.init_from)
    # The policy keeps the checkpoint's context: block_size is not rl.py's to set.
    saved = checkpoint.load(checkpoint.checkpoint_path(cfg.init_from)).info["model"]
    cfg = dataclasses.replace(cfg, block_size=saved["block_size"])
    require_chat_tokens(ckpt_tokenizer)
    if cfg.tools and not has_tools(ckpt_tokenizer):
        raise ConfigError(f"'{cfg.init_from}' has no tool tokens: set tools = false, or fine-tune with tool calls "
                          "(`prepare.py arithmetic`)")
    task = tasks.get_task(cfg.task, cfg.task_data or None)
    check_writable(cfg.out_dir)
    check_installed(cfg)
    lock = DirectoryLock(cfg.out_dir, "rl.py", "wait for that run to finish or stop it, or choose another "
                         "--out_dir=PATH") if ddp.is_master else nullcontext()
    with lock:
        return run_rl(cfg, resume, ddp, device, dtype, task, Policy(ckpt_tokenizer, cfg.init_from))


def run_rl(cfg, resume, ddp, device, dtype, task, policy):
    say = tqdm.write if ddp.is_master else (lambda *args, **kwargs: None)
    start_run_directory(cfg, resume, ddp)
    model, cfg, optimizer, scaler, state = start_model(cfg, resume, ddp, device, dtype, policy)
    # The starting model, frozen: the KL's other side, logged at every step and in the loss with kl_beta > 0.
    reference, _ = build_model(cfg, policy, device)
    reference.requires_grad_(False).eval()
    if ddp.is_master:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    # the problems the steps draw from (with replacement): all a run can use, or 2,000 (or all a file task has)
    pool = task.problems("train", min(2_000, cfg.prompts_per_step * cfg.max_iters), cfg.seed)
    held_out = task.problems("test", cfg.eval_problems, tasks.TEST_SEED)
    check_fits(pool + held_out, policy.tokenizer, cfg)
    log = open(os.path.join(cfg.out_dir, "log.jsonl") if ddp.is_master else os.devnull, "a")
    bar = tqdm(total=cfg.max_iters, initial=state.step, desc="rl", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30, disable=not ddp.is_master)
    trackers = Trackers(cfg, enabled=ddp.is_master)
    bad_streak = 0

    def evaluate():
        generator = Generator(model, policy.tokenizer)
        model.train()
        scores = score_problems(generator, task, held_out, cfg.pass_k, cfg.temperature, cfg.tools,
                                cfg.max_new_tokens, seed=cfg.seed)
        say(f"step {state.step}: held-out pass@1 {scores['pass@1']:.1%}"
            + (f", pass@{cfg.pass_k} {scores[f'pass@{cfg.pass_k}']:.1%}" if cfg.pass_k > 1 else ""))
        return {k: round(v, 4) for k, v in scores.items() if k.startswith("pass@")}

    with StopSignals() as stop, log, bar, trackers:
        if state.step == 0:  # where the run starts from, in the log: the SFT checkpoint's scores
            record = {"step": 0, **evaluate(), "elapsed_s": round(state.elapsed(), 3)}
            log.write(json.dumps(record) + "\n")
            trackers.log(record)
        while state.step < cfg.max_iters:
            started = time.perf_counter()
            lr = training.get_lr(state.step, cfg)
            set_lr(optimizer, lr, cfg)
            indices, problems = draw_problems(pool, state, cfg, ddp)
            rollouts = sample_rollouts(Generator(model, policy.tokenizer), task, problems, cfg,
                                       row_seeds(cfg, state.step, indices))
            model.train()
            stats, bad = update_policy(model, reference, optimizer, scaler, rollouts, cfg, ddp, state)
            bad_streak = 0 if not bad else bad_streak + bad
            state.step += 1
            bar.update(1)
            check_bad_streak(bad_streak, state.step, cfg, say)
            is_eval = state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters
            if state.step % cfg.log_interval == 0 or is_eval:
                record = step_record(state, lr, rollouts, stats, ddp, time.perf_counter() - started)
                if is_eval:
                    record.update(evaluate())
                record["elapsed_s"] = round(state.elapsed(), 3)
                write_record(log, bar, trackers, record)
                state.loss_sum.zero_()
                state.window_steps = 0
            stopping = ddp.any(stop.received is not None)
            if state.step % cfg.checkpoint_interval == 0 or state.step == cfg.max_iters or stopping:
                save_checkpoint(None, cfg, model, optimizer, scaler, policy.tokenizer, state, ddp, device)
            if stopping and state.step < cfg.max_iters:
                signum = stop.received or signal.SIGTERM
                raise TrainingStopped(
                    f"stopped by {signal.Signals(signum).name} at step {state.step}; checkpoint written to "
                    f"{checkpoint.run_files(cfg.out_dir)['latest']}: continue with the same command plus --resume",
                    128 + signum)


def check_fits(problems, tokenizer, cfg):
    """A rollout (prompt and reply) must fit the model's context: the policy gradient reads it in one window."""
    longest = max(len(render_for_reply(tokenizer, reinforce.conversation(p))) for p in problems)
    if longest + cfg.max_new_tokens - 1 > cfg.block_size:
        raise ConfigError(f"the longest prompt of task {cfg.task} is {longest} tokens: with max_new_tokens "
                          f"{cfg.max_new_tokens} it does not fit the model's block_size {cfg.block_size}: use "
                          f"max_new_tokens <= {cfg.block_size - longest + 1}")


def step_record(state, lr, rollouts, stats, ddp, seconds):
    """The log record of a step: its mean loss (over the window), the rollouts' rewards and lengths, the policy's
    entropy and KL to the start (over every process's rollouts)."""
    lengths = torch.tensor([float(sum(not f for f in (s.forced or [False] * len(s.ids)))) for s in rollouts.samples])
    calls = torch.tensor([float(len(s.calls)) for s in rollouts.samples])
    means = ddp.mean(torch.stack([rollouts.rewards.mean(), lengths.mean(), calls.mean()]))
    tokens = ddp.mean(torch.tensor(float(sum(len(s.ids) for s in rollouts.samples)))) * ddp.world_size
    loss = state.loss_sum.item() / state.window_steps if state.window_steps else None
    return {"step": state.step, "loss": round(loss, 6) if loss is not None else None, "lr": lr,
            "reward_mean": round(means[0].item(), 4), "completion_len": round(means[1].item(), 2),
            "tool_calls": round(means[2].item(), 3), "entropy": round(stats["entropy"], 4),
            "kl": None if stats["kl"] is None else round(stats["kl"], 6), "skipped_steps": state.skipped_steps,
            "tokens_per_sec": round(tokens.item() / seconds, 1), "mfu": None}


@cli.command(interrupted="interrupted; the last checkpoint written is intact: continue with --resume")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        print(rl_help_text())
        return
    path, args, flags = split_arguments(argv, ("--resume",))
    resume = "--resume" in flags
    ddp = Distributed()
    try:
        base = load_saved(args, RLConfig.out_dir) if resume and path is None else None
        cfg = build_rl_config(path, args, base)
        rl(cfg, resume=resume, ddp=ddp)
    except TrainingStopped as e:
        print(f"rl.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    finally:
        ddp.close()
    if ddp.is_master:
        print(f"done: score it with `python eval.py --ckpt {cfg.out_dir} --task {cfg.task}`")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as e:
        end_process(e.code)
    end_process(0)
