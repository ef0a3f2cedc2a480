"""plot.py: loss curves of one run, several runs and a resumed run, read from log.jsonl while it is written."""

import json

import pytest

import plot
from conftest import tiny_config
from train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs of the tiny model on the same data; the second stopped at step 10 and resumed to 20."""
    from conftest import TINY_TEXT
    from nanoforge.preparation import prepare

    root = tmp_path_factory.mktemp("plot")
    (root / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    prepare(str(root / "corpus.txt"), "char", str(root / "data"), 0.1)
    train(tiny_config(root / "data", root / "straight", max_iters=20))
    train(tiny_config(root / "data", root / "resumed", max_iters=10, lr_decay_iters=20))
    train(tiny_config(root / "data", root / "resumed", max_iters=20), resume=True)
    return root / "straight", root / "resumed"


def test_one_run_while_its_log_is_being_written(runs, tmp_path, capsys):
    straight, _ = runs
    with open(straight / "log.jsonl", "a") as f:
        f.write('{"step": 25, "loss": 1.2, "lr"')  # the run is writing this line right now
    try:
        plot.main(["--ckpt", str(straight), "--png", str(tmp_path / "one.png")])
    finally:
        text = (straight / "log.jsonl").read_text()
        (straight / "log.jsonl").write_text(text[: text.rindex("\n") + 1])
    assert (tmp_path / "one.png").read_bytes()[:8] == PNG
    assert [r["step"] for r in plot.read_log(straight)] == [5, 10, 15, 20]


def test_smoothing_is_a_trailing_mean():
    assert plot.smoothed([1, 2, 3, 10], 2) == [1, 1.5, 2.5, 6.5]
    assert plot.smoothed([4, 8], 1) == [4, 8]


def test_two_runs_on_tokens_with_smoothing(runs, tmp_path):
    plot.main(["--ckpt", *map(str, runs), "--png", str(tmp_path / "two.png"), "--x", "tokens", "--smooth", "2"])
    assert (tmp_path / "two.png").read_bytes()[:8] == PNG
    assert plot.x_values(plot.read_log(runs[0]), runs[0], "tokens")[0] == [5 * 64, 10 * 64, 15 * 64, 20 * 64]


def test_a_resumed_run_is_one_run(runs, tmp_path):
    _, resumed = runs
    records = plot.read_log(resumed)
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert sum("val_loss" in r for r in records) == 2  # the evaluations at steps 10 and 20
    # A log a crash left with records after the checkpoint: the resumed run's own records win.
    with open(resumed / "log.jsonl", "a") as f:
        f.write(json.dumps({**records[-1], "loss": 0.5}) + "\n")
    assert plot.read_log(resumed)[-1]["loss"] == 0.5
    plot.main(["--ckpt", str(resumed), "--png", str(tmp_path / "resumed.png"), "--x", "time"])
    assert (tmp_path / "resumed.png").read_bytes()[:8] == PNG


def test_time_axis_uses_elapsed_s_or_says_it_estimates(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"batch_size": 2, "block_size": 50}))
    records = [{"step": 10, "loss": 3.0, "lr": 1e-3, "tokens_per_sec": 100.0},
               {"step": 20, "loss": 2.0, "lr": 1e-3, "tokens_per_sec": 200.0}]
    minutes, note = plot.x_values(records, tmp_path, "time")
    assert minutes == pytest.approx([10 * 100 / 100 / 60, (10 + 5) / 60]) and "estimated from tokens/s" in note
    timed = [{**r, "elapsed_s": s} for r, s in zip(records, (30.0, 90.0))]
    assert plot.x_values(timed, tmp_path, "time") == ([0.5, 1.5], None)


def test_a_directory_without_a_log_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit, match=r"^plot.py: error: no log.jsonl in .*: pass a run directory"):
        plot.main(["--ckpt", str(tmp_path)])
