"""The chat format: token layout and loss mask, no special-token injection, conversation checks, the
built-in tasks, and chat batches that never mix or drop conversations."""

import json

import numpy as np
import pytest
import torch

from nanoforge import chat_format, chat_tasks
from nanoforge import preparation as prepare
from nanoforge.data import Dataset
from nanoforge.tokenizer import CHAT_TOKENS, CHAT_TOKENS_V1, BPETokenizer, ByteTokenizer, CharTokenizer, tokenizer_from_dict, with_chat_tokens

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "bye"},
    {"role": "assistant", "content": "ok"},
]


def chat_tokenizers():
    text = "hi yo bye ok Be brief. <|user_start|> reverse abc cba" * 3
    return [with_chat_tokens(ByteTokenizer()), with_chat_tokens(CharTokenizer.train(text + "\n")),
            with_chat_tokens(BPETokenizer.train([text] * 20, 280))]


@pytest.mark.parametrize("tok", chat_tokenizers(), ids=["byte", "char", "bpe"])
def test_render_places_chat_tokens_and_masks_exactly_the_assistant_replies(tok):
    ids, mask = chat_format.render_conversation(tok, CONVERSATION)
    c = tok.chat_ids
    enc = tok.encode
    expected = ([c["<|bos|>"], c["<|user_start|>"], *enc("Be brief.\n\nhi"), c["<|user_end|>"],
                 c["<|assistant_start|>"], *enc("yo"), c["<|assistant_end|>"],
                 c["<|user_start|>"], *enc("bye"), c["<|user_end|>"],
                 c["<|assistant_start|>"], *enc("ok"), c["<|assistant_end|>"]])
    assert ids == expected
    # 1 exactly on each reply's tokens and its <|assistant_end|>
    learned = [i for i, m in zip(ids, mask) if m]
    assert learned == [*enc("yo"), c["<|assistant_end|>"], *enc("ok"), c["<|assistant_end|>"]]
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    reply = chat_format.render_for_reply(tok, CONVERSATION[:4])
    assert reply == expected[: expected.index(c["<|assistant_start|>"], len(expected) - 5) + 1]
    assert reply[-1] == c["<|assistant_start|>"]


@pytest.mark.parametrize("tok", chat_tokenizers(), ids=["byte", "char", "bpe"])
def test_message_text_never_becomes_a_chat_token(tok):
    sneaky = " ".join(CHAT_TOKENS) if tok.kind != "char" else "<|user_start|>"
    ids, _ = chat_format.render_conversation(tok, [{"role": "user", "content": sneaky},
                                            {"role": "assistant", "content": sneaky}])
    specials = [i for i in ids if i >= tok.base.vocab_size]
    # only the five tokens the format places: bos, user start/end, assistant start/end
    assert [tok.decode([i]) for i in specials] == list(CHAT_TOKENS_V1)
    assert tok.decode(tok.encode(sneaky)) == sneaky


@pytest.mark.parametrize("tok", chat_tokenizers(), ids=["byte", "char", "bpe"])
def test_chat_tokenizer_travels_as_json(tok):
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.vocab_size == tok.vocab_size == tok.base.vocab_size + len(CHAT_TOKENS)
    assert again.chat_ids == tok.chat_ids
    assert chat_format.render_conversation(again, CONVERSATION) == chat_format.render_conversation(tok, CONVERSATION)
    assert with_chat_tokens(tok) is tok  # never extended twice


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}], "message 1 (user) has empty content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "roles must alternate"),
    ([{"role": "user"}], "missing its 'role' or 'content'"),
    ([{"role": "user", "content": "a"}], "no assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
     "ends with a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "only the first message"),
    ([], "non-empty list"),
])
def test_bad_conversations_name_the_problem(messages, problem):
    with pytest.raises(chat_format.ChatError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        chat_format.check_conversation(messages)


def test_alpaca_records_become_one_user_and_one_assistant_turn():
    messages = chat_format.conversation_from_record({"instruction": "Sum these.", "input": "2 3", "output": "5"})
    assert messages == [{"role": "user", "content": "Sum these.\n\n2 3"}, {"role": "assistant", "content": "5"}]
    assert chat_format.conversation_from_record({"instruction": "Hi.", "output": "Hello."})[0]["content"] == "Hi."


def test_builtin_tasks_are_disjoint_between_train_and_val_and_reproducible():
    train, val = chat_tasks.chat_tasks(2000, 200, seed=3)
    questions = lambda convs: {c[0]["content"] for c in convs}  # noqa: E731
    assert len(questions(train)) == 2000 and len(questions(val)) == 200
    assert not questions(train) & questions(val)
    assert {q.split()[0] for q in questions(val)} == {"reverse", "add", "count", "spell"}
    assert chat_tasks.chat_tasks(2000, 200, seed=3) == (train, val)
    for conv in train[:50]:
        q, a = conv[0]["content"], conv[1]["content"]
        kind, *args = q.split()
        if kind == "reverse":
            assert a == args[0][::-1]
        elif kind == "add":
            assert int(a) == int(args[0]) + int(args[1])
        elif kind == "count":
            assert int(a) == args[2].count(args[0])
        else:
            assert a == " ".join(args[0])


@pytest.fixture
def chat_data(tmp_path):
    path = tmp_path / "chats.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(60):
            turns = []
            for t in range(int(rng.integers(1, 4))):
                turns += [{"role": "user", "content": f"q{i}.{t} " + "x" * int(rng.integers(1, 30))},
                          {"role": "assistant", "content": f"a{i}.{t} " + "y" * int(rng.integers(1, 30))}]
            f.write(json.dumps({"messages": turns}) + "\n")
    prepare.prepare(str(path), "byte", str(tmp_path / "data"), 0.2)
    return tmp_path / "data"


def test_chat_batches_hold_one_whole_conversation_per_row_with_masked_targets(chat_data):
    block_size = 48
    data = Dataset(str(chat_data), block_size)
    split = data.chat["train"]
    bos = data.tokenizer.chat_ids["<|bos|>"]
    x, y = data.get_batch("train", 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape and x.shape[1] <= block_size
    rows_of = [split.row(i, block_size) for i in range(len(split.starts))]
    for b in range(x.size(0)):
        row = x[b].tolist()
        assert row[0] == bos  # every row starts at a conversation boundary ...
        matches = [r for r in rows_of if row[: len(r[0]) - 1] == r[0][:-1].tolist()]
        assert len(matches) == 1  # (each conversation begins with its own "q<i>.0")
        ids, mask = matches[0]
        n = len(ids) - 1
        assert row[:n] == ids[:-1].tolist()  # ... holds its tokens, none dropped ...
        assert bos not in row[1:n]  # ... and no other conversation
        expected_y = [int(t) if m else -1 for t, m in zip(ids[1:], mask[1:])]
        assert y[b, :n].tolist() == expected_y  # loss only where the mask says
        assert (y[b, n:] == -1).all()  # padding is never a target


def test_long_conversations_are_cut_and_counted(chat_data):
    data = Dataset(str(chat_data), 12)
    assert data.chat["train"].truncated > 0
    assert any("are cut to it" in note for note in data.notes)
    x, y = data.get_batch("train", 64, torch.Generator().manual_seed(1))
    assert x.shape[1] <= 12 and (y != -1).any(dim=1).all()  # every row drawn has something to learn


def test_prepare_names_the_line_of_a_bad_chat_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(prepare.PrepareError, match="bad.jsonl' line 2: the conversation has no assistant turn"):
        prepare.prepare(str(path), "byte", str(tmp_path / "out"), 0.5)
    assert not (tmp_path / "out" / "meta.json").exists()
