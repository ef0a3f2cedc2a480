"""
Reinforcement learning from verifiable rewards (rl.py): its config, rollouts sampled with the engine, the group
baseline, the policy-gradient loss with its KL term and PPO clipping, and pass@k on held-out problems.

The loss of one batch of rollouts (docs/rl.md has it in equations). Rollout i answers prompt p(i), one of G
samples of it; r_i is its reward, and over its tokens t:

    advantage_i = r_i - mean_{j: p(j) = p(i)} r_j          (/ (std of the group + 1e-6) with scale_advantages)
    ratio_it    = exp(logp_it - old_logp_it)                (1 on the first update: old_logp is logp, detached)
    pg_it       = -min(ratio_it * advantage_i, clip(ratio_it, 1 - clip_eps, 1 + clip_eps) * advantage_i)
    kl_it       = sum_v pi(v | ...) (log pi(v | ...) - log ref(v | ...))   (exact, over the vocabulary)
    loss        = sum_{i,t} mask_it (pg_it + kl_beta * kl_it) / sum_{i,t} mask_it

mask_it is 1 on the tokens the policy sampled (the reply and its end token), 0 on the prompt, on the tool outputs
the engine fed (Sample.forced) and on padding; the sum over every token of every rollout in every process, divided
by their count, is the per-token normalisation (a long reply does not weigh more per token than a short one).
"""

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from nanoforge import tasks, tools
from nanoforge.config import (TYPES, ConfigError, TrainConfig, _key, coerce, load_toml, parse_override,
                              parse_overrides)
from nanoforge.training import apply_update

# Keys of TrainConfig that rl.py uses as train.py does; the others (data, batch shape, model shape: the
# checkpoint fixes it) have no meaning here and are refused.
SHARED_KEYS = ("out_dir", "init_from", "max_iters", "optimizer", "learning_rate", "matrix_lr", "embedding_lr",
               "unembedding_lr", "muon_momentum", "lr_schedule", "warmup_iters", "lr_decay_iters", "decay_fraction",
               "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "eval_interval", "log_interval",
               "checkpoint_interval", "keep_last_n", "max_bad_steps", "wandb_log", "wandb_project", "wandb_run_name",
               "tensorboard_log", "device", "dtype", "compile", "seed")


