"""parallel = "fsdp" through the real torchrun (two CPU processes over gloo), and two "nodes" on 127.0.0.1.

The runs are shared by the tests (a module-scoped cache): each is made once, when a test first needs it.
Dropout is 0 so that one process and two can compute the same thing; the batches are the same because
every process draws from one stream (Dataset.get_batch's share)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from nanoforge import checkpoint, hellaswag, loading, multiple_choice
from nanoforge.data import Dataset
from nanoforge.preparation import prepare
from conftest import REPO, TINY_TEXT
from test_multiple_choice import hellaswag_records, write_jsonl

STEPS = 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Muon with the speedruns' architecture (two optimizers' state, rotary positions, an untied lm_head),
# and activation checkpointing, which must not change what is computed.
MUON = ["--optimizer=muon", "--pos_emb=rope", "--norm=rmsnorm", "--mlp=relu2", "--qk_norm=true",
        "--tie_embeddings=false", "--activation_checkpointing=true"]


def torchrun(*args, launch=("--standalone", "--nproc_per_node=2")):
    return [sys.executable, "-m", "torch.distributed.run", *launch, os.path.join(REPO, "train.py"), *map(str, args)]


def one_process(*args):
    return [sys.executable, os.path.join(REPO, "train.py"), *map(str, args)]


def run_args(data_dir, out_dir, extra=()):
    # gradient_accumulation_steps=4: one process runs 4 micro-batches a step, each of two processes 2.
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=16", "--batch_size=4", "--gradient_accumulation_steps=4", f"--max_iters={STEPS}",
            f"--eval_interval={STEPS // 2}", "--eval_iters=2", "--log_interval=1", "--checkpoint_interval=2",
            "--keep_last_n=20", "--dropout=0.0", "--device=cpu",
            # Clipping on every step (the norms are above 0.1 here): it must use the norm of the whole gradient.
            "--grad_clip=0.1", *extra]


def run(command):
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def records(out_dir):
    return [json.loads(line) for line in open(out_dir / "log.jsonl")]


def logged(out_dir):
    """What a run's log says about its training (not its speed)."""
    return [{k: r.get(k) for k in ("step", "loss", "lr", "train_loss", "val_loss")} for r in records(out_dir)]


def training_losses(out_dir):
    return [(r["step"], r["loss"]) for r in records(out_dir)]


