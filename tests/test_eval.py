"""eval.py: loss, perplexity and bits per byte over a whole val split (chat data: masked tokens only),
exact-match accuracy on conversations, the built-in tasks' val split, --json, and its errors."""

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch

from nanoforge import chat_format, chat_tasks
from nanoforge import checkpoint, loading
import eval as eval_script  # the command
from nanoforge import evaluation
from nanoforge import preparation as prepare
from conftest import CHAT_LESSONS, conversation, run_cli
from nanoforge.data import open_array, open_split, read_meta
from model import GPT, GPTConfig
from nanoforge.tokenizer import (BPETokenizer, ByteTokenizer, CharTokenizer, token_byte_counts, tokenizer_from_dict,
                       with_chat_tokens)



@pytest.mark.parametrize("tok", [CharTokenizer.train("héllo wörld €\n"), ByteTokenizer(),
                                 BPETokenizer.train(["héllo wörld € " * 20], 266)], ids=["char", "byte", "bpe"])
def test_token_byte_counts_add_up_to_the_texts_utf8_bytes(tok):
    text = "héllo wörld €\n€ héllo"
    for t in (tok, with_chat_tokens(tok)):
        counts = token_byte_counts(t)
        assert len(counts) == t.vocab_size
        assert counts[t.encode(text)].sum() == len(text.encode("utf-8"))
        if t.eot_id is not None:
            assert counts[t.eot_id] == 0
    assert (token_byte_counts(with_chat_tokens(tok))[tok.vocab_size:] == 0).all()


def save_model(path, tokenizer, block_size=16, seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16,
                          dropout=0.0, bias=True))
    checkpoint.save(str(path), model.state_dict(), {"model": dataclasses.asdict(model.config),
                                                    "tokenizer": tokenizer.to_dict()})
    return loading.load_model(str(path), "cpu")[0]


def run_eval(capsys, *args):
    """eval.py's main in this process (as the command line runs it, without a new interpreter): (out, error)."""
    try:
        eval_script.main([str(a) for a in args] + ["--device", "cpu"])
        error = None
    except SystemExit as e:
        error = str(e.code)
    return capsys.readouterr().out, error


def eval_json(capsys, *args):
    out, error = run_eval(capsys, *args, "--json")
    assert error is None, error
    return json.loads(out)


def reference_loss(model, windows):
    """Token-weighted mean of the model's own loss over each window, one window at a time."""
    nats = tokens = 0
    for x, y in windows:
        _, loss = model(torch.tensor(x)[None], torch.tensor(y)[None])
        n = int((torch.tensor(y) != -1).sum())
        nats, tokens = nats + loss.item() * n, tokens + n
    return nats / tokens, tokens


