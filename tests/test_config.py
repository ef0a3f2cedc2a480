import dataclasses

import pytest

from nanoforge.config import KEYS, MODEL_KEY_HELP, ConfigError, TrainConfig, build_config, key_help
from model import GPTConfig
from conftest import run_cli


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_file_values_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, 'n_layer = 3\nlearning_rate = 1\nout_dir = "x"\ncompile = true\n')
    cfg = build_config(path, ["--n_layer=5", "--dropout=0.1", "--compile=false", "--min_lr=6e-5"])
    assert (cfg.n_layer, cfg.dropout, cfg.compile, cfg.min_lr, cfg.out_dir) == (5, 0.1, False, 6e-5, "x")
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)


def test_unknown_key_in_file_names_the_closest_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'n_layers'.*did you mean 'n_layer'"):
        build_config(write(tmp_path, "n_layers = 3\n"))


def test_unknown_override_names_the_closest_key():
    with pytest.raises(ConfigError, match="'learning_rat' on the command line: did you mean 'learning_rate'"):
        build_config(None, ["--learning_rat=0.1"])


@pytest.mark.parametrize("text, message", [
    ('n_layer = "four"\n', "'n_layer' expects int, got 'four' \\(str\\)"),
    ("n_layer = 2.5\n", "'n_layer' expects int, got 2.5"),
    ("bias = 1\n", "'bias' expects bool, got 1"),
    ("n_layer = true\n", "'n_layer' expects int, got True"),
])
def test_wrong_type_in_file_names_key_type_and_value(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        build_config(write(tmp_path, text))


def test_wrong_type_override_names_key_type_and_value():
    with pytest.raises(ConfigError, match="'batch_size' expects int, got 'big'"):
        build_config(None, ["--batch_size=big"])
    with pytest.raises(ConfigError, match="'compile' expects bool, got 'maybe'"):
        build_config(None, ["--compile=maybe"])


def test_invalid_values_are_refused():
    with pytest.raises(ConfigError, match="divisible by n_head"):
        build_config(None, ["--n_embd=100", "--n_head=3"])
    with pytest.raises(ConfigError, match="config key 'dtype' must be one of"):
        build_config(None, ["--dtype=fp8"])
    cases = [
        (["--mlp=gelu2"], "config key 'mlp' must be one of gelu, relu2, swiglu; got 'gelu2'"),
        (["--n_head=4", "--n_kv_head=3"], "n_kv_head (3) must divide n_head (4)"),
        (["--pos_emb=rope", "--n_embd=30", "--n_head=2"], "the head size n_embd / n_head (15) must be even"),
        (["--matrix_lr=0"], "config key 'matrix_lr' must be a finite number > 0, got 0.0"),
        (["--decay_fraction=1.5"], "config key 'decay_fraction' must be in [0, 1], got 1.5"),
        (["--muon_momentum=1"], "config key 'muon_momentum' must be in [0, 1), got 1.0"),
        (["--learning_rate=nan"], "config key 'learning_rate' must be a finite number > 0, got nan"),
        (["--learning_rate=inf"], "config key 'learning_rate' must be a finite number > 0, got inf"),
        (["--weight_decay=-inf"], "config key 'weight_decay' must be a finite number >= 0, got -inf"),
        (["--lr_decay_iters=-1"], "config key 'lr_decay_iters' must be 0 or more, got -1"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError) as refused:
            build_config(None, args)
        assert message in str(refused.value)


def test_muon_on_a_torch_without_it_is_a_config_error(monkeypatch):
    import torch

    monkeypatch.delattr(torch.optim, "Muon", raising=False)
    with pytest.raises(ConfigError, match="optimizer='muon' uses torch.optim.Muon, which PyTorch .* lacks"):
        build_config(None, ["--optimizer=muon"])
    build_config(None, ["--optimizer=adamw"])  # AdamW needs nothing new


def test_cli_reports_config_errors_in_one_line_with_nonzero_exit(tmp_path):
    bad = write(tmp_path, "n_layers = 3\n")
    cases = [
        ([bad], "did you mean 'n_layer'"),
        ([tmp_path / "missing.toml"], "not found"),
        (["--max_iters=ten"], "'max_iters' expects int, got 'ten'"),
        (["--max_iters", "10"], "unexpected argument '10'"),
    ]
    for args, message in cases:
        result = run_cli("train.py", *args)
        assert result.returncode != 0
        assert message in result.stderr
        assert result.stderr.strip().count("\n") == 0, result.stderr  # one line, no traceback


def test_help_lists_every_key_with_type_default_and_description():
    result = run_cli("train.py", "--help")
    assert result.returncode == 0
    for name in KEYS:
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(f"--{name} "))
        assert key_help(name) in line


def test_shipped_configs_load():
    import glob
    import os

    from nanoforge.reinforce import build_rl_config

    paths = glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.toml"))
    assert len(paths) >= 4
    for path in paths:  # rl.py's configs (rl_*.toml) have its keys besides train.py's
        (build_rl_config if os.path.basename(path).startswith("rl_") else build_config)(path)


def test_the_config_reference_in_the_docs_matches_the_code():
    import json
    import os

    reference = open(os.path.join(os.path.dirname(__file__), "..", "docs", "training.md")).read()
    for name, f in KEYS.items():
        row = f"| `{name}` | `{json.dumps(f.default)}` | {key_help(name)} |"
        assert row in reference, f"docs/training.md's config reference is out of date for {name}: expected {row}"


def test_every_float_key_is_checked_finite():
    from nanoforge.config import FLOAT_RANGES

    floats = {name for name, f in KEYS.items() if f.type is float}
    assert floats == set(FLOAT_RANGES), "a float key without a range check"
    for name in floats:
        with pytest.raises(ConfigError, match=f"config key '{name}' must be"):
            build_config(None, [f"--{name}=nan"])


def test_model_keys_are_gptconfigs_declared_once():
    fields = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
    assert sorted(MODEL_KEY_HELP) == sorted(fields)
    cfg = build_config(None, ["--n_layer=3", "--pos_emb=rope", "--qk_norm=true"])
    model_cfg = cfg.model_config(vocab_size=99)
    assert (model_cfg.n_layer, model_cfg.pos_emb, model_cfg.qk_norm, model_cfg.vocab_size) == (3, "rope", True, 99)
    assert TrainConfig().n_embd == GPTConfig().n_embd  # one default, GPT-2's


@pytest.mark.parametrize("text, message", [
    ("decay_lr = false\n", "config key 'decay_lr' in {path} was replaced: use lr_schedule"),
    ("tensorboard_dir = 'tb'\n", "config key 'tensorboard_dir' in {path} was replaced: use tensorboard_log = true"),
    ("vocab_size = 100\n", "the data's tokenizer sets the vocabulary"),
])
def test_an_old_config_key_names_its_replacement(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        build_config(path)
    assert message.format(path=path) in str(refused.value)


def test_overrides_take_dashes_or_underscores_alike(tmp_path):
    assert build_config(None, ["--out-dir=x", "--max-iters=7"]).out_dir == "x"
    assert build_config(None, ["--out-dir=x", "--max-iters=7"]) == build_config(None, ["--out_dir=x", "--max_iters=7"])


@pytest.mark.parametrize("schedule", ["constant", "cosine", "wsd"])
def test_every_schedule_reaches_its_end_at_lr_decay_iters(schedule):
    from nanoforge.training import get_lr

    cfg = build_config(None, [f"--lr_schedule={schedule}", "--max_iters=100", "--warmup_iters=10",
                              "--learning_rate=1e-3", "--min_lr=1e-5", "--lr_decay_iters=80"])
    assert get_lr(10, cfg) == pytest.approx(1e-3)
    end = 1e-3 if schedule == "constant" else 1e-5
    assert get_lr(80, cfg) == get_lr(99, cfg) == pytest.approx(end)
    assert get_lr(79, cfg) > end or schedule == "constant"
