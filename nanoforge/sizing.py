"""
One dial for a model's size: `depth = N` sets the shape, the learning rates and the token budget, so a
learner who wants a bigger model changes one number. Every key set explicitly (in the config file or on the
command line) wins over its rule; train.py prints what the rules set, and config.json records it.

The rules, and where they come from:
- Shape: n_layer = depth, n_embd = aspect_ratio x depth, n_head = depth, so every head is aspect_ratio wide.
  With the default aspect ratio, 64 (GPT-2's head size), depth 12 is GPT-2 small exactly. nanochat sizes its
  models by depth the same way (model_dim = 64 x depth), with 128-wide heads.
- Learning rates: the AdamW rates (learning_rate, embedding_lr, unembedding_lr) are their values at GPT-2
  small's width (RATES_AT_768) scaled by sqrt(768 / n_embd): wider models take smaller Adam steps, the
  1/sqrt(width) rule nanochat applies to its AdamW groups. At depth 12 learning_rate is nanoGPT's GPT-2 6e-4.
  Wider, it stays above GPT-3's rates (Brown et al. 2020, table 2.1), which fall closer to 1/width: depth 24
  (GPT-3 Large's shape, 24 x 1536) gets 4.24e-4 where GPT-3 Large used 2.5e-4 (1.7x), and depth 28 3.93e-4
  where GPT-3 XL (24 x 2048) used 2e-4 (2.0x). The rule is kept as nanochat's, untried here at those sizes:
  for GPT-3's rates set learning_rate (and min_lr) explicitly, which wins over the rule.
  matrix_lr (Muon) does not scale: Muon's update already has the same size in every direction of a matrix,
  whatever its width. min_lr is a tenth of learning_rate, as in nanoGPT's GPT-2 config.
- Token budget: tokens_per_param x the parameter count, embeddings included (Chinchilla, Hoffmann et al.
  2022, counted them so; its compute-optimal ratio is about 20 tokens per parameter), divided by the tokens
  of one optimizer step (batch_size x block_size x gradient_accumulation_steps), rounded up, sets max_iters.
  The vocabulary comes from data_dir's meta.json (padded by vocab_multiple), or GPT-2's when the data is not
  prepared yet (said in the summary).
"""

import dataclasses
import math
import os

import torch

from model import GPT, padded_vocab_size
from nanoforge.data import read_meta

GPT2_SMALL_WIDTH = 768
# The AdamW peak rates at width 768: nanoGPT's GPT-2 rate, and our defaults for Muon's AdamW groups.
RATES_AT_768 = {"learning_rate": 6e-4, "embedding_lr": 0.01, "unembedding_lr": 0.004}
GPT2_VOCAB = 50257


def shape(depth, aspect_ratio):
    return {"n_layer": depth, "n_embd": aspect_ratio * depth, "n_head": depth}


def learning_rates(n_embd):
    scale = math.sqrt(GPT2_SMALL_WIDTH / n_embd)
    rates = {key: rate * scale for key, rate in RATES_AT_768.items()}
    rates["min_lr"] = rates["learning_rate"] / 10
    return {key: float(f"{rate:.3g}") for key, rate in rates.items()}  # readable in config.json


def parameter_count(model_config):
    """The model's parameters, embeddings included, counted without allocating them (on the meta device)."""
    with torch.device("meta"):
        return GPT(model_config).num_params(non_embedding=False)


def sizing_vocab(data_dir, vocab_multiple):
    """(padded vocabulary size, note): the prepared data's, or GPT-2's when data_dir has no meta.json yet."""
    if os.path.isfile(os.path.join(data_dir, "meta.json")):
        return padded_vocab_size(read_meta(data_dir)["vocab_size"], vocab_multiple), ""
    return padded_vocab_size(GPT2_VOCAB, vocab_multiple), f" ('{data_dir}' is not prepared: GPT-2's vocabulary assumed)"


def tokens_per_step(cfg):
    return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


def size_by_depth(cfg, explicit):
    """(cfg with the keys depth derives set, except those in `explicit`; a one-line summary of what was set)."""
    derived = shape(cfg.depth, cfg.aspect_ratio)
    derived = {key: value for key, value in derived.items() if key not in explicit}
    cfg = dataclasses.replace(cfg, **derived)
    rates = {key: value for key, value in learning_rates(cfg.n_embd).items() if key not in explicit}
    cfg = dataclasses.replace(cfg, **rates)
    derived.update(rates)
    vocab_size, vocab_note = sizing_vocab(cfg.data_dir, cfg.vocab_multiple)
    n_params = parameter_count(cfg.model_config(vocab_size))
    budget = cfg.tokens_per_param * n_params
    if "max_iters" not in explicit:
        cfg = dataclasses.replace(cfg, max_iters=max(1, math.ceil(budget / tokens_per_step(cfg))))
        derived["max_iters"] = cfg.max_iters
    settings = ", ".join(f"{key}={value}" for key, value in derived.items()) or "nothing"
    # A key the dial would set but the config or command line set itself: said, so that a depth that changes
    # nothing (a config that sets n_layer and n_embd, say) does not pass unnoticed.
    kept = [key for key in (*shape(1, 1), *learning_rates(1), "max_iters") if key in explicit]
    kept_note = f"; kept as set: {', '.join(f'{key}={getattr(cfg, key)}' for key in kept)}" if kept else ""
    summary = (f"depth {cfg.depth}: set {settings}{kept_note}; {millions(n_params)} parameters x "
               f"{cfg.tokens_per_param:g} tokens each = {millions(budget)} tokens, {tokens_per_step(cfg):,} per "
               f"step{vocab_note}")
    return cfg, summary


def millions(n):
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