def test_loss_on_plain_data_covers_every_val_token_once(tmp_path, data_dir, capsys):
    meta = read_meta(str(data_dir))
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    model = save_model(tmp_path / "m.safetensors", tokenizer)  # a base model: no chat tokens needed
    val = np.asarray(open_split(str(data_dir), "val", meta), dtype=np.int64)
    T = model.config.block_size
    windows = [(val[s : min(s + T, len(val) - 1)], val[s + 1 : min(s + T, len(val) - 1) + 1])
               for s in range(0, len(val) - 1, T)]
    expected_loss, tokens = reference_loss(model, windows)
    assert tokens == len(val) - 1
    results = eval_json(capsys, "--ckpt", tmp_path / "m.safetensors", "--data", data_dir, "--batch-size", "5")
    assert results["tokens"] == len(val) - 1
    assert results["bytes"] == len(tokenizer.decode(val[1:].tolist()).encode("utf-8"))
    assert results["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert results["perplexity"] == pytest.approx(math.exp(expected_loss), rel=1e-5)
    assert results["bits_per_byte"] == pytest.approx(expected_loss * tokens / math.log(2) / results["bytes"], rel=1e-5)
    assert results["batches"] == math.ceil(len(windows) / 5)
    # --max N: the first N windows only; the same windows give the same numbers (deterministic)
    first = eval_json(capsys, "--ckpt", tmp_path / "m.safetensors", "--data", data_dir, "--batch-size", "5",
                      "--max", "5")
    assert first["batches"] == 1 and first["tokens"] == 5 * T
    assert first["loss"] == pytest.approx(reference_loss(model, windows[:5])[0], rel=1e-5)
    # a chat model reads its base tokenizer's data with every id unchanged: loss before and after SFT compare
    chat_model = save_model(tmp_path / "chat_format.safetensors", with_chat_tokens(tokenizer))
    chat_results = eval_json(capsys, "--ckpt", tmp_path / "chat_format.safetensors", "--data", data_dir, "--batch-size", "5")
    assert chat_results["loss"] == pytest.approx(reference_loss(chat_model, windows)[0], rel=1e-5)


@pytest.fixture
def chat_dir(tmp_path):
    """Prepared chat data (byte + chat tokens, as the chat model's): the lessons the chat model learned, and
    conversations longer than its block_size + 1 (33 tokens)."""
    path = tmp_path / "lessons.jsonl"
    long = conversation(("tell me a long story please", "once upon a time there was a tiny model"))
    write_jsonl(path, [conversation(*pairs) for pairs in CHAT_LESSONS] * 2 + [long] * 3)
    prepare.prepare(str(path), "byte", str(tmp_path / "chat_data"), 0.5)
    return tmp_path / "chat_data"


def test_loss_on_chat_data_counts_only_masked_tokens(chat_ckpt, chat_dir):
    meta = read_meta(str(chat_dir))
    val = np.asarray(open_split(str(chat_dir), "val", meta)).astype(np.int64)
    mask = np.asarray(open_array(str(chat_dir), "val_mask.bin", np.uint8, meta["val_tokens"])).astype(bool)
    starts = open_array(str(chat_dir), "val_starts.bin", np.int64, meta["val_conversations"]).tolist()
    lengths = np.diff(starts + [len(val)])
    assert lengths.max() > 33  # a conversation that takes two windows is in val
    model, tokenizer = loading.load_model(str(chat_ckpt), "cpu")
    results = evaluation.evaluate_loss(model, tokenizer, str(chat_dir), batch_size=4)
    assert results["tokens"] == int(mask.sum())  # every reply token and <|assistant_end|>, long ones' too
    reply_text = tokenizer.decode([t for t in val[mask].tolist() if t not in tokenizer.chat_ids.values()])
    assert results["bytes"] == len(reply_text.encode("utf-8"))
    windows = list(evaluation.val_windows(str(chat_dir), tokenizer, model.config.block_size))
    assert len(windows) == sum(math.ceil((n - 1) / 32) for n in lengths)  # each conversation on its own
    assert results["loss"] == pytest.approx(reference_loss(model, windows)[0], rel=1e-5)
    # the model learned the lessons by heart: their replies cost it little, the unseen story a lot
    bos = tokenizer.chat_ids["<|bos|>"]
    lesson_windows = [(x, y) for x, y in windows if x[0] == bos and len(x) < 27]  # not the story's
    assert lesson_windows
    assert reference_loss(model, lesson_windows)[0] < 0.1 < results["loss"]


def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def test_accuracy_is_exact_match_after_normalising_whitespace(chat_ckpt, tmp_path, capsys):
    path = write_jsonl(tmp_path / "test.jsonl", [
        conversation(("spell dog", " d  o\ng ")),  # right: whitespace differs only
        conversation(("add 2 3", "5")),  # right
        conversation(("reverse abc", "abc")),  # wrong: the model says cba
        conversation(("hi", "yo"), ("bye", "ok")),  # right: answered given the first exchange
        conversation(("x" * 20, "y" * 20), ("spell dog", "d o g")),  # right, once the first exchange is dropped
        conversation(("z" * 40, "w")),  # wrong: longer than block_size 32 on its own
    ])
    results = eval_json(capsys, "--ckpt", chat_ckpt, "--data", path, "--batch-size", "4")
    assert results == {"data": str(path), "accuracy": 4 / 6, "n": 6, "correct": 4, "trimmed": 1, "too_long": 1}
    assert eval_json(capsys, "--ckpt", chat_ckpt, "--data", path, "--max", "2")["n"] == 2
    text = run_cli("eval.py", "--ckpt", chat_ckpt, "--data", path, "--device", "cpu")
    assert text.returncode == 0, text.stderr
    assert ("accuracy 66.7% (4/6 exact matches; 1 lost their oldest turns to fit the context; 1 had a last "
            "message longer than the context: counted wrong)") in text.stdout
    assert "(too long to answer) (expected 'w')" in text.stdout
    assert "'reverse abc' -> 'cba' (expected 'abc')" in text.stdout and "'add 2 3' -> '5'" in text.stdout


@pytest.mark.parametrize("seed", [1337, 7])
def test_chat_tasks_is_the_val_split_that_prepare_writes(tmp_path, seed):
    """Whatever --seed: the tasks have their own, so no val question eval.py asks was trained on."""
    examples = evaluation.read_examples("chat_tasks")
    assert len(examples) == chat_tasks.CHAT_TASKS_VAL
    prepare.prepare("chat_tasks", "byte", str(tmp_path / "tasks"), 0.1, seed=seed)
    meta = read_meta(str(tmp_path / "tasks"))
    tokenizer = tokenizer_from_dict(meta["tokenizer"])
    val = np.asarray(open_split(str(tmp_path / "tasks"), "val", meta)).tolist()
    rendered = []
    for messages, answer in examples:
        rendered += chat_format.render_conversation(tokenizer, messages + [{"role": "assistant", "content": answer}])[0]
    assert rendered == val


def test_chat_tasks_accuracy_runs_on_a_chat_model(chat_ckpt, capsys):
    results = eval_json(capsys, "--ckpt", chat_ckpt, "--data", "chat_tasks", "--max", "6")
    assert results["n"] == 6 and 0 <= results["correct"] <= 6
    assert results["accuracy"] == results["correct"] / 6


def test_errors_are_one_line_and_say_why(chat_ckpt, chat_dir, data_dir, tmp_path, capsys):
    base = tmp_path / "base.safetensors"
    save_model(base, ByteTokenizer())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": conversation(("a", "b"))}) + "\n"
                   + json.dumps({"messages": conversation(("a", None))}) + "\n")
    cases = [
        (["--ckpt", base, "--data", "chat_tasks"], "has no chat tokens, so it cannot chat"),
        (["--ckpt", base, "--data", chat_dir], "holds chat data, but this model's tokenizer has no chat tokens"),
        (["--ckpt", chat_ckpt, "--data", data_dir], "was prepared with another tokenizer (char"),
        (["--ckpt", chat_ckpt, "--data", bad], "bad.jsonl' line 2: the conversation has no assistant turn"),
        (["--ckpt", chat_ckpt, "--data", tmp_path / "nothing"], "is neither a prepared data directory"),
        (["--ckpt", chat_ckpt, "--data", "chat_tasks", "--max", "0"], "--max must be at least 1, got 0"),
    ]
    for args, message in cases:
        out, error = run_eval(capsys, *args)
        assert out == "" and error.startswith("eval.py: error: ") and message in error, error
        assert "\n" not in error
    result = run_cli("eval.py", *cases[0][0], "--device", "cpu")  # and through the real command line
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0 and cases[0][1] in result.stderr


