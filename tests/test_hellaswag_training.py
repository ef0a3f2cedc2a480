"""HellaSwag during training: hellaswag_interval adds acc and acc_norm to log.jsonl's records (the numbers
eval.py's scoring gives the same weights), plot.py draws them, a bad file stops the run before it writes, and
under torchrun the two processes split the examples and sum the counts."""

import json
import os
import subprocess

import torch

import plot
from conftest import REPO, run_cli, tiny_config
from nanoforge import hellaswag, loading, multiple_choice
from nanoforge.distributed import Distributed
from test_distributed import run_args, torchrun_command
from test_multiple_choice import hellaswag_records, write_jsonl
from train import train


def scored(out_dir):
    records = [json.loads(line) for line in open(out_dir / "log.jsonl")]
    return {r["step"]: r for r in records if "hellaswag_acc_norm" in r}


def test_the_run_logs_hellaswag_and_plot_draws_it(tmp_path, data_dir):
    file = write_jsonl(tmp_path / "h.jsonl", hellaswag_records(30, ending_words=1))
    out = tmp_path / "run"
    cfg = tiny_config(data_dir, out, max_iters=20, hellaswag_interval=8, hellaswag_max=12, hellaswag_data=str(file))
    train(cfg)
    logged = scored(out)
    assert sorted(logged) == [8, 16, 20]  # every 8 steps and at the end, between the log_interval records
    assert all(r["hellaswag_n"] == 12 for r in logged.values())
    # the last record scores the final weights, as eval.py's scoring of the checkpoint does
    model, tokenizer = loading.load_model(str(out), "cpu")
    final = multiple_choice.evaluate(model, tokenizer, hellaswag.read_examples(str(file), 12))
    assert (logged[20]["hellaswag_acc"], logged[20]["hellaswag_acc_norm"]) == (
        round(final["acc"], 6), round(final["acc_norm"], 6))

    plot.main(["--ckpt", str(out), "--png", str(tmp_path / "plot.png")])
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_or_malformed_file_stops_the_run_before_it_writes(tmp_path, data_dir):
    (tmp_path / "bad.jsonl").write_text('{"ctx": "a", "endings": ["b", "c"]}\n', encoding="utf-8")
    for path, message in ((tmp_path / "missing.jsonl", "does not exist"), (tmp_path / "bad.jsonl", "line 1 has no 'label'")):
        out = tmp_path / "run"
        result = run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--device=cpu",
                         "--n_layer=1", "--n_embd=16", "--n_head=2", "--block_size=8", "--hellaswag_interval=1",
                         f"--hellaswag_data={path}")
        assert result.returncode == 1 and result.stderr.startswith("train.py: error: ") and message in result.stderr
        assert result.stderr.count("\n") == 1
        assert not out.exists() or not os.listdir(out)


def test_evaluate_splits_examples_between_processes_and_sums_the_counts():
    """Two ranks' shares (every second example each) add up to the single-process count."""
    from model import GPT, GPTConfig
    from nanoforge.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    model = GPT(GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32)).eval()
    examples = [hellaswag.parse_line(json.dumps(r), "x") for r in hellaswag_records(9)]
    whole = multiple_choice.evaluate(model, tokenizer, examples)

    class Rank(Distributed):  # what a process of two sees; gather returns both shares, as all_gather would
        def __init__(self, rank):
            super().__init__()
            self.enabled, self.rank, self.world_size = True, rank, 2

        def gather(self, obj):
            other = Rank(1 - self.rank)
            share = examples[other.rank :: 2]
            theirs = multiple_choice.count_correct(share, multiple_choice.score_examples(model, tokenizer, share))
            return [obj, (*theirs, len(share))] if self.rank == 0 else [(*theirs, len(share)), obj]

    assert multiple_choice.evaluate(model, tokenizer, examples, ddp=Rank(0)) == whole
    assert multiple_choice.evaluate(model, tokenizer, examples, ddp=Rank(1)) == whole


def test_torchrun_processes_share_the_examples(tmp_path, data_dir):
    """Under torchrun (2 CPU processes over gloo) the logged count is the whole set and the accuracy the
    one a single process logs for the same weights (the final ones, scored again here)."""
    file = write_jsonl(tmp_path / "h.jsonl", hellaswag_records(11, ending_words=1))
    out = tmp_path / "ddp"
    args = run_args(data_dir, out, ["--hellaswag_interval=20", f"--hellaswag_data={file}", "--max_iters=20",
                                    "--dropout=0.0"])
    result = subprocess.run(torchrun_command(*args), cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    final = scored(out)[20]
    assert final["hellaswag_n"] == 11
    model, tokenizer = loading.load_model(str(out), "cpu")
    alone = multiple_choice.evaluate(model, tokenizer, hellaswag.read_examples(str(file)))
    assert (final["hellaswag_acc"], final["hellaswag_acc_norm"]) == (round(alone["acc"], 6), round(alone["acc_norm"], 6))
