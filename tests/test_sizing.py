"""The depth dial: the shape, learning rates and token budget it derives, and that explicit keys win."""

import json
import math

import pytest
import torch

from conftest import run_cli
from model import GPT, padded_vocab_size
from nanoforge.config import ConfigError, build_config
from nanoforge.data import read_meta


def test_depth_12_is_gpt2_small_with_nanogpts_rates():
    cfg = build_config(None, ["--depth=12", "--data_dir=/nonexistent"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (12, 12, 768)
    assert (cfg.learning_rate, cfg.min_lr) == (6e-4, 6e-5)
    # wider models take smaller AdamW steps, by 1/sqrt(width); Muon's matrix rate does not change
    wide = build_config(None, ["--depth=24", "--data_dir=/nonexistent"])
    assert wide.learning_rate == pytest.approx(6e-4 * math.sqrt(768 / 1536), rel=1e-3)
    assert wide.matrix_lr == cfg.matrix_lr


def test_the_token_budget_sets_max_iters_from_the_real_parameter_count(data_dir, capsys):
    cfg = build_config(None, [f"--data_dir={data_dir}", "--depth=2", "--aspect_ratio=16", "--block_size=32",
                              "--batch_size=8", "--gradient_accumulation_steps=2", "--tokens_per_param=10"])
    vocab = padded_vocab_size(read_meta(str(data_dir))["vocab_size"], cfg.vocab_multiple)
    n_params = sum(p.numel() for p in GPT(cfg.model_config(vocab)).parameters())  # a real model, allocated
    assert cfg.max_iters == math.ceil(10 * n_params / (8 * 32 * 2))
    summary = capsys.readouterr().err
    assert f"max_iters={cfg.max_iters}" in summary and "n_embd=32" in summary


def test_keys_set_explicitly_win_over_the_rules(data_dir, capsys):
    cfg = build_config(None, [f"--data_dir={data_dir}", "--depth=4", "--n_head=2", "--learning_rate=0.003",
                              "--max_iters=7"])
    # the summary says which keys the dial left alone, so a depth that changes little is not missed
    assert "kept as set: n_head=2, learning_rate=0.003, max_iters=7" in capsys.readouterr().err
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (4, 256, 2)
    assert (cfg.learning_rate, cfg.max_iters) == (0.003, 7)
    assert cfg.min_lr == pytest.approx(6e-4 * math.sqrt(768 / 256) / 10, rel=1e-2)  # still the rule's


def test_depth_refuses_pretrained_weights():
    with pytest.raises(ConfigError, match="depth sizes a new model, but init_from 'gpt2'"):
        build_config(None, ["--depth=12", "--init_from=gpt2"])


def test_a_depth_run_trains_records_what_the_dial_set_and_resumes(tmp_path, data_dir):
    out = tmp_path / "run"
    args = [f"--data_dir={data_dir}", f"--out_dir={out}", "--depth=1", "--aspect_ratio=16", "--block_size=16",
            "--batch_size=4", "--tokens_per_param=2", "--warmup_iters=2", "--eval_interval=50", "--eval_iters=2",
            "--device=cpu"]
    result = run_cli("train.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "depth 1: set n_layer=1, n_embd=16, n_head=1" in result.stderr
    saved = json.load(open(out / "config.json"))
    assert (saved["n_layer"], saved["n_embd"], saved["n_head"]) == (1, 16, 1)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert log[-1]["step"] == saved["max_iters"] > 1
    # the saved config holds the derived values: resuming with more steps keeps the model's shape
    more = run_cli("train.py", "--resume", f"--out_dir={out}", f"--max_iters={saved['max_iters'] + 5}")
    assert more.returncode == 0, more.stderr[-2000:]
    assert json.loads(open(out / "log.jsonl").readlines()[-1])["step"] == saved["max_iters"] + 5


def test_the_learning_rate_note_quotes_the_rule_and_gpt3_truly():
    """The note sets the rule's rates beside GPT-3's (Brown et al. 2020, table 2.1: Large, 24 x 1536, 2.5e-4;
    XL, 24 x 2048, 2e-4) with their ratios, as the rule computes them (it once said 4.2e-4 was 'near' 2.5e-4)."""
    from nanoforge import sizing
    from nanoforge.sizing import learning_rates

    depth24, depth28 = learning_rates(24 * 64)["learning_rate"], learning_rates(28 * 64)["learning_rate"]
    assert (depth24, depth28) == (4.24e-4, 3.93e-4)
    note = " ".join(sizing.__doc__.split()).replace("e-04", "e-4")
    depth24_text, depth28_text = f"{depth24:.2e}".replace("e-04", "e-4"), f"{depth28:.2e}".replace("e-04", "e-4")
    assert f"depth 24 (GPT-3 Large's shape, 24 x 1536) gets {depth24_text} where GPT-3 Large used 2.5e-4 " \
           f"({depth24 / 2.5e-4:.1f}x)" in note
    assert f"depth 28 {depth28_text} where GPT-3 XL (24 x 2048) used 2e-4 ({depth28 / 2e-4:.1f}x)" in note
    assert "near" not in note.split("Learning rates")[1].split("Token budget")[0]