def test_init_from_loads_a_hugging_face_gpt2_and_its_tokenizer(tmp_path, capsys):
    from test_gpt2 import random_gpt2, tiny_bpe

    random_gpt2().save_pretrained(tmp_path)
    tiny_bpe(tmp_path)  # a base model: its BPE has no chat tokens
    out, error = run_eval(capsys, "--init-from", tmp_path, "--data", "chat_tasks")
    assert re.fullmatch(r"eval.py: error: this model's tokenizer \(bpe, \d+ tokens\) has no chat tokens, so it "
                        r"cannot chat: fine-tune it on chat data first \(docs/chat.md\)", error)


def test_a_parquet_chat_file_is_read_as_its_jsonl_twin_is(chat_ckpt, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = [conversation(("add 2 3", "5")), conversation(("reverse abc", "abc")),
                     conversation(("hi", "yo"), ("bye", "ok"))]
    pq.write_table(pa.table({"messages": conversations}), tmp_path / "test.parquet")
    jsonl = write_jsonl(tmp_path / "test.jsonl", conversations)
    from_parquet = eval_json(capsys, "--ckpt", chat_ckpt, "--data", tmp_path / "test.parquet")
    from_jsonl = eval_json(capsys, "--ckpt", chat_ckpt, "--data", jsonl)
    assert from_parquet["n"] == 3 and {**from_parquet, "data": None} == {**from_jsonl, "data": None}

    pq.write_table(pa.table({"messages": conversations[:1] + [conversation(("a", None))]}), tmp_path / "bad.parquet")
    out, error = run_eval(capsys, "--ckpt", chat_ckpt, "--data", tmp_path / "bad.parquet")
    assert "bad.parquet' row 2: the conversation has no assistant turn" in error and "\n" not in error.strip()
