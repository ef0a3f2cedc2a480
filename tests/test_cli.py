"""The README's workflow through the real command lines, on a tiny corpus."""

import json

from conftest import TINY_TEXT, run_cli

TINY_RUN = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=60",
            "--eval_interval=30", "--eval_iters=2", "--log_interval=10", "--warmup_iters=5",
            "--lr_decay_iters=60", "--device=cpu"]


def test_prepare_train_sample_end_to_end(tmp_path, corpus):
    data, out = tmp_path / "data", tmp_path / "run"
    result = run_cli("prepare.py", corpus, "--tokenizer", "char", "--out", data)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and (data / "meta.json").exists()

    result = run_cli("train.py", f"--data_dir={data}", f"--out_dir={out}", *TINY_RUN)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_sec", "mfu"} <= r.keys()
        assert r["tokens_per_sec"] > 0 and r["mfu"] is None  # no known peak on a CPU
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [30, 60] and all("train_loss" in r for r in evals)
    assert records[-1]["loss"] < records[0]["loss"]  # it learned something
    assert json.loads((out / "config.json").read_text())["max_iters"] == 60
    assert (out / "latest.safetensors").exists() and (out / "best.safetensors").exists()

    # sample.py needs only the checkpoint: remove the data directory first
    for f in data.iterdir():
        f.unlink()
    data.rmdir()
    result = run_cli("sample.py", "--ckpt", out, "--prompt", "First", "--num-samples", "2",
                     "--max-new-tokens", "50", "--seed", "7")
    assert result.returncode == 0, result.stderr
    samples = [s.strip("\n") for s in result.stdout.split("-" * 40) if s.strip()]
    assert len(samples) == 2
    for s in samples:
        assert s.startswith("First") and len(s) == len("First") + 50
        assert set(s) <= set(TINY_TEXT)
    again = run_cli("sample.py", "--ckpt", out, "--prompt", "First", "--num-samples", "2",
                    "--max-new-tokens", "50", "--seed", "7")
    assert again.stdout == result.stdout  # a seed fixes the output


def test_sample_refuses_prompt_with_unknown_characters(tmp_path, data_dir):
    out = tmp_path / "run"
    assert run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY_RUN, "--max_iters=2",
                   "--eval_interval=2").returncode == 0
    result = run_cli("sample.py", "--ckpt", out, "--prompt", "Zebra ✓")
    assert result.returncode != 0
    assert "not in this model's vocabulary" in result.stderr and "'✓' (U+2713)" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_train_refuses_to_overwrite_a_run_and_errors_are_one_line(tmp_path, data_dir):
    out = tmp_path / "run"
    args = [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY_RUN, "--max_iters=2", "--eval_interval=2"]
    assert run_cli("train.py", *args).returncode == 0
    before = (out / "latest.safetensors").read_bytes()
    result = run_cli("train.py", *args)
    assert result.returncode != 0 and "already holds a run: continue it with --resume" in result.stderr
    assert (out / "latest.safetensors").read_bytes() == before

    result = run_cli("train.py", f"--data_dir={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'o2'}")
    assert result.returncode != 0 and "run `python prepare.py SOURCE" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_sample_without_checkpoint_says_what_to_do(tmp_path):
    result = run_cli("sample.py", "--ckpt", tmp_path)
    assert result.returncode != 0 and "holds no checkpoint" in result.stderr and "train.py" in result.stderr


def test_sample_lookup_prints_what_plain_greedy_prints_and_refuses_sampling(tmp_path, data_dir):
    out = tmp_path / "run"
    assert run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY_RUN).returncode == 0
    greedy = ["--ckpt", out, "--prompt", "First Citizen:\nBefore we", "--num-samples", "1", "--temperature", "0",
              "--max-new-tokens", "80"]
    plain = run_cli("sample.py", *greedy)
    looked_up = run_cli("sample.py", *greedy, "--lookup", "6")
    assert plain.returncode == 0 and looked_up.returncode == 0, plain.stderr + looked_up.stderr
    assert looked_up.stdout == plain.stdout and len(plain.stdout) > 80

    refused = run_cli("sample.py", "--ckpt", out, "--lookup", "6", "--temperature", "0.8", "--num-samples", "1")
    assert refused.returncode != 0
    assert refused.stderr.strip() == ("sample.py: error: --lookup must be 0 (off), or above 0 with one prompt "
                                      "(--num-samples 1), temperature 0 and repetition_penalty 1, got 6")
    negative = run_cli("sample.py", "--ckpt", out, "--lookup", "-1")
    assert negative.returncode != 0 and negative.stderr.strip().endswith("repetition_penalty 1, got -1")


def test_every_command_has_help_in_the_shared_dialect():
    """One spelling per concept: the commands that run a model take --ckpt/--init-from, --device (and
    --dtype auto where precision is a choice); outputs are --out DIR or --png FILE; --top-k is only sampling's."""
    shared = {
        "prepare.py": ["--out DIR"],
        "sample.py": ["--ckpt RUN", "--init-from NAME|PATH", "--device", "--dtype", "--top-k K"],
        "eval.py": ["--ckpt RUN", "--init-from NAME|PATH", "--data", "--max N", "--device", "--json"],
        "explain.py": ["--ckpt RUN", "--init-from NAME|PATH", "--device", "--top N"],
        "plot.py": ["--ckpt RUN", "--png FILE"],
        "export.py": ["--ckpt RUN", "--out DIR"],
        "scaling.py": ["--out DIR", "--png FILE"],
        "train.py": ["--out_dir", "--init_from", "--device", "--dtype"],
    }
    for script, flags in shared.items():
        result = run_cli(script, "--help")
        assert result.returncode == 0, result.stderr
        for flag in flags:
            assert flag in result.stdout, f"{script} --help lacks {flag}"
        if script != "sample.py":
            assert "--top-k" not in result.stdout, script
