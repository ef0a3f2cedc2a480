"""Data-parallel training through the real torchrun: two CPU processes talking over gloo."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanoforge import checkpoint
from conftest import REPO


def torchrun_command(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            os.path.join(REPO, "train.py"), *map(str, args)]


# Muon with the speedruns' architecture: two optimizers' state, rotary positions, an untied lm_head.
MUON = ["--optimizer=muon", "--pos_emb=rope", "--norm=rmsnorm", "--mlp=relu2", "--qk_norm=true",
        "--tie_embeddings=false", "--lr_schedule=wsd"]


def run_args(data_dir, out_dir, extra=()):
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=4", "--max_iters=40",
            "--eval_interval=20", "--eval_iters=2", "--log_interval=5", "--checkpoint_interval=5",
            "--dropout=0.1", "--device=cpu", *extra]


def losses(out_dir):
    records = [json.loads(line) for line in open(out_dir / "log.jsonl")]
    return [{k: r.get(k) for k in ("step", "loss", "lr", "train_loss", "val_loss")} for r in records]


@pytest.mark.parametrize("extra", [[], MUON], ids=["adamw", "muon"])
def test_torchrun_trains_and_resumes_exactly_after_sigterm(tmp_path, data_dir, extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    result = subprocess.run(torchrun_command(*run_args(data_dir, straight, extra)), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = losses(straight)
    assert [r["step"] for r in records] == list(range(5, 41, 5))  # one log, written by one process
    ckpt = checkpoint.load(straight / "latest.safetensors")
    assert len(ckpt.info["rng"]) == 2  # both processes' random states
    # the processes share one batch stream (each keeps its own micro-batches of it): their generators agree
    assert torch.equal(ckpt.extra["rank0.rng_batches"], ckpt.extra["rank1.rng_batches"])

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(torchrun_command(*run_args(data_dir, stopped, extra)), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "latest.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped by SIGTERM at step" in stderr
    step = checkpoint.load(stopped / "latest.safetensors").info["step"]
    assert 0 < step < 40

    result = subprocess.run(torchrun_command(*run_args(data_dir, stopped, extra), "--resume"), cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(stopped) == losses(straight)
    a = checkpoint.load(straight / "latest.safetensors")
    b = checkpoint.load(stopped / "latest.safetensors")
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name


def test_accumulation_steps_must_split_evenly_over_processes(tmp_path, data_dir):
    args = run_args(data_dir, tmp_path / "run") + ["--gradient_accumulation_steps=3"]
    result = subprocess.run(torchrun_command(*args), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "gradient_accumulation_steps (3) must be a multiple of the number of processes (2)" in result.stderr


@pytest.mark.parametrize("code, status, message", [(None, 0, ""), (143, 143, ""), ("train.py: error: bad", 1, "train.py: error: bad")])
def test_a_torchrun_process_ends_with_the_status_and_message_sys_exit_would_give(code, status, message):
    script = f"from nanoforge import distributed; print('flushed first'); distributed.end_process({code!r})"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as most users run it
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**env, "WORLD_SIZE": "2"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == status
    assert result.stdout == "flushed first\n"  # os._exit skips Python's flush: end_process must do it
    assert result.stderr.strip() == message