@dataclass
class RLConfig(TrainConfig):
    out_dir: str = _key("out/rl", "run directory: resolved config, log.jsonl and checkpoints go here")
    init_from: str = _key("out/sft_arithmetic", "the chat checkpoint (run directory or file) to start from")
    max_iters: int = _key(200, "steps: each samples a batch of rollouts and updates the policy on it")
    learning_rate: float = _key(1e-4, "peak learning rate")
    min_lr: float = _key(1e-5, "learning rate at the end of the decay")
    warmup_iters: int = _key(10, "steps of linear learning-rate warmup from 0")
    weight_decay: float = _key(0.0, "weight decay (0: RL moves the weights little, and decay would pull them off)")
    eval_interval: int = _key(25, "score the held-out problems (pass@1, pass@k) every this many steps, at the start "
                              "and at the end")
    log_interval: int = _key(1, "write a log.jsonl record every this many steps")
    checkpoint_interval: int = _key(50, "write latest.safetensors every this many steps (and at the end)")
    task: str = _key("addition", f"the task with its verifier: one of {', '.join(tasks.TASKS)} (nanoforge/tasks.py)")
    task_data: str = _key("", "gsm8k: a local GSM8K-format JSONL file, a tenth of it held out ('' downloads GSM8K's "
                          "train and test files into data/gsm8k)")
    prompts_per_step: int = _key(8, "problems per step (split over the processes under torchrun)")
    samples_per_prompt: int = _key(8, "G: completions sampled per problem; their mean reward is each one's baseline")
    max_new_tokens: int = _key(32, "most tokens per completion (tool outputs included)")
    temperature: float = _key(1.0, "sampling temperature of the rollouts and of pass@k")
    top_k: int = _key(0, "sample among the k most likely tokens (0: all; the policy gradient assumes all)")
    tools: bool = _key(True, "the model may call the calculator (its outputs are fed, and masked from the loss)")
    scale_advantages: bool = _key(False, "divide each group's advantages by its reward's std (GRPO's; off, as in "
                                  "nanochat and Dr. GRPO)")
    kl_beta: float = _key(0.0, "weight of the KL divergence to the starting model in the loss (it is logged either way)")
    updates_per_batch: int = _key(1, "policy updates per batch of rollouts; above 1 the PPO-clipped ratio applies")
    clip_eps: float = _key(0.2, "PPO's clip range for the probability ratio (updates_per_batch > 1)")
    eval_problems: int = _key(100, "held-out problems scored at each evaluation")
    pass_k: int = _key(4, "k of pass@k: samples per held-out problem at `temperature` (pass@1 is greedy)")

    def to_dict(self):
        return {name: getattr(self, name) for name in RL_KEYS}

    def validate(self):
        super().validate()
        for name in ("prompts_per_step", "max_new_tokens", "updates_per_batch", "eval_problems", "pass_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be at least 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 2:
            raise ConfigError(f"samples_per_prompt must be at least 2, got {self.samples_per_prompt}: each sample's "
                              "baseline is the mean reward of its group, and a group of one has nothing to compare")
        for name, low in (("temperature", 0.0), ("clip_eps", 0.0)):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > low):
                raise ConfigError(f"config key '{name}' must be a finite number > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.kl_beta) and self.kl_beta >= 0):
            raise ConfigError(f"config key 'kl_beta' must be a finite number >= 0, got {self.kl_beta}")
        if self.top_k < 0:
            raise ConfigError(f"config key 'top_k' must be 0 or more, got {self.top_k}")
        if self.task not in tasks.TASKS:
            raise ConfigError(f"unknown task '{self.task}': choose one of {', '.join(tasks.TASKS)}")


TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
RL_ONLY = tuple(f.name for f in dataclasses.fields(RLConfig) if f.name not in TRAIN_FIELDS)
RL_KEYS = SHARED_KEYS + RL_ONLY
FIELDS = {f.name: f for f in dataclasses.fields(RLConfig)}


def unknown_key(name, where):
    if name in FIELDS:
        return ConfigError(f"config key '{name}' {where} is train.py's, not rl.py's (the checkpoint fixes the model; "
                           "the task gives the data): remove it")
    close = difflib.get_close_matches(name, RL_KEYS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "run `python rl.py --help` for the list of keys"
    return ConfigError(f"unknown config key '{name}' {where}: {hint}")


def build_rl_config(path=None, overrides=(), base=None):
    """RLConfig from a TOML file (or a saved config dict, base) plus `--key=value` strings, validated."""
    values = {}
    source = load_toml(path) if path is not None else (base or {})
    for name, value in source.items():
        if name not in RL_KEYS:
            raise unknown_key(name, f"in {path or 'the saved config'}")
        values[name] = coerce(name, value, FIELDS)
    for name, text in parse_overrides(overrides, RL_KEYS, unknown_key).items():
        values[name] = parse_override(name, text, FIELDS)
    cfg = RLConfig(**values, dropout=0.0)
    cfg.validate()
    return cfg


def rl_help_text():
    lines = ["Config keys (set in a .toml file or as --key=value):", ""]
    for name in RL_KEYS:
        f = FIELDS[name]
        default = json.dumps(f.default)
        lines.append(f"  --{name:<22} {TYPES[f.type]:<5} default {default:<22} {f.metadata['help']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Rollouts: the engine samples G completions per problem, the task's verifier scores each


@dataclass
class Rollouts:
    """A batch of completions, grouped by problem: rows g*G .. g*G + G - 1 answer problem g."""

    prompts: list  # token ids of each row's prompt
    samples: list  # engine.Sample of each row
    rewards: torch.Tensor  # (R,)
    completions: list  # the final text of each row (tools.final_text)


def conversation(problem):
    return [{"role": "user", "content": problem.prompt}]


def sample_rollouts(generator, task, problems, cfg, seeds):
    """cfg.samples_per_prompt completions of each problem, scored. seeds: one per row (the same row draws the same
    numbers whatever process samples it)."""
    G = cfg.samples_per_prompt
    conversations = [conversation(p) for p in problems for _ in range(G)]
    samples = generator.replies(conversations, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                top_k=cfg.top_k or None, seed=seeds, tools=cfg.tools)
    completions = [tools.final_text(tools.reply_parts(generator.tokenizer, s.ids)) for s in samples]
    rewards = torch.tensor([tasks.checked_reward(task, problems[i // G], c) for i, c in enumerate(completions)])
    return Rollouts([s.prompt_ids for s in samples], samples, rewards, completions)


def group_advantages(rewards, group_size, scale=False):
    """rewards (R,) in groups of group_size consecutive rows -> advantages (R,): reward minus the group's mean
    (divided by the group's std + 1e-6 when scale). A group whose rewards are all equal has advantage 0."""
    grouped = rewards.view(-1, group_size)  # (problems, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-6)
    return advantages.flatten()


def rollout_batch(rollouts, device):
    """(x, y, mask): inputs (R, T) and targets (R, T), padded on the right; mask (R, T) is 1 where the target is a
    token the policy sampled (not the prompt, not a fed tool output, not padding)."""
    rows = [prompt + sample.ids for prompt, sample in zip(rollouts.prompts, rollouts.samples)]
    T = max(len(r) for r in rows) - 1
    x = torch.zeros(len(rows), T, dtype=torch.long)
    y = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T)
    for b, (prompt, sample) in enumerate(zip(rollouts.prompts, rollouts.samples)):
        row = rows[b]
        x[b, : len(row) - 1] = torch.tensor(row[:-1])
        y[b, : len(row) - 1] = torch.tensor(row[1:])
        sampled = [0.0 if forced else 1.0 for forced in (sample.forced or [False] * len(sample.ids))]
        mask[b, len(prompt) - 1 : len(row) - 1] = torch.tensor(sampled)  # target j is row token j + 1
    return x.to(device), y.to(device), mask.to(device)


def target_logprobs(logits, y):
    """log pi(y_t | ...) of each target: logits (R, T, V), y (R, T) -> (R, T), in float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, y.unsqueeze(2)).squeeze(2)


def policy_loss(logp, old_logp, advantages, mask, clip_eps, n_tokens):
    """The clipped policy-gradient loss summed over the masked tokens and divided by n_tokens (the count over
    every process). logp, old_logp, mask: (R, T); advantages (R,). With logp == old_logp (one update per batch)
    its gradient is REINFORCE's: -sum mask * advantage * grad logp / n_tokens."""
    ratio = torch.exp(logp - old_logp)  # (R, T)
    a = advantages.unsqueeze(1)
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    return (pg * mask).sum() / n_tokens


def kl_to_reference(logits, ref_logits, mask, n_tokens):
    """The exact KL(pi || ref) over the vocabulary at each masked position, summed and divided by n_tokens."""
    logp, ref_logp = F.log_softmax(logits.float(), dim=-1), F.log_softmax(ref_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - ref_logp)).sum(dim=-1)  # (R, T)
    return (kl * mask).sum() / n_tokens


def entropy(logits, mask, n_tokens):
    logp = F.log_softmax(logits.float(), dim=-1)
    return (-(logp.exp() * logp).sum(dim=-1) * mask).sum() / n_tokens


# ---------------------------------------------------------------------------------------------
# One step of the loop: which problems, which seeds, the update

def draw_problems(pool, state, cfg, ddp):
    """This step's problems (the same draw in every process, from the run's batch stream) and this process's share:
    (global index of each of its problems, the problems)."""
    picks = torch.randint(len(pool), (cfg.prompts_per_step,), generator=state.batches).tolist()
    mine = list(range(ddp.rank, cfg.prompts_per_step, ddp.world_size))
    return mine, [pool[picks[i]] for i in mine]


def row_seeds(cfg, step, indices):
    """One seed per rollout row, fixed by (seed, step, the problem's index in the step, sample): a row draws the same
    numbers whichever process samples it."""
    G = cfg.samples_per_prompt
    return [cfg.seed + 1_000_003 * (step + 1) + i * G + g for i in indices for g in range(G)]


def update_policy(model, reference, optimizer, scaler, rollouts, cfg, ddp, state):
    """updates_per_batch policy-gradient updates on this process's share of a batch of rollouts (each clipped and
    NaN-guarded by training.apply_update). reference: the starting model, for the KL (None: no KL; then kl_beta
    must be 0). Returns ({"entropy", "kl"} of the policy that sampled them, averaged over the processes; kl None
    without a reference), the number of updates the NaN guard skipped in a row)."""
    x, y, mask = rollout_batch(rollouts, next(model.parameters()).device)
    advantages = group_advantages(rollouts.rewards, cfg.samples_per_prompt, cfg.scale_advantages).to(x.device)
    n_tokens = ddp.mean(mask.sum().clone()) * ddp.world_size  # every process's sampled tokens
    n_tokens = n_tokens.clamp(min=1)
    ref_logits = None
    if reference is not None:
        with torch.no_grad():
            ref_logits, _ = reference(x)
    old_logp, stats, bad = None, {}, 0
    for _ in range(cfg.updates_per_batch):
        logits, _ = model(x)  # (R, T, V)
        logp = target_logprobs(logits, y)
        old_logp = logp.detach() if old_logp is None else old_logp  # the rollouts' policy, fixed for the batch
        loss = policy_loss(logp, old_logp, advantages, mask, cfg.clip_eps, n_tokens)
        kl = kl_to_reference(logits, ref_logits, mask, n_tokens) if reference is not None else None
        if cfg.kl_beta > 0:
            loss = loss + cfg.kl_beta * kl
        if not stats:  # of the policy that sampled the rollouts
            with torch.no_grad():
                stats["entropy"] = entropy(logits, mask, n_tokens)
                stats["kl"] = kl.detach() if reference is not None else None
        # each process's loss is its share of the sum over all tokens: summed gradients are the whole batch's
        scaler.scale(loss * ddp.world_size).backward()
        for p in model.parameters():
            if p.grad is not None:
                ddp.mean(p.grad)
        step_loss = ddp.mean(loss.detach() * ddp.world_size)
        scaler.unscale_(optimizer)
        bad = 0 if apply_update(model, optimizer, scaler, step_loss, cfg, state) else bad + 1
    return {name: None if value is None else ddp.mean(value).item() for name, value in stats.items()}, bad


# ---------------------------------------------------------------------------------------------
# Scoring held-out problems: pass@1 (greedy) and pass@k (k samples)


def pass_at_k(n, c, k):
    """The chance that at least one of k samples is right, given c right among n samples (Chen et al. 2021's
    unbiased estimator: 1 - C(n - c, k) / C(n, k))."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score_problems(generator, task, problems, k, temperature, use_tools, max_new_tokens, seed=0, batch_size=256):
    """{"pass@1": share right when answering greedily, "pass@k": share with at least one right among k samples at
    temperature, "n", "examples"}: the held-out figures of rl.py's log and eval.py."""
    greedy = answer(generator, problems, 1, 0.0, use_tools, max_new_tokens, seed, batch_size)
    greedy_right = [tasks.checked_reward(task, p, c) > 0 for p, (c,) in zip(problems, greedy)]
    result = {"pass@1": sum(greedy_right) / len(problems), "n": len(problems),
              "examples": [(p.prompt, c, p.answer) for p, (c,) in zip(problems, greedy)]}
    if k > 1:
        sampled = answer(generator, problems, k, temperature, use_tools, max_new_tokens, seed, batch_size)
        right = [sum(tasks.checked_reward(task, p, c) > 0 for c in cs) for p, cs in zip(problems, sampled)]
        result[f"pass@{k}"] = sum(pass_at_k(k, c, k) for c in right) / len(problems)
    return result


def answer(generator, problems, k, temperature, use_tools, max_new_tokens, seed, batch_size):
    """k final texts per problem, generated in batches; sample j of problem i draws from seed + i * k + j."""
    rows = [(i, j) for i in range(len(problems)) for j in range(k)]
    texts = [[] for _ in problems]
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        samples = generator.replies([conversation(problems[i]) for i, _ in part], max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=[seed + i * k + j for i, j in part], tools=use_tools)
        for (i, _), s in zip(part, samples):
            texts[i].append(tools.final_text(tools.reply_parts(generator.tokenizer, s.ids)))
    return texts
