"""The configs in configs/: every one builds and plans; the depth-dial configs are the sizes their names say, and
the 124M and 350M ones train a step on CPU (on the tiny char data, shrunk to a few tokens)."""

import glob
import os

import pytest
import torch
from conftest import REPO

from model import GPT, padded_vocab_size
from nanoforge import planning
from nanoforge.config import build_config
from nanoforge.data import Dataset
from nanoforge.optim import build_optimizer

# train.py's configs: rl.py's (rl_*.toml) start from a chat checkpoint and are not planned
CONFIGS = sorted(p for p in glob.glob(os.path.join(REPO, "configs", "*.toml"))
                 if not os.path.basename(p).startswith("rl_"))
# name: (depth, parameters with GPT-2's padded vocabulary, in millions)
SIZED = {"depth12_124m": (12, 124), "depth18_350m": (18, 346), "depth24_760m": (24, 759),
         "depth28_1b_fsdp": (28, 1172)}
ON_CPU = ["--block_size=16", "--batch_size=2", "--gradient_accumulation_steps=1", "--device=cpu",
          "--dtype=float32", "--compile=false", "--max_iters=1"]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_builds_and_plans(path):
    text = planning.describe(build_config(path, []))
    assert "parameters" in text and "total, checkpointed" in text and "H100" in text


@pytest.mark.parametrize("name", SIZED)
def test_the_sized_configs_are_their_size_through_the_dial(name):
    depth, millions = SIZED[name]
    cfg = build_config(os.path.join(REPO, "configs", f"{name}.toml"), ["--data_dir=/nonexistent"])
    assert (cfg.depth, cfg.n_layer, cfg.n_embd, cfg.n_head) == (depth, depth, 64 * depth, depth)
    model, _ = planning.meta_model(cfg)
    assert round(model.num_params(non_embedding=False) / 1e6) == millions
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    assert tokens_per_step == (2**20 if depth == 28 else 2**19)  # 1M for 1B, 0.5M below (GPT-3's table 2.1)
    assert cfg.gradient_accumulation_steps % 8 == 0  # an equal share on 8 GPUs


@pytest.mark.parametrize("name", ["depth12_124m", "depth18_350m"])
def test_the_124m_and_350m_configs_train_a_step(name, data_dir):
    """In process, without the checkpoints (1 to 3.5 GB to write, most of a CLI run's 30 s and more): the
    config's model and optimizer take one step. tests/test_sizing.py runs a depth config through train.py."""
    cfg = build_config(os.path.join(REPO, "configs", f"{name}.toml"), [f"--data_dir={data_dir}", *ON_CPU])
    depth = SIZED[name][0]
    data = Dataset(cfg.data_dir, cfg.block_size)
    torch.manual_seed(0)
    model = GPT(cfg.model_config(padded_vocab_size(data.vocab_size, cfg.vocab_multiple)))
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (depth, 64 * depth, depth)
    optimizer = build_optimizer(model, cfg, "cpu")
    x, y = data.get_batch("train", cfg.batch_size, torch.Generator().manual_seed(0))
    _, loss = model(x, y)
    loss.backward()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.transformer.h[0].attn.c_attn.weight)
