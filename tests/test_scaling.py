"""scaling.py: the power-law fit, a sweep of tiny depths end to end (an unfinished depth resumed, a finished one
reused), and bad input as one line."""

import contextlib
import io
import json

import pytest
import torch

import scaling
from conftest import run_cli
from model import GPT, GPTConfig
from nanoforge import checkpoint
from nanoforge import scaling as sweep
from nanoforge.config import build_config
from train import train

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_sweep_config(tmp_path, data_dir, **keys):
    """A sweep config for the tiny char corpus: depth d is 8d wide, trained on 0.5 tokens per parameter."""
    values = {"data_dir": str(data_dir), "aspect_ratio": 8, "tokens_per_param": 0.5, "block_size": 16,
              "batch_size": 4, "warmup_iters": 2, "eval_iters": 2, "log_interval": 5, "device": "cpu", **keys}
    path = tmp_path / "sweep.toml"
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def test_the_fit_recovers_a_and_b_from_points_on_a_power_law():
    compute = [1e9, 3e10, 2e11, 5e12, 1e14]
    a, b = sweep.fit_power_law(compute, [7.5 * c ** -0.083 for c in compute])
    assert a == pytest.approx(7.5, rel=1e-9) and b == pytest.approx(0.083, rel=1e-9)
    assert "multiplies the val loss by 0.826" in sweep.describe_fit(7.5, 0.083, 5)  # 10 ** -0.083


def test_depths_are_n_or_a_range():
    assert sweep.parse_depths("3") == [1, 2, 3]
    assert sweep.parse_depths("2-4") == [2, 3, 4]


@pytest.mark.parametrize("depths, message", [
    ("0", "goes below 1"), ("3-1", "runs backwards"), ("1", "is one depth: the fit needs two"), ("x", "is not N or A-B"),
])
def test_bad_depths_are_one_line_errors(depths, message):
    with pytest.raises(SystemExit, match=rf"^scaling.py: error: --depths '{depths}' {message}"):
        scaling.main(["--depths", depths])


def test_a_missing_config_or_unprepared_corpus_is_one_line_and_nothing_is_written(tmp_path):
    result = run_cli("scaling.py", "--config", tmp_path / "nope.toml", "--out", tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"scaling.py: error: config file '{tmp_path / 'nope.toml'}' not "
                                                  "found: pass the path of a .toml file, e.g. configs/quickstart.toml"]
    config = tiny_sweep_config(tmp_path, tmp_path / "data" / "pystdlib")
    with pytest.raises(SystemExit, match=r"^scaling.py: error: the sweep's corpus '.*pystdlib' is not prepared: run "
                                         r"`python prepare.py pystdlib --out .*pystdlib` first$"):
        scaling.main(["--config", str(config), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_sweep_resumes_an_unfinished_depth_trains_a_new_one_and_reuses_finished_ones(tmp_path, data_dir):
    config, out = tiny_sweep_config(tmp_path, data_dir), tmp_path / "out"
    # depth 1 stopped part-way, as Ctrl-C leaves it: the sweep resumes it to its full budget
    with contextlib.redirect_stderr(io.StringIO()):
        train(build_config(str(config), ["--depth=1", f"--out_dir={out / 'd1'}", "--max_iters=3"]))
    result = run_cli("scaling.py", "--depths", "2", "--config", config, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sweep.plan(str(config), [1, 2], str(out))
    assert "depth 1: resuming: python train.py" in result.stdout and "depth 2: training:" in result.stdout
    assert [sweep.status(run) for run in runs] == ["finished", "finished"]
    assert (out / "scaling.png").read_bytes()[:8] == PNG
    table = result.stdout[result.stdout.index("depth    params"):]
    results = [sweep.read_result(run) for run in runs]
    for run, r in zip(runs, results):
        assert f"{r.val_loss:.4f}" in table.splitlines()[run.depth]
        # compute is the trained model's flops_per_token x the tokens of max_iters steps (4 x 16 tokens each)
        model_info = checkpoint.read_info(str(out / f"d{run.depth}" / "latest.safetensors"))["model"]
        with torch.device("meta"):
            model = GPT(GPTConfig(**model_info))
        assert r.tokens == run.max_iters * 64 and r.flops == model.flops_per_token() * r.tokens
        assert len(r.curve) >= 2 and r.curve[-1] == (r.flops, r.val_loss)
    a, b = sweep.fit_power_law([r.flops for r in results], [r.val_loss for r in results])
    assert f"L(C) = {a:.4g} * C^(-{b:.4f})" in result.stdout and b > 0  # depth 2 learned more: bigger is better

    # run again (as after extending --depths): the finished depths are read back, not retrained
    logs = {d: (out / f"d{d}" / "log.jsonl").read_text() for d in (1, 2)}
    with contextlib.redirect_stdout(io.StringIO()) as again:
        scaling.main(["--depths", "2", "--config", str(config), "--out", str(out), "--png", str(tmp_path / "b.png")])
    assert "depth 1: finished in" in again.getvalue() and "depth 2: finished in" in again.getvalue()
    assert {d: (out / f"d{d}" / "log.jsonl").read_text() for d in (1, 2)} == logs
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG
