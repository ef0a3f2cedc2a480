"""Fine-tuning for chat (SFT), the data and training side: chat sources (JSONL, Parquet, Alpaca, Dolly
downloaded from a local server) and their bad records, --tokenizer-from a checkpoint, init_from one of
our checkpoints (the embedding grows, old logits stay), masked validation loss, exact resume on chat
data, and a small random Hugging Face GPT-2 fine-tuned on conversations."""

import hashlib
import json
import os
import re
from contextlib import nullcontext

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from nanoforge import chat_format
from nanoforge import checkpoint, loading
from nanoforge import datasets
from nanoforge import preparation as prepare
from model import GPT, GPTConfig
from nanoforge.distributed import Distributed
from nanoforge.runs import RunState, build_model
from nanoforge.training import LogWindow, TrainingStopped, estimate_loss
from conftest import run_cli, tiny_config, train_chat_base
from nanoforge.data import Dataset
from nanoforge.sources import PrepareError
from nanoforge.tokenizer import CHAT_TOKENS, with_chat_tokens
from train import train

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def conversations(n):
    return [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i} " + "x" * i},
                          {"role": "assistant", "content": f"a{i}"}]} for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny char model trained a few steps: the checkpoint fine-tuning starts from."""
    return train_chat_base(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def task_data(base_run, tmp_path_factory):
    """The built-in tasks prepared with the base model's tokenizer (plus the chat tokens)."""
    out = tmp_path_factory.mktemp("tasks") / "data"
    prepare.prepare("chat_tasks", out_dir=str(out), tokenizer_from=str(base_run))
    return out


# ---------------------------------------------------------------------------------------------- data

def test_tokenizer_from_a_checkpoint_prepares_text_and_chat(base_run, task_data, tmp_path):
    base = checkpoint.load_tokenizer(str(base_run))
    meta = json.loads((task_data / "meta.json").read_text())
    assert meta["chat"] and meta["tokenizer"] == {**base.to_dict(), "chat_tokens": list(CHAT_TOKENS)}
    # plain text (continued pretraining): the checkpoint's tokenizer as it is
    corpus = tmp_path / "more.txt"
    corpus.write_text("reverse 123 add count\n" * 50)
    meta = prepare.prepare(str(corpus), out_dir=str(tmp_path / "text"), tokenizer_from=str(base_run / "latest.safetensors"))
    assert meta["tokenizer"] == base.to_dict() and not meta.get("chat")
    # a tokenizer that has the chat tokens already keeps them, for plain text too, and is not extended twice
    ckpt = tmp_path / "chatty.safetensors"
    checkpoint.save(str(ckpt), {"w": torch.zeros(1)}, {"model": {}, "tokenizer": with_chat_tokens(base).to_dict()})
    for source, out in ((corpus, "t2"), ("chat_tasks", "c2")):
        meta = prepare.prepare(str(source), out_dir=str(tmp_path / out), tokenizer_from=str(ckpt))
        assert meta["tokenizer"] == with_chat_tokens(base).to_dict()


def test_tokenizer_from_errors_are_one_line(base_run, tmp_path):
    text = tmp_path / "greek.txt"
    text.write_text("First\nSecond line with λ\n")
    records = write_jsonl(tmp_path / "c.jsonl", [GOOD, {"messages": [{"role": "user", "content": "ok"},
                                                                      {"role": "assistant", "content": "€"}]}])
    cases = [
        ((text,), f"'{text}' line 2 has character 'λ' (U+03BB), which the char vocabulary of '{base_run}' lacks"),
        ((records,), f"'{records}' line 2: text contains 1 character(s) not in this model's vocabulary: '€'"),
        ((text, "byte"), "--tokenizer-from takes the checkpoint's tokenizer: drop --tokenizer"),
        ((tmp_path / "none",), "is neither a built-in dataset"),
    ]
    for args, message in cases:
        with pytest.raises(PrepareError, match=re.escape(message)):
            prepare.prepare(str(args[0]), *args[1:2], out_dir=str(tmp_path / "d"), tokenizer_from=str(base_run))
        assert not (tmp_path / "d" / "meta.json").exists()
    with pytest.raises(PrepareError, match="--tokenizer-from: checkpoint .*missing' does not exist"):
        prepare.prepare(str(text), out_dir=str(tmp_path / "d"), tokenizer_from=str(tmp_path / "missing"))
    result = run_cli("prepare.py", text, "--tokenizer-from", base_run, "--out", tmp_path / "d")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(f"prepare.py: error: {cases[0][1]}")


