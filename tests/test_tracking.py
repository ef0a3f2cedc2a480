"""Weights & Biases and TensorBoard receive the records of log.jsonl (the real libraries, offline), and
turning one on without its package installed is a one-line error naming the extra."""

import glob
import json
import struct
import sys

import pytest

from conftest import tiny_config
from train import train


def wandb_history(run_file):
    """The history rows of an offline W&B run file: a log of 32 KiB blocks whose records (7-byte
    header: crc, length, kind) hold protobuf Records, after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = open(run_file, "rb").read(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos: pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # padding to the end of the block
            pos += left
            continue
        pending += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_and_tensorboard_receive_the_log_records(tmp_path, data_dir, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(tiny_config(data_dir, out, max_iters=10, wandb_log=True, wandb_run_name="tiny",
                      tensorboard_log=True))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10] and "val_loss" in records[-1]

    (run_file,) = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    assert [row["_step"] for row in history] == [5, 10]
    for row, record in zip(history, records):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):  # the trackers get the numbers (not "machine")
                assert row[key] == pytest.approx(value), key

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    assert [e.step for e in events.Scalars("val_loss")] == [10]


@pytest.mark.parametrize("key,module,extra", [("--wandb_log=true", "wandb", "wandb"),
                                              ("--tensorboard_log=true", "tensorboard", "tensorboard")])
def test_a_tracker_without_its_package_is_a_one_line_error(tmp_path, data_dir, monkeypatch, key, module, extra):
    import importlib.util

    import train as train_script

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as stopped:
        train_script.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'run'}", "--device=cpu", "--block_size=16",
                           key])
    message = str(stopped.value)
    assert message.startswith("train.py: error: ") and "\n" not in message
    assert f"needs the {module} package, which is not installed: pip install -e '.[{extra}]'" in message
    assert not (tmp_path / "run" / "config.json").exists()


def test_trackers_get_the_config_the_weights_completed(tmp_path, data_dir, monkeypatch):
    """init_from sets n_layer (and the other shape keys) from the weights: the trackers must record those
    values, as config.json does, not the config file's."""
    import train as train_script

    train(tiny_config(data_dir, tmp_path / "base", max_iters=2, n_layer=1))
    seen = []

    class RecordingTrackers(train_script.Trackers):
        def __init__(self, cfg, enabled=True):
            seen.append(cfg)
            super().__init__(cfg, enabled)

    monkeypatch.setattr(train_script, "Trackers", RecordingTrackers)
    train(tiny_config(data_dir, tmp_path / "tuned", max_iters=2, n_layer=3, init_from=str(tmp_path / "base")))
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert [cfg.n_layer for cfg in seen] == [1] == [saved["n_layer"]]
