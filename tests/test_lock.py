"""The run lock: two train.py (or prepare.py) processes never write into the same directory, and a
lock left by a killed process never blocks the next run."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, run_cli
from nanoforge.lock import DirectoryLock

LONG_RUN = ["--n_layer=1", "--n_head=1", "--n_embd=16", "--block_size=16", "--batch_size=2", "--max_iters=1000000",
            "--eval_interval=1000000", "--log_interval=1", "--checkpoint_interval=1000000", "--device=cpu"]


def start_train(data_dir, out_dir):
    """A long train.py run in the background, returned once it has written its first log record."""
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), f"--data_dir={data_dir}",
                             f"--out_dir={out_dir}", *LONG_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out_dir / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "train.py wrote no log record in 120 s"
        time.sleep(0.2)
    return proc


def test_second_train_on_the_same_out_dir_is_refused_and_the_first_run_is_untouched(tmp_path, data_dir):
    out = tmp_path / "run"
    first = start_train(data_dir, out)
    try:
        config_before = (out / "config.json").read_bytes()
        second = run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *LONG_RUN)
        assert second.returncode != 0
        error = second.stderr.strip()
        assert "\n" not in error, error
        assert error.startswith("train.py: error:") and str(out) in error and f"PID {first.pid}" in error
        assert "--out_dir" in error  # says what to do
        assert first.poll() is None  # the first run goes on ...
        assert (out / "config.json").read_bytes() == config_before  # ... and its files were not touched
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 128 + signal.SIGTERM
    finally:
        first.kill()
        first.communicate()
    # the log holds the first run's records alone, in order
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(tmp_path, data_dir):
    out = tmp_path / "run"
    killed = start_train(data_dir, out)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    killed.communicate()
    assert (out / ".lock").exists()  # the file stays; the kernel released the lock with the process
    result = run_cli("train.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--n_layer=1", "--n_head=1",
                     "--n_embd=16", "--block_size=16", "--batch_size=2", "--max_iters=4", "--eval_interval=2",
                     "--eval_iters=1", "--log_interval=2", "--device=cpu")
    assert result.returncode == 0, result.stderr
    assert (out / "latest.safetensors").exists()


def test_prepare_refuses_an_out_dir_another_process_is_writing(tmp_path, corpus):
    out = tmp_path / "data"
    with DirectoryLock(str(out), "prepare.py", "wait"):  # this test process plays the other prepare.py
        result = run_cli("prepare.py", corpus, "--tokenizer", "char", "--out", out)
    assert result.returncode != 0
    error = result.stderr.strip()
    assert "\n" not in error and error.startswith("prepare.py: error:")
    assert str(out) in error and f"PID {os.getpid()}" in error and "--out" in error
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()
    # once the lock is free, the same command works
    result = run_cli("prepare.py", corpus, "--tokenizer", "char", "--out", out)
    assert result.returncode == 0, result.stderr
    assert (out / "meta.json").exists()


def test_a_lock_whose_directory_was_removed_releases_cleanly(tmp_path):
    import shutil

    with DirectoryLock(str(tmp_path / "run"), "train.py", "choose another --out_dir"):
        shutil.rmtree(tmp_path / "run")  # a user cleaning up while the run is still going
    with DirectoryLock(str(tmp_path / "run"), "train.py", "choose another --out_dir"):  # free again
        (tmp_path / "run" / "kept").write_text("x")
    assert (tmp_path / "run" / "kept").exists()  # a directory something was written to stays