def test_parquet_messages_and_alpaca_records_are_chat_sources(tmp_path):
    records = conversations(30)
    jsonl = write_jsonl(tmp_path / "c.jsonl", records)
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    a = prepare.prepare(str(jsonl), "byte", str(tmp_path / "j"), 0.2)
    b = prepare.prepare(str(parquet), "byte", str(tmp_path / "p"), 0.2)
    assert a["chat"] and b["chat"] and a["train_conversations"] + a["val_conversations"] == 30
    for name in ("train.bin", "val_mask.bin", "train_starts.bin"):  # the same conversations, split alike
        assert (tmp_path / "j" / name).read_bytes() == (tmp_path / "p" / name).read_bytes()

    alpaca = [{"instruction": f"Say {i}.", "input": "" if i % 2 else "loudly", "output": f"{i}!"} for i in range(20)]
    write_jsonl(tmp_path / "a.jsonl", alpaca)
    pq.write_table(pa.Table.from_pylist(alpaca), tmp_path / "a.parquet")
    for source in ("a.jsonl", "a.parquet"):
        meta = prepare.prepare(str(tmp_path / source), "byte", str(tmp_path / source.replace(".", "_")), 0.2)
        assert meta["chat"]
    data = Dataset(str(tmp_path / "a_parquet"), 64)
    ids = data.splits["train"][: data.chat["train"].ends[0]].tolist()
    assert data.tokenizer.decode(ids).startswith("<|bos|><|user_start|>Say 0.\n\nloudly<|user_end|>")


