"""Training that survives: exact resume, atomic checkpoints, signals, the NaN guard, safe loading,
and a clear error for each kind of bad input."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanoforge import checkpoint, training
from nanoforge.config import ConfigError
from conftest import REPO, run_cli, tiny_config
from nanoforge.training import TrainingStopped
from train import train


def read_log(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]


def losses(records):
    """What must agree between a straight and a resumed run (timings may differ)."""
    keys = ("step", "loss", "lr", "train_loss", "val_loss", "skipped_steps")
    return [{k: r.get(k) for k in keys} for r in records]


def interrupt_at(monkeypatch, stop_step):
    """Send this process SIGTERM while the update that completes `stop_step` runs."""
    real_get_lr = training.get_lr

    def get_lr(step, cfg):
        if step == stop_step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get_lr(step, cfg)

    monkeypatch.setattr(training, "get_lr", get_lr)


@pytest.mark.parametrize("stop_step, extra", [
    (3, {}),  # right before an evaluation (eval_interval=4)
    (4, {}),  # on the evaluation step
    (5, {}),  # right after it, mid log window
    (7, {"gradient_accumulation_steps": 3, "dropout": 0.1}),  # accumulation, and dropout's RNG
])
def test_interrupted_and_resumed_run_equals_straight_run_bitwise(tmp_path, data_dir, monkeypatch, stop_step, extra):
    settings = dict(max_iters=12, eval_interval=4, log_interval=2, checkpoint_interval=6, **extra)
    straight = tiny_config(data_dir, tmp_path / "straight", **settings)
    train(straight)

    resumed = tiny_config(data_dir, tmp_path / "resumed", **settings)
    with monkeypatch.context() as m:
        interrupt_at(m, stop_step)
        with pytest.raises(TrainingStopped, match=f"SIGTERM at step {stop_step}.*--resume") as stopped:
            train(resumed)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert checkpoint.load(tmp_path / "resumed" / "latest.safetensors").info["step"] == stop_step
    train(resumed, resume=True)

    a = checkpoint.load(tmp_path / "straight" / "latest.safetensors")
    b = checkpoint.load(tmp_path / "resumed" / "latest.safetensors")
    assert a.info["step"] == b.info["step"] == 12
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    for name, tensor in a.extra.items():
        assert torch.equal(tensor, b.extra[name]), name
    assert losses(read_log(tmp_path / "straight")) == losses(read_log(tmp_path / "resumed"))


def test_resuming_from_best_newer_than_latest_logs_the_same_losses(tmp_path, data_dir, monkeypatch):
    # best is written at evaluations, latest every checkpoint_interval: a crash between them leaves
    # best as the newest checkpoint, and resume must continue from it exactly.
    settings = dict(max_iters=12, eval_interval=5, log_interval=3, checkpoint_interval=8)
    train(tiny_config(data_dir, tmp_path / "straight", **settings))
    crashed = tmp_path / "crashed"
    with monkeypatch.context() as m:
        interrupt_at(m, 7)
        with pytest.raises(TrainingStopped):
            train(tiny_config(data_dir, crashed, **settings))
    assert checkpoint.load(crashed / "best.safetensors").info["step"] == 5  # the first evaluation
    os.remove(crashed / "latest.safetensors")  # as if the crash came before latest was written at step 7
    train(tiny_config(data_dir, crashed, **settings), resume=True)
    assert losses(read_log(tmp_path / "straight")) == losses(read_log(crashed))


def test_resume_refuses_a_different_model_shape_and_reports_safe_changes(tmp_path, data_dir, capsys):
    cfg = tiny_config(data_dir, tmp_path / "run", max_iters=4)
    train(cfg)
    bigger = tiny_config(data_dir, tmp_path / "run", max_iters=8, block_size=32, n_embd=64)
    with pytest.raises(ConfigError, match="cannot resume: the model's shape or optimizer differs") as refused:
        train(bigger, resume=True)
    assert "block_size: checkpoint 16, config 32" in str(refused.value)
    assert "n_embd: checkpoint 32, config 64" in str(refused.value)
    train(tiny_config(data_dir, tmp_path / "run", max_iters=8, learning_rate=5e-4), resume=True)
    err = capsys.readouterr().err
    assert "max_iters changed from 4 to 8" in err
    assert "learning_rate changed from 0.001 to 0.0005 (changes training" in err
    assert checkpoint.load(tmp_path / "run" / "latest.safetensors").info["step"] == 8
    # the cosine's floor and length set every step's learning rate: not safe to change either
    train(tiny_config(data_dir, tmp_path / "run", max_iters=10, learning_rate=5e-4, min_lr=1e-5, lr_decay_iters=10),
          resume=True)
    err = capsys.readouterr().err
    assert "min_lr changed from 0.0001 to 1e-05 (changes training" in err
    assert "lr_decay_iters changed from 20 to 10 (changes training" in err


def test_resume_says_a_longer_wsd_run_changes_training(tmp_path, data_dir, capsys):
    """With lr_decay_iters = 0 the decay ends at max_iters: extending the run moves the decay."""
    train(tiny_config(data_dir, tmp_path / "run", max_iters=4, lr_schedule="wsd", lr_decay_iters=0))
    train(tiny_config(data_dir, tmp_path / "run", max_iters=8, lr_schedule="wsd", lr_decay_iters=0), resume=True)
    assert "max_iters changed from 4 to 8 (changes training" in capsys.readouterr().err


def test_resume_refuses_data_from_another_tokenizer(tmp_path, data_dir, corpus):
    from nanoforge.preparation import prepare

    train(tiny_config(data_dir, tmp_path / "run", max_iters=2, eval_interval=2))
    prepare(str(corpus), "byte", str(tmp_path / "bytes"), 0.1)
    with pytest.raises(ConfigError, match="prepared with another tokenizer"):
        train(tiny_config(tmp_path / "bytes", tmp_path / "run", max_iters=4), resume=True)


def test_resume_from_the_command_line_reuses_the_saved_config(tmp_path, data_dir):
    out = tmp_path / "run"
    args = [f"--data_dir={data_dir}", f"--out_dir={out}", "--n_layer=1", "--n_embd=16", "--n_head=2",
            "--block_size=8", "--batch_size=2", "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
            "--device=cpu"]
    assert run_cli("train.py", *args).returncode == 0
    result = run_cli("train.py", "--resume", f"--out_dir={out}", "--max_iters=6")
    assert result.returncode == 0, result.stderr
    assert "resumed from" in result.stderr and "at step 4" in result.stderr
    assert read_log(out)[-1]["step"] == 6
    # the dashed spelling names the same key: this run's saved config, not the default out_dir's
    result = run_cli("train.py", "--resume", f"--out-dir={out}", "--max-iters=8")
    assert result.returncode == 0, result.stderr
    assert "at step 6" in result.stderr and read_log(out)[-1]["step"] == 8


def test_resume_without_a_checkpoint_says_so(tmp_path, data_dir):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .* start it again without --resume"):
        train(tiny_config(data_dir, tmp_path / "run"), resume=True)
    # killed after creating out_dir but before writing anything: --resume with overrides alone says the same
    (tmp_path / "empty_run").mkdir()
    result = run_cli("train.py", "--resume", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'empty_run'}",
                     "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--device=cpu")
    assert result.returncode != 0 and "no checkpoint in" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_corrupted_latest_falls_back_to_the_previous_checkpoint(tmp_path, data_dir, capsys):
    cfg = tiny_config(data_dir, tmp_path / "run", max_iters=8, checkpoint_interval=4, keep_last_n=2)
    train(cfg)
    run = tmp_path / "run"
    assert sorted(p.name for p in run.glob("step_*")) == ["step_0000004.safetensors", "step_0000008.safetensors"]
    previous = checkpoint.load(run / "previous.safetensors")
    assert previous.info["step"] == 4
    # flip bytes in the middle of latest (and of the step-8 copy, its hard link)
    with open(run / "latest.safetensors", "r+b") as f:
        f.seek(os.path.getsize(run / "latest.safetensors") // 2)
        f.write(b"\xde\xad\xbe\xef" * 4)
    with pytest.raises(checkpoint.CheckpointError, match="failed its checksum"):
        checkpoint.load(run / "latest.safetensors")
    train(tiny_config(data_dir, run, max_iters=10, checkpoint_interval=4, keep_last_n=2), resume=True)
    err = capsys.readouterr().err
    assert "skipping damaged checkpoint" in err and "resumed from" in err and "at step" in err
    assert checkpoint.load(run / "latest.safetensors").info["step"] == 10


def test_truncated_checkpoint_gets_a_clear_error(tmp_path, data_dir):
    train(tiny_config(data_dir, tmp_path / "run", max_iters=2, eval_interval=2))
    path = tmp_path / "run" / "latest.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors checkpoint.*truncated"):
        checkpoint.load(path)
    result = run_cli("sample.py", "--ckpt", path)
    assert result.returncode != 0 and "truncated or corrupted" in result.stderr
    assert result.stderr.strip().count("\n") == 0


SAVER = """
import sys, torch
sys.path.insert(0, {repo!r})
from nanoforge import checkpoint
path, version = sys.argv[1], 0
while True:
    version += 1
    weights = torch.full((1_000_000,), float(version))
    checkpoint.save(path, {{"w": weights}}, {{"version": version, "model": {{}}, "tokenizer": {{}}}})
    print(version, flush=True)
