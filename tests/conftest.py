import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small corpus with real structure: a char model learns it in a few hundred steps.
TINY_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n"
    "All:\nResolved. resolved.\n\n"
) * 40


def run_cli(script, *args, cwd=REPO, env=None):
    """Run one of the project's scripts as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path, corpus):
    """A char-level prepared data directory of the tiny corpus."""
    from prepare import prepare

    out = tmp_path / "data"
    prepare(str(corpus), "char", str(out), 0.1)
    return out


def tiny_config(data_dir, out_dir, **overrides):
    """A TrainConfig for a model small enough to train in seconds on a CPU."""
    from config import TrainConfig

    values = dict(
        data_dir=str(data_dir), out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32, block_size=16,
        batch_size=4, max_iters=20, eval_interval=10, eval_iters=2, log_interval=5, warmup_iters=2,
        lr_decay_iters=20, device="cpu", dtype="float32",
    )
    values.update(overrides)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