BAD_RECORDS = [
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}, "has empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "roles must alternate"),
    ({"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}, "missing its 'role' or 'content'"),
    ({"instruction": "Do it."}, "needs an 'output' field"),
    ({"messages": [{"role": "user", "content": "a"}]}, "no assistant turn"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bad_records_are_named_by_file_and_line_or_skipped_and_counted(tmp_path, fmt):
    for k, (bad, problem) in enumerate(BAD_RECORDS):
        if fmt == "parquet" and "messages" not in bad:
            continue  # a Parquet file's rows share its columns
        records = conversations(6)
        records.insert(3, bad)
        path = tmp_path / f"bad{k}.{fmt}"
        if fmt == "jsonl":
            write_jsonl(path, records)
        else:  # a missing struct field reads back as null, which counts as missing
            pq.write_table(pa.Table.from_pylist(records), path)
        where = f"'{path}' {'line' if fmt == 'jsonl' else 'row'} 4: "
        out = tmp_path / f"out{k}"
        if k == 0:  # through the command line: one line, exit 1, nothing complete-looking
            result = run_cli("prepare.py", path, "--tokenizer", "byte", "--out", out, "--val-fraction", "0.3")
            assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
            assert result.stderr.startswith(f"prepare.py: error: {where}") and problem in result.stderr
            assert "--skip-bad" in result.stderr
            assert not (out / "meta.json").exists()
        with pytest.raises(PrepareError) as error:
            prepare.prepare(str(path), "byte", str(out), 0.3)
        assert str(error.value).startswith(where) and problem in str(error.value)
        meta = prepare.prepare(str(path), "byte", str(out), 0.3, skip_bad=True)
        assert meta["skipped_records"] == 1 and meta["train_conversations"] + meta["val_conversations"] == 6
    result = run_cli("prepare.py", path, "--tokenizer", "byte", "--out", tmp_path / "cli", "--skip-bad",
                     "--val-fraction", "0.3")
    assert result.returncode == 0 and "skipped 1 bad record(s) (--skip-bad); the first: " + where in result.stderr
    result = run_cli("prepare.py", tmp_path / "out0" / "meta.json", "--out", tmp_path / "t", "--skip-bad")
    assert "--skip-bad applies to chat records" in result.stderr


@pytest.fixture
def hf_server(monkeypatch, http_server):
    """A local stand-in for Hugging Face: /api lists Dolly's file with its sha256, /file serves it with
    HTTP Range. `served` may differ from `listed` (a corrupted or changed file)."""
    state = {"listed": b"", "served": None, "requests": []}

    def respond(path, start):
        state["requests"].append((path, start))
        if path == "/api":
            listed = state["listed"]
            return 200, json.dumps([{"type": "file", "path": "README.md", "size": 1},
                                    {"type": "file", "path": datasets.DOLLY_FILE, "size": len(listed),
                                     "lfs": {"oid": hashlib.sha256(listed).hexdigest(), "size": len(listed)}}]).encode()
        data = state["served"] if state["served"] is not None else state["listed"]
        return (206, data[start:]) if start else (200, data)

    url = http_server(respond)
    monkeypatch.setattr(datasets, "DOLLY_API", url + "/api")
    monkeypatch.setattr(datasets, "DOLLY_URL", url + "/file")
    return state


def test_dolly_downloads_resume_verify_and_work_offline_from_a_local_copy(tmp_path, hf_server, monkeypatch):
    records = [{"instruction": f"Name {i}.", "context": "" if i % 3 else f"Context {i}.", "response": f"N{i}.",
                "category": "open_qa"} for i in range(40)]
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    hf_server["listed"] = data
    out = tmp_path / "dolly"
    (out / "download").mkdir(parents=True)
    (out / "download" / (datasets.DOLLY_FILE + ".part")).write_bytes(data[:100])  # an interrupted download
    meta = prepare.prepare("dolly", "byte", str(out), 0.2)
    assert ("/file", 100) in hf_server["requests"]  # resumed, not restarted
    assert meta["chat"] and meta["train_conversations"] + meta["val_conversations"] == 40
    assert meta["source"]["sha256"] == hashlib.sha256(data).hexdigest()
    text = Dataset(str(out), 64).tokenizer.decode(prepare.np.asarray(prepare.np.memmap(out / "train.bin", "uint16")))
    assert "<|user_start|>Name 0.\n\nContext 0.<|user_end|><|assistant_start|>N0.<|assistant_end|>" in text

    (out / "download" / datasets.DOLLY_FILE).unlink()
    hf_server["served"] = data.replace(b"N1.", b"X1.")  # the file changed under the pinned listing
    with pytest.raises(PrepareError, match="has sha256 .*, expected .*: the file changed or was corrupted"):
        prepare.prepare("dolly", "byte", str(out), 0.2)
    assert os.listdir(out / "download") == []  # nothing bad kept

    monkeypatch.setattr(datasets, "DOLLY_API", "http://127.0.0.1:9/api")  # nothing listens on port 9
    result_error = pytest.raises(PrepareError, match="could not download .* pass --source PATH to a local copy")
    with result_error:
        prepare.prepare("dolly", "byte", str(out), 0.2)
    local = tmp_path / "dolly.jsonl"
    local.write_bytes(data)
    assert prepare.prepare("dolly", "byte", str(out), 0.2, source_path=str(local))["chat"]


# ------------------------------------------------------------------------------------------ training

def test_init_from_a_checkpoint_grows_the_embedding_and_keeps_old_logits(base_run, task_data):
    base, tokenizer = loading.load_model(str(base_run), "cpu")
    data = Dataset(str(task_data), 24)
    cfg = tiny_config(task_data, "unused", init_from=str(base_run), n_layer=3, n_embd=48, block_size=24,
                      vocab_multiple=8)
    model, cfg = build_model(cfg, data, torch.device("cpu"))
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size) == (2, 32, 24)  # the weights decide; block_size crops
    n_old = tokenizer.vocab_size
    wte = model.transformer.wte.weight
    assert model.config.vocab_size == len(wte) == -(-(n_old + len(CHAT_TOKENS)) // 8) * 8
    assert torch.equal(wte[:n_old], base.transformer.wte.weight)
    assert torch.allclose(wte[n_old:], base.transformer.wte.weight.mean(dim=0).expand(len(wte) - n_old, -1))
    model.eval()
    x = torch.tensor([tokenizer.encode("reverse abc")])
    with torch.no_grad():
        grown, old = model(x)[0], base(x)[0]
    # equal up to float rounding (a wider matmul may sum in another order); a new token scores the old ones' mean
    torch.testing.assert_close(grown[..., :n_old], old, rtol=0, atol=1e-6)
    torch.testing.assert_close(grown[..., n_old], old.mean(dim=-1), rtol=0, atol=1e-6)

    # an untied lm_head (stored apart from the embedding) grows the same way
    state = {"transformer.wte.weight": torch.randn(5, 3), "lm_head.weight": torch.randn(6, 3)}
    grown = loading.grow_vocabulary(state, 4, 7)
    for name, t in state.items():
        assert torch.equal(grown[name][:4], t[:4]) and torch.allclose(grown[name][4:], t[:4].mean(0).expand(3, -1))


def test_init_from_refuses_data_of_another_tokenizer_and_a_longer_context(base_run, task_data, tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(20))
    prepare.prepare(str(path), "byte", str(tmp_path / "d"), 0.2)
    cfg = tiny_config(tmp_path / "d", tmp_path / "run", init_from=str(base_run), block_size=32)
    with pytest.raises(checkpoint.CheckpointError, match=r"the data's tokenizer \(byte, 266 tokens\) is not the one of "
                       ".*--tokenizer-from"):
        train(cfg)
    result = run_cli("train.py", f"--data_dir={task_data}", f"--out_dir={tmp_path / 'run'}",
                     f"--init_from={base_run}", "--block_size=64", "--device=cpu")
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "train.py: error: block_size 64 is larger than the 32 positions" in result.stderr


def test_validation_loss_is_over_masked_tokens_only(task_data):
    data = Dataset(str(task_data), 32)
    cfg = tiny_config(task_data, "unused", block_size=32, eval_iters=2, batch_size=6)
    torch.manual_seed(0)
    model = GPT(GPTConfig(32, data.vocab_size, 2, 2, 32)).eval()
    losses = estimate_loss(model, data, cfg, nullcontext(), torch.device("cpu"),
                           Distributed())
    split = data.chat["val"]
    by_input = {tuple(ids[:-1].tolist()): (ids, mask) for ids, mask in map(lambda i: split.row(i, 32), split.drawable)}
    generator, expected = torch.Generator().manual_seed(cfg.seed + 1), 0.0
    for _ in range(cfg.eval_iters):
        x, _ = data.get_batch("val", cfg.batch_size, generator)
        logits = model(x)[0]
        terms = []
        for b in range(len(x)):  # find each row's conversation, and score its assistant tokens from the mask on disk
            ids, mask = next(by_input[tuple(x[b, :n].tolist())] for n in range(x.size(1), 0, -1)
                             if tuple(x[b, :n].tolist()) in by_input)
            terms += [F.cross_entropy(logits[b, t - 1], torch.tensor(int(ids[t]))) for t in range(1, len(ids)) if mask[t]]
        expected += torch.stack(terms).mean().item() / cfg.eval_iters
    assert losses["val"] == pytest.approx(expected, rel=1e-5)


def test_interrupted_and_resumed_fine_tuning_on_chat_data_equals_straight_run_bitwise(base_run, task_data,
                                                                                       tmp_path, monkeypatch):
    import shutil

    from test_robustness import interrupt_at, losses, read_log

    base = shutil.copytree(base_run, tmp_path / "base")
    settings = dict(init_from=str(base), block_size=24, max_iters=8, eval_interval=4, log_interval=2,
                    checkpoint_interval=4, dropout=0.1)
    train(tiny_config(task_data, tmp_path / "straight", **settings))
    resumed = tiny_config(task_data, tmp_path / "resumed", **settings)
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(TrainingStopped):
            train(resumed)
    shutil.rmtree(base)  # the run's own checkpoint holds everything a resume needs
    train(resumed, resume=True)
    a = checkpoint.load(tmp_path / "straight" / "latest.safetensors")
    b = checkpoint.load(tmp_path / "resumed" / "latest.safetensors")
    for name, tensor in a.model_state.items():
        assert torch.equal(tensor, b.model_state[name]), name
    assert losses(read_log(tmp_path / "straight")) == losses(read_log(tmp_path / "resumed"))


def test_fine_tuning_from_the_command_line_reports_cut_conversations_and_learns(base_run, task_data, tmp_path):
    run = tmp_path / "sft"
    result = run_cli("train.py", f"--init_from={base_run}", f"--data_dir={task_data}", f"--out_dir={run}",
                     "--block_size=20", "--batch_size=16", "--max_iters=20", "--eval_interval=20", "--eval_iters=2",
                     "--learning_rate=3e-3", "--warmup_iters=0", "--device=cpu", "--dtype=float32")
    assert result.returncode == 0, result.stderr
    assert "init_from " + str(base_run) + ": the weights set n_layer=2 (config had 12)" in result.stderr
    assert "data: train: " in result.stderr and "conversations are longer than block_size + 1 = 21 tokens" in result.stderr
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert log[-1]["val_loss"] < log[0]["loss"]
    config = json.loads((run / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["block_size"]) == (2, 32, 20)
    _, tokenizer = loading.load_model(str(run), "cpu")
    assert tokenizer.to_dict() == json.loads((task_data / "meta.json").read_text())["tokenizer"]


# -------------------------------------------------------------------------------- Hugging Face GPT-2

def test_gpt2_tokenizer_with_chat_tokens_round_trips(tmp_path):
    from nanoforge import gpt2
    from test_gpt2 import tiny_bpe

    tiny_bpe(tmp_path)
    tok = with_chat_tokens(gpt2.tokenizer_from_hf(str(tmp_path)))
    again = prepare.tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    messages = [{"role": "user", "content": "Speak, <|user_end|> ünï 12"}, {"role": "assistant", "content": "Resolved."}]
    ids, mask = chat_format.render_conversation(again, messages)
    assert (ids, mask) == chat_format.render_conversation(tok, messages)
    assert again.decode(ids) == ("<|bos|><|user_start|>Speak, <|user_end|> ünï 12<|user_end|>"
                                 "<|assistant_start|>Resolved.<|assistant_end|>")
    assert sum(i >= tok.base.vocab_size for i in ids) == 5  # the literal "<|user_end|>" stayed text


def test_a_hugging_face_gpt2_directory_fine_tunes_on_chat_data(tmp_path):
    from nanoforge import gpt2
    from test_gpt2 import random_gpt2, tiny_bpe

    directory = tmp_path / "hf"
    directory.mkdir()
    tiny_bpe(directory)
    vocab = json.loads((directory / "vocab.json").read_text())
    random_gpt2(vocab_size=len(vocab)).save_pretrained(directory)
    hf_tokenizer = gpt2.tokenizer_from_hf(str(directory))
    records = [{"messages": [{"role": "user", "content": f"Speak {i % 7}."},
                             {"role": "assistant", "content": "Resolved. " * (i % 7 + 1)}]} for i in range(200)]
    path = write_jsonl(tmp_path / "c.jsonl", records)
    # the data takes the directory's tokenizer, plus the chat tokens
    prepare.prepare(str(path), out_dir=str(tmp_path / "d"), val_fraction=0.1, tokenizer_from=str(directory))
    assert Dataset(str(tmp_path / "d"), 48).tokenizer.to_dict() == with_chat_tokens(hf_tokenizer).to_dict()
    cfg = tiny_config(tmp_path / "d", tmp_path / "run", init_from=str(directory), block_size=48, max_iters=30,
                      eval_interval=30, learning_rate=3e-3, warmup_iters=0, batch_size=8)
    train(cfg)
    ckpt = checkpoint.load(tmp_path / "run" / "latest.safetensors")
    wte = ckpt.model_state["transformer.wte.weight"]
    assert len(wte) == len(vocab) + len(CHAT_TOKENS)  # grown by the chat tokens' rows
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert log[-1]["val_loss"] < 0.5 * log[0]["loss"]
    assert ckpt.info["config"]["n_embd"] == 64


def test_tokens_per_second_counts_the_tokens_fed_not_batch_times_block(task_data):
    """A chat batch is only as long as its longest conversation: tokens/s (and MFU) must count what was
    fed, or an SFT run reports several times its real speed."""
    block_size = 128
    data = Dataset(str(task_data), block_size)
    generator = torch.Generator().manual_seed(0)
    window = LogWindow(flops_per_token=1.0, peak=None, processes=2)
    fed = 0
    for _ in range(3):
        x, _ = data.get_batch("train", 6, generator)
        window.add(x)
        fed += x.numel() * 2
    assert window.tokens == fed < 3 * 6 * block_size * 2  # the tasks' conversations are far shorter than 128
    window.start -= 2.0  # as if the window had lasted 2 s (plus the moment it took)
    state = RunState.start(tiny_config(task_data, "unused"), torch.device("cpu"))
    assert window.record(state, 1e-3)["tokens_per_sec"] == pytest.approx(fed / 2.0, rel=0.01)


def test_char_chat_data_with_a_system_message_prepares(tmp_path):
    """The system message is joined to the first user message by a blank line: the char vocabulary must
    hold "\\n" even when no message does."""
    path = write_jsonl(tmp_path / "c.jsonl", conversations(6))
    meta = prepare.prepare(str(path), "char", str(tmp_path / "d"), 0.3)
    assert meta["train_conversations"] + meta["val_conversations"] == 6
