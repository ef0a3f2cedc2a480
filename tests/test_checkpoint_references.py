"""nanoforge/checkpoint.py on its own, against references we did not write: the files are read back with the
safetensors library itself, the checksum is recomputed with hashlib, and the random states are compared with
torch's, numpy's and Python's own draws. Fast: no training runs here (test_robustness.py has the end-to-end
resume, kill and disk-full tests)."""

import glob
import hashlib
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from nanoforge import checkpoint
from nanoforge.checkpoint import CheckpointError


def states(step=0):
    torch.manual_seed(step)
    wte = torch.randn(8, 4)
    model_state = {"transformer.wte.weight": wte, "lm_head.weight": wte, "ln_f.bias": torch.randn(4)}  # tied
    optimizer_state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 4)},
                                 1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4)}},
                       "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.2, "params": [1]}]}
    info = {"step": step, "config": {"n_embd": 4}, "model": {"n_embd": 4}, "tokenizer": {"kind": "byte"}}
    return model_state, info, optimizer_state


def test_saved_file_is_plain_safetensors_with_a_sha256_of_its_tensors(tmp_path):
    path = str(tmp_path / "c.safetensors")
    model_state, info, optimizer_state = states(5)
    checkpoint.save(path, model_state, info, optimizer_state, {"rng": torch.arange(3)})
    raw = load_file(path)  # the safetensors library's own reader
    assert sorted(raw) == ["extra.rng", "model.ln_f.bias", "model.transformer.wte.weight", "optim.0.exp_avg",
                           "optim.0.step", "optim.1.exp_avg", "optim.1.step"]  # the tied lm_head stored once
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "nanoforge-checkpoint" and meta["version"] == "1"
    assert json.loads(meta["info"]) == info
    assert json.loads(meta["optimizer_param_groups"]) == optimizer_state["param_groups"]
    digest = hashlib.sha256()
    for name in sorted(raw):  # name, dtype, shape, then the bytes: recomputed here from the definition
        digest.update(name.encode() + str(raw[name].dtype).encode() + str(tuple(raw[name].shape)).encode())
        digest.update(raw[name].contiguous().numpy().tobytes())
    assert meta["sha256"] == digest.hexdigest()
    assert os.listdir(tmp_path) == ["c.safetensors"]  # no temporary left behind


def test_load_gives_back_what_was_saved(tmp_path):
    path = str(tmp_path / "c.safetensors")
    model_state, info, optimizer_state = states(2)
    checkpoint.save(path, model_state, info, optimizer_state, {"rng": torch.arange(3)})
    ckpt = checkpoint.load(path)
    assert ckpt.info == info and ckpt.path == path
    assert sorted(ckpt.model_state) == ["ln_f.bias", "transformer.wte.weight"]
    for name, t in ckpt.model_state.items():
        assert torch.equal(t, model_state[name])
    assert torch.equal(ckpt.extra["rng"], torch.arange(3))
    assert ckpt.optimizer_state["param_groups"] == optimizer_state["param_groups"]
    for index, state in optimizer_state["state"].items():
        assert sorted(ckpt.optimizer_state["state"][index]) == sorted(state)
        for name, value in state.items():
            assert torch.equal(ckpt.optimizer_state["state"][index][name], value)
    checkpoint.save(path, model_state, info)
    assert checkpoint.load(path).optimizer_state is None


