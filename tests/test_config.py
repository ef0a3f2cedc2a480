import dataclasses

import pytest

from nanoforge.config import ConfigError, TrainConfig, build_config
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
    with pytest.raises(ConfigError, match="dtype must be one of"):
        build_config(None, ["--dtype=fp8"])
    cases = [
        (["--mlp=gelu2"], "config key 'mlp' must be one of gelu, relu2, swiglu; got 'gelu2'"),
        (["--n_head=4", "--n_kv_head=3"], "n_kv_head (3) must divide n_head (4)"),
        (["--pos_emb=rope", "--n_embd=30", "--n_head=2"], "the head size n_embd / n_head (15) must be even"),
        (["--matrix_lr=0"], "matrix_lr, embedding_lr and unembedding_lr must be > 0"),
        (["--decay_fraction=1.5"], "decay_fraction must be in [0, 1]"),
        (["--muon_momentum=1"], "muon_momentum in [0, 1)"),
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
    for f in dataclasses.fields(TrainConfig):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(f"--{f.name} "))
        assert f.metadata["help"] in line


def test_shipped_configs_load():
    import glob
    import os

    paths = glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.toml"))
    assert len(paths) >= 4
    for path in paths:
        build_config(path)


def test_readme_config_reference_matches_the_code():
    import json
    import os

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for f in dataclasses.fields(TrainConfig):
        row = f"| `{f.name}` | `{json.dumps(f.default)}` | {f.metadata['help']} |"
        assert row in readme, f"README config reference is out of date for {f.name}: expected {row}"