"""


def test_kill_9_at_random_instants_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(repo=REPO))
    path = tmp_path / "ckpt.safetensors"
    rng = random.Random(0)
    last_version = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one save completed
        time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        ckpt = checkpoint.load(path)  # verifies the checksum
        version = ckpt.info["version"]
        assert torch.equal(ckpt.model_state["w"], torch.full((1_000_000,), float(version)))
        assert version >= 1
        last_version = version
        checkpoint.remove_stale_temporaries(str(tmp_path))
    assert last_version >= 1
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def tiny_cli_args(data_dir, out_dir, max_iters):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", f"--max_iters={max_iters}", "--eval_interval=50",
            "--eval_iters=2", "--log_interval=5", "--checkpoint_interval=20", "--device=cpu"]


def test_kill_9_mid_training_then_resume_logs_the_same_losses(tmp_path, data_dir):
    straight = tmp_path / "straight"
    assert run_cli("train.py", *tiny_cli_args(data_dir, straight, 200)).returncode == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *tiny_cli_args(data_dir, killed, 200)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "latest.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(1).uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
    result = run_cli("train.py", *tiny_cli_args(data_dir, killed, 200), "--resume")
    assert result.returncode == 0, result.stderr
    assert losses(read_log(straight)) == losses(read_log(killed))


def test_sigterm_writes_a_checkpoint_and_says_how_to_resume(tmp_path, data_dir):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(REPO, "train.py"), *tiny_cli_args(data_dir, out, 100000)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step" in stderr and "--resume" in stderr
    step = checkpoint.load(out / "latest.safetensors").info["step"]
    assert 0 < step < 100000 and all(r["step"] <= step for r in read_log(out))


def inject_nan_losses(monkeypatch, bad_calls):
    """Make the training forward passes numbered in bad_calls (1-based) return a NaN loss."""
    import model as model_module

    real_forward = model_module.GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_module.GPT, "forward", forward)


def test_occasional_nan_steps_are_skipped_and_counted(tmp_path, data_dir, monkeypatch):
    inject_nan_losses(monkeypatch, {3, 4, 9})
    train(tiny_config(data_dir, tmp_path / "run", max_iters=12, log_interval=4, eval_interval=12))
    records = read_log(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [2, 2, 3]  # logged at steps 4, 8, 12
    assert all(r["loss"] is not None and r["loss"] == r["loss"] for r in records)  # finite, not NaN
    ckpt = checkpoint.load(tmp_path / "run" / "latest.safetensors")
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())


def test_persistent_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
    cfg = tiny_config(data_dir, tmp_path / "run", max_iters=20, checkpoint_interval=4, max_bad_steps=3)
    inject_nan_losses(monkeypatch, set(range(6, 1000)))
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite loss.*untouched"):
        train(cfg)
    ckpt = checkpoint.load(tmp_path / "run" / "latest.safetensors")
    assert ckpt.info["step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt.model_state.values())


class Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_is_refused_and_never_executed(tmp_path, data_dir):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    for name in ("latest.safetensors", "ckpt.pt"):
        with open(run / name, "wb") as f:
            pickle.dump({"model": Payload(str(marker))}, f)
    torch.save({"model": Payload(str(marker))}, run / "torch_save.pt")

    for name in ("latest.safetensors", "ckpt.pt", "torch_save.pt"):
        with pytest.raises(checkpoint.CheckpointError, match="refused: loading a pickle can run code"):
            checkpoint.load(run / name)
        result = run_cli("sample.py", "--ckpt", run / name)
        assert result.returncode != 0 and "pickle" in result.stderr
    with pytest.raises(checkpoint.CheckpointError, match="every checkpoint .* is damaged"):
        train(tiny_config(data_dir, run), resume=True)
    assert not marker.exists()


def test_checkpoint_from_an_incompatible_version_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    save_file({"model.w": torch.zeros(2)}, path, metadata={"format": checkpoint.FORMAT, "version": "999", "info": "{}"})
    with pytest.raises(checkpoint.CheckpointError, match="format version '999', this code reads version 1"):
        checkpoint.load(path)
    result = run_cli("sample.py", "--ckpt", path)
    assert result.returncode != 0 and "format version '999'" in result.stderr


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, data_dir):
    out = tmp_path / "run"
    args = tiny_cli_args(data_dir, out, 20)
    assert run_cli("train.py", *args).returncode == 0
    before = (out / "latest.safetensors").read_bytes()
    size = len(before)

    # Resume under a file-size limit smaller than a checkpoint: the next save fails mid-write (EFBIG),
    # as it would on a full disk.
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    cmd = [sys.executable, os.path.join(REPO, "train.py"), *tiny_cli_args(data_dir, out, 40), "--resume"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert result.returncode != 0
    assert "no space left to write a checkpoint" in result.stderr and "previous checkpoint is intact" in result.stderr
    assert (out / "latest.safetensors").read_bytes() == before
    assert [p.name for p in out.iterdir() if ".tmp-" in p.name] == []
    assert run_cli("train.py", *tiny_cli_args(data_dir, out, 40), "--resume").returncode == 0


def test_bad_data_gets_one_line_errors_and_nothing_is_written(tmp_path, data_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong_ids = tmp_path / "wrong_ids"
    wrong_ids.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (wrong_ids / name).write_bytes((data_dir / name).read_bytes())
    meta = json.loads((wrong_ids / "meta.json").read_text())
    meta["vocab_size"] = 5  # as if the .bin files came from another tokenizer
    (wrong_ids / "meta.json").write_text(json.dumps(meta))
    short = tmp_path / "short"
    short.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (short / name).write_bytes((data_dir / name).read_bytes())

    damaged = {}  # meta.json fields a hand edit or a damaged file can hold (each one a traceback before)
    for name, edit in [("list", {"train_tokens": [1]}), ("null", {"vocab_size": None}), ("zero", {"dtype": 0}),
                       ("json_null", None)]:
        damaged[name] = tmp_path / f"meta_{name}"
        damaged[name].mkdir()
        for f in ("train.bin", "val.bin"):
            (damaged[name] / f).write_bytes((data_dir / f).read_bytes())
        meta = json.loads((data_dir / "meta.json").read_text())
        (damaged[name] / "meta.json").write_text(json.dumps(None if edit is None else {**meta, **edit}))
    cases = [
        (damaged["list"], [], "has train_tokens = [1], expected a non-negative whole number"),
        (damaged["null"], [], "has vocab_size = None, expected a positive whole number"),
        (damaged["zero"], [], "has dtype = 0, expected 'uint16' or 'uint32'"),
        (damaged["json_null"], [], "holds NoneType, not a JSON object"),
        (tmp_path / "missing", [], "does not exist: run `python prepare.py"),
        (empty, [], "has no meta.json"),
        (wrong_ids, [], "holds token id"),
        (short, ["--block_size=100000"], "fewer than block_size + 1"),
    ]
    for i, (data, extra, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        result = run_cli("train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--block_size=16", *extra)
        assert result.returncode != 0, message
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
        assert not out.exists()


def test_unwritable_out_dir_is_an_error(tmp_path, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={blocker / 'run'}", "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--device=cpu")
    assert result.returncode != 0 and "is not writable" in result.stderr and "--out_dir=" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_sampling_past_the_context_crops_instead_of_crashing(tmp_path, data_dir):
    train(tiny_config(data_dir, tmp_path / "run", max_iters=2, eval_interval=2))
    result = run_cli("sample.py", "--ckpt", tmp_path / "run", "--prompt", "All:", "--max-new-tokens", "40",
                     "--num-samples", "1")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split("-" * 40)[0].strip("\n")) == len("All:") + 40  # block_size is 16


def test_a_second_ctrl_c_stops_at_once(tmp_path, data_dir):
    out = tmp_path / "run"
    # steps of several seconds, so that the second Ctrl-C lands while the first one's step is running
    slow = [f"--data_dir={data_dir}", f"--out_dir={out}", "--n_layer=6", "--n_head=6", "--n_embd=384",
            "--block_size=32", "--batch_size=256", "--max_iters=1000", "--device=cpu"]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *slow], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:  # written just before the loop
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # signals that arrive together are merged: wait until the first one is handled
        if "SIGINT: finishing this step" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr  # as a shell reports Ctrl-C
    assert "interrupted; the last checkpoint written is intact" in stderr
    assert not (out / "latest.safetensors").exists()  # it stopped at once, before writing one


def test_compiled_training_saves_plain_state_dict_names(tmp_path, data_dir, monkeypatch):
    # torch.compile wraps the model (its state dict gains "_orig_mod." prefixes); the eager backend
    # keeps this test fast while going through the same wrapper.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    train(tiny_config(data_dir, tmp_path / "run", max_iters=2, eval_interval=2, compile=True))
    ckpt = checkpoint.load(tmp_path / "run" / "latest.safetensors")
    assert "transformer.wte.weight" in ckpt.model_state
    assert not [k for k in ckpt.model_state if "_orig_mod" in k]
    train(tiny_config(data_dir, tmp_path / "run", max_iters=4, eval_interval=2, compile=False), resume=True)