def test_a_changed_byte_fails_the_checksum_and_other_files_are_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(str(path), *states()[:2])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes: safetensors still reads it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="failed its checksum"):
        checkpoint.load(str(path))
    torch.save({"a": 1}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        checkpoint.load(str(tmp_path / "ckpt.pt"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.load(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("field, value, message", [("format", "other", "is not a nanoforge-checkpoint file"),
                                                   ("version", "2", "is checkpoint format version '2'")])
def test_foreign_format_or_version_is_refused(tmp_path, field, value, message):
    from safetensors.torch import save_file
    path = str(tmp_path / "c.safetensors")
    checkpoint.save(path, *states()[:2])
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(path), path, metadata={**meta, field: value})
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load(path)
    if field == "format":
        with pytest.raises(CheckpointError, match=message):
            checkpoint.read_info(path)


def test_checkpoint_path_prefers_best_and_read_info_reads_the_header(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.checkpoint_path(str(tmp_path))
    assert not checkpoint.is_checkpoint(str(tmp_path))
    checkpoint.save(str(tmp_path / "latest.safetensors"), *states(1)[:2])
    assert checkpoint.checkpoint_path(str(tmp_path)) == str(tmp_path / "latest.safetensors")
    assert checkpoint.is_checkpoint(str(tmp_path))
    checkpoint.save(str(tmp_path / "best.safetensors"), *states(7)[:2])
    assert checkpoint.checkpoint_path(str(tmp_path)) == str(tmp_path / "best.safetensors")
    assert checkpoint.read_info(checkpoint.checkpoint_path(str(tmp_path)))["step"] == 7
    file = str(tmp_path / "latest.safetensors")
    assert checkpoint.checkpoint_path(file) == file and checkpoint.is_checkpoint(file)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.checkpoint_path(str(tmp_path / "nowhere"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable safetensors checkpoint"):
        checkpoint.read_info(str(tmp_path / "junk.safetensors"))


def test_save_latest_keeps_previous_and_the_last_n_step_copies(tmp_path):
    out = str(tmp_path)
    for step in (10, 20, 30, 40):
        checkpoint.save_latest(out, 2, step, *states(step))
    assert checkpoint.load(os.path.join(out, "latest.safetensors")).info["step"] == 40
    assert checkpoint.load(os.path.join(out, "previous.safetensors")).info["step"] == 30
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(out, "step_*"))) == \
        ["step_0000030.safetensors", "step_0000040.safetensors"]
    checkpoint.save_latest(out, 0, 50, *states(50))
    assert len(glob.glob(os.path.join(out, "step_*"))) == 2  # keep_last_n 0: no new copy, none removed
    checkpoint.save_latest(out, 1, 60, *states(60))
    assert [os.path.basename(p) for p in glob.glob(os.path.join(out, "step_*"))] == ["step_0000060.safetensors"]
    assert not glob.glob(os.path.join(out, "*.tmp-*"))


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    for name in (".latest.safetensors.tmp-123", "previous.safetensors.tmp-9", "latest.safetensors", "log.jsonl"):
        (tmp_path / name).write_text("x")
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["latest.safetensors", "log.jsonl"]


def test_resume_takes_the_newest_intact_checkpoint(tmp_path, capsys):
    out = str(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        checkpoint.load_for_resume(out)
    checkpoint.save(os.path.join(out, "best.safetensors"), *states(20))
    checkpoint.save(os.path.join(out, "latest.safetensors"), *states(30))
    checkpoint.save(os.path.join(out, "step_0000040.safetensors"), *states(40))
    assert checkpoint.load_for_resume(out).info["step"] == 40
    assert "resuming from" in capsys.readouterr().err
    os.remove(os.path.join(out, "step_0000040.safetensors"))
    checkpoint.save(os.path.join(out, "best.safetensors"), *states(30))  # a tie: latest wins
    assert checkpoint.load_for_resume(out).path == os.path.join(out, "latest.safetensors")
    assert capsys.readouterr().err == ""
    latest = tmp_path / "latest.safetensors"
    data = bytearray(latest.read_bytes())
    data[-3] ^= 0xFF
    latest.write_bytes(bytes(data))
    junk = os.path.join(out, "step_0000099.safetensors")
    with open(junk, "wb") as f:
        f.write(b"not even a header")
    assert checkpoint.load_for_resume(out).path == os.path.join(out, "best.safetensors")
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint '{junk}'" in err  # its header: unreadable
    assert f"skipping damaged checkpoint: '{latest}' failed its checksum" in err
    best = tmp_path / "best.safetensors"
    best.write_bytes(best.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match="every checkpoint in .* is damaged"):
        checkpoint.load_for_resume(out)


def test_random_states_restore_torch_numpy_and_python_draws():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    tensors, info = checkpoint.rng_state(torch.device("cpu"))
    info = json.loads(json.dumps(info))  # as the checkpoint's JSON header carries it
    expected = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(tensors, info, torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2:] == again[2:]


def test_saving_leaves_no_file_descriptor_open(tmp_path):
    """A training run saves hundreds of checkpoints: each save must close every file it opened (the temporary
    file and the directory it fsyncs), or the process runs out of descriptors."""
    fds = "/proc/self/fd"  # Linux, where CI and training runs are
    if not os.path.isdir(fds):
        pytest.skip("counting open descriptors needs /proc/self/fd (Linux)")
    model_state, info, _ = states()
    checkpoint.save(str(tmp_path / "c.safetensors"), model_state, info)  # imports and caches warmed up
    before = len(os.listdir(fds))
    for _ in range(5):
        checkpoint.save(str(tmp_path / "c.safetensors"), model_state, info)
    assert len(os.listdir(fds)) == before


def test_save_makes_the_data_and_the_rename_durable(tmp_path, monkeypatch):
    """A checkpoint survives a power cut only if its bytes reach the disk before the rename that publishes it,
    and the directory entry after it: fsync(file), rename, fsync(directory), in that order."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("naming a descriptor's file needs /proc/self/fd (Linux)")
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save(str(tmp_path / "c.safetensors"), *states()[:2])
    tmp_name = f".c.safetensors.tmp-{os.getpid()}"
    assert events == [("fsync", str(tmp_path / tmp_name)), ("rename", tmp_name, "c.safetensors"),
                      ("fsync", str(tmp_path))]