def assert_close_losses(a, b):
    """Equal steps, losses equal to float32 tolerance (the processes sum gradients in another order)."""
    assert [step for step, _ in a] == [step for step, _ in b]
    assert [loss for _, loss in a] == pytest.approx([loss for _, loss in b], rel=1e-5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """runs[name] -> the run directory of a finished run, made on first use."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "corpus.txt").write_text(TINY_TEXT, encoding="utf-8")
    data = root / "data"
    prepare(str(root / "corpus.txt"), "char", str(data), 0.1)
    hellaswag_file = write_jsonl(root / "hellaswag.jsonl", hellaswag_records(17, ending_words=1))
    hellaswag_args = [f"--hellaswag_interval={STEPS}", f"--hellaswag_data={hellaswag_file}"]
    recipes = {
        "one/adamw": lambda out: one_process(*run_args(data, out)),
        "fsdp/adamw": lambda out: torchrun(*run_args(data, out, ["--parallel=fsdp"])),
        "ddp/adamw": lambda out: torchrun(*run_args(data, out)),
        "one/muon": lambda out: one_process(*run_args(data, out, MUON[:-1])),
        # HellaSwag during training too: 17 examples split over two processes would need 2 forward passes in
        # one and 1 in the other (32 rows each), and a sharded forward pass needs every process.
        "fsdp/muon": lambda out: torchrun(*run_args(data, out, ["--parallel=fsdp", *MUON, *hellaswag_args])),
    }
    done = {}

    class Runs:
        data_dir = data
        hellaswag_data = hellaswag_file

        def __getitem__(self, name):
            if name not in done:
                out = root / name.replace("/", "-")
                run(recipes[name](out))
                done[name] = out
            return done[name]

        def new_dir(self, name):
            return root / name

    return Runs()


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fsdp_trains_as_one_process_on_the_same_global_batch(runs, optimizer):
    one, fsdp = runs[f"one/{optimizer}"], runs[f"fsdp/{optimizer}"]
    assert_close_losses(training_losses(fsdp), training_losses(one))
    # The gathered checkpoint is the one a single process writes: the same names, the same values.
    a = checkpoint.load(one / "latest.safetensors")
    b = checkpoint.load(fsdp / "latest.safetensors")
    assert a.model_state.keys() == b.model_state.keys()
    # Muon orthogonalises in bfloat16 on this CPU (optim.newton_schulz_dtype): float32-level differences in its
    # input can move an update's element (|u| <= 1) by a bfloat16 rounding step (2**-8 relative), which each
    # step applies times matrix_lr (0.02) and sqrt(out / in) (at most sqrt(3) here).
    atol = 1e-6 if optimizer == "adamw" else STEPS * 2**-8 * 0.02 * 3**0.5
    for name, tensor in a.model_state.items():
        torch.testing.assert_close(b.model_state[name], tensor, rtol=1e-4, atol=atol)
    assert a.optimizer_state["param_groups"] == b.optimizer_state["param_groups"]
    assert a.optimizer_state["state"].keys() == b.optimizer_state["state"].keys()
    for index, state in a.optimizer_state["state"].items():
        for name, tensor in state.items():
            torch.testing.assert_close(b.optimizer_state["state"][index][name], tensor, rtol=1e-4, atol=atol)


def test_fsdp_scores_hellaswag_during_training(runs):
    """Every process scores every example (no split under FSDP): the count is the whole set and the accuracy
    the one a single process gives the same (final) weights."""
    final = records(runs["fsdp/muon"])[-1]
    assert final["hellaswag_n"] == 17
    model, tokenizer = loading.load_model(str(runs["fsdp/muon"] / "latest.safetensors"), "cpu")
    alone = multiple_choice.evaluate(model, tokenizer, hellaswag.read_examples(str(runs.hellaswag_data)))
    assert (final["hellaswag_acc"], final["hellaswag_acc_norm"]) == (round(alone["acc"], 6),
                                                                      round(alone["acc_norm"], 6))


def test_fsdp_resumes_exactly_after_sigterm(runs):
    straight = runs["fsdp/adamw"]
    stopped = runs.new_dir("fsdp-stopped")
    command = torchrun(*run_args(runs.data_dir, stopped, ["--parallel=fsdp"]))
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (stopped / "latest.safetensors").exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "stopped by SIGTERM at step" in stderr, stderr[-3000:]
    assert 0 < checkpoint.load(stopped / "latest.safetensors").info["step"] < STEPS

    run(command + ["--resume"])
    assert logged(stopped) == logged(straight)
    a = checkpoint.load(straight / "latest.safetensors")
    b = checkpoint.load(stopped / "latest.safetensors")
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name


def resume_from(source, step, out_dir, command):
    """Continue `source`'s run from its step checkpoint in a new run directory with `command`."""
    out_dir.mkdir()
    shutil.copy(source / f"step_{step:07d}.safetensors", out_dir / "latest.safetensors")
    return run(command + ["--resume"])


@pytest.mark.parametrize("source, mode", [("fsdp", "ddp"), ("fsdp", "one"), ("ddp", "fsdp")])
def test_a_checkpoint_resumes_in_the_other_mode(runs, source, mode):
    straight = runs[f"{source}/adamw"]
    out = runs.new_dir(f"{source}-to-{mode}")
    args = run_args(runs.data_dir, out, ["--parallel=fsdp"] if mode == "fsdp" else [])
    result = resume_from(straight, 4, out, one_process(*args) if mode == "one" else torchrun(*args))
    if mode == "one":  # two processes' random states, one process: the batches still go on exactly
        assert "the run had 2 processes, now 1: the batches go on as they would have" in result.stderr
    assert_close_losses(training_losses(out), training_losses(straight)[4:])


def test_an_fsdp_checkpoint_samples(runs):
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", runs["fsdp/adamw"],
                             "--prompt", "First", "--max-new-tokens", "20", "--no-stream", "--device", "cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("First") and len(result.stdout) > len("First") + 10


def test_fsdp_refuses_float16(runs, tmp_path):
    args = run_args(runs.data_dir, tmp_path / "run", ["--parallel=fsdp", "--dtype=float16"])
    result = subprocess.run(torchrun(*args), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "train.py: error: parallel = 'fsdp' does not train in float16" in result.stderr
    assert not (tmp_path / "run" / "log.jsonl").exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_as_one_two_process_run(runs):
    """Two torchrun launches, one process each, meeting at a static rendezvous on 127.0.0.1, as two
    machines would (docs/distributed.md): the same losses as two processes started by one torchrun."""
    out = runs.new_dir("two-nodes")
    port = free_port()
    nodes = [subprocess.Popen(
        torchrun(*run_args(runs.data_dir, out), launch=("--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
                                                        "--master_addr=127.0.0.1", f"--master_port={port}")),
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        _, stderr = node.communicate(timeout=600)
        assert node.returncode == 0, stderr[-3000:]
    assert len(checkpoint.load(out / "latest.safetensors").info["rng"]) == 2  # one run of two processes
    assert training_losses(out) == training_losses(runs["ddp/adamw"])


def test_processes_share_one_batch_stream(data_dir):
    """Two processes with the same generator take the micro-batches one process draws from it, in turn."""
    data = Dataset(str(data_dir), 16)
    alone = torch.Generator().manual_seed(1)
    one = [data.get_batch("train", 4, alone) for _ in range(4)]
    for rank in (0, 1):
        shared = torch.Generator().manual_seed(1)
        mine = [data.get_batch("train", 4, shared, share=(rank, 2)) for _ in range(2)]
        for (x, y), (x1, y1) in zip(mine, one[rank::2]):
            assert torch.equal(x, x1) and torch.equal(y, y1)
        assert torch.equal(shared.get_state(), alone.get_state())  # the stream moved on by the same draws
