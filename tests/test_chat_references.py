"""nanoforge/chat_format.py against token counts worked out by hand (byte tokens: one id per character) and the
exact rules of the format: which conversations are refused and why, how Alpaca records become turns, and how
many old turns fit_to_context drops for a given block_size and reply length."""

import json

import pytest

from nanoforge import chat_format, records
from nanoforge.chat_format import ChatError, check_conversation, conversation_from_record, fit_to_context
from nanoforge.tokenizer import ByteTokenizer, with_chat_tokens

TOK = with_chat_tokens(ByteTokenizer())  # "abc" is 3 ids; each turn adds its start and end token


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_render_lengths_and_mask_by_hand():
    ids, mask = chat_format.render_conversation(TOK, [user("aaaa"), assistant("bb")])
    assert len(ids) == 1 + (4 + 2) + (2 + 2)  # <|bos|>, user turn, assistant turn
    assert mask == [0] * 7 + [0, 1, 1, 1]  # <|assistant_start|> 0; the reply and <|assistant_end|> 1
    assert ids[0] == TOK.chat_ids["<|bos|>"] and ids[-1] == TOK.chat_ids["<|assistant_end|>"]
    prompt = chat_format.render_for_reply(TOK, [user("aaaa"), assistant("bb"), user("cc")])
    assert len(prompt) == 1 + 6 + 4 + 4 + 1  # ... and <|assistant_start|> to begin the reply


@pytest.mark.parametrize("messages, problem", [
    ([], "must be a non-empty list"),
    ("hi", "must be a non-empty list"),
    ([{"role": "user"}], "message 1 is missing its 'role' or 'content'"),
    (["hi"], "message 1 is missing"),
    ([{"role": "bot", "content": "x"}], "message 1 has unknown role 'bot'"),
    ([user(" \n")], r"message 1 \(user\) has empty content"),
    ([user("a"), {"role": "system", "content": "s"}], "message 2 is a system message"),
    ([{"role": "system", "content": "s"}], "a system message must be followed by a user message"),
    ([{"role": "system", "content": "s"}, assistant("a")], "a system message must be followed by a user"),
    ([user("a"), user("b")], "turn 2 is user, expected assistant"),
    ([assistant("a")], "turn 1 is assistant, expected user"),
    ([user("a")], "has no assistant turn to learn from"),
    ([user("a"), assistant("b"), user("c")], "ends with a user turn"),
])
def test_each_broken_conversation_is_named(messages, problem):
    with pytest.raises(ChatError, match=problem):
        check_conversation(messages)


def test_the_system_message_joins_the_first_user_turn_and_replies_need_a_user_turn_last():
    turns = check_conversation([{"role": "system", "content": "S"}, user("U"), assistant("A")])
    assert turns == [("user", "S\n\nU"), ("assistant", "A")]
    assert check_conversation([user("U")], for_reply=True) == [("user", "U")]
    with pytest.raises(ChatError, match="must end with a user message"):
        check_conversation([user("U"), assistant("A")], for_reply=True)


@pytest.mark.parametrize("block_size, max_new_tokens, dropped", [
    (32, 16, 0),  # budget 32 - 16 = 16: the 16-token prompt fits exactly
    (31, 16, 0),  # budget 31 - min(16, 15) = 16
    (30, 16, 2),  # budget 15: the oldest exchange goes
    (40, 30, 0),  # budget 40 - min(30, 40 // 2) = 20: a long reply reserves at most half the context
])
def test_fit_to_context_drops_the_oldest_exchange_only_when_over_budget(block_size, max_new_tokens, dropped):
    messages = [user("aaaa"), assistant("bb"), user("cc")]  # the prompt for a reply: 16 tokens
    kept, n = fit_to_context(TOK, messages, block_size, max_new_tokens)
    assert n == dropped and kept == messages[dropped:]


def test_fit_to_context_keeps_the_system_message_and_refuses_a_last_message_too_long():
    system = {"role": "system", "content": "sys"}
    messages = [system, user("aaaa"), assistant("bb"), user("cc"), assistant("dd"), user("ee")]
    kept, n = fit_to_context(TOK, messages, 24, 12)  # budget 12: only the system message and the last turn fit
    assert n == 4 and kept == [system, user("ee")]
    long_last = [user("aaaa"), assistant("bb"), user("x" * 12)]  # the last alone: 16 tokens, over the budget of 10
    assert fit_to_context(TOK, long_last, 20, 10) == (long_last[2:], 2)  # kept all the same: it fits block_size
    alone = [user("x" * 16)]  # 1 + 18 + 1 = 20 tokens: exactly block_size is allowed
    assert fit_to_context(TOK, alone, 20, 5) == (alone, 0)
    with pytest.raises(ChatError, match="21 tokens with the chat format, more than the model's block_size 20"):
        fit_to_context(TOK, [user("x" * 17)], 20, 5)


def test_alpaca_and_messages_records():
    messages = [user("q"), assistant("a")]
    assert conversation_from_record({"messages": messages}) is messages
    assert conversation_from_record({"instruction": "Do", "input": "this", "output": "done"}) == \
        [user("Do\n\nthis"), assistant("done")]
    assert conversation_from_record({"instruction": "Do", "input": "  ", "output": "done"})[0] == user("Do")
    assert conversation_from_record({"instruction": "Do", "output": "done"})[0] == user("Do")
    for record, problem in [({"instruction": "Do"}, "needs an 'output' field"),
                            ({"instruction": 3, "output": "x"}, "must be strings"),
                            ({"instruction": "Do", "input": 3, "output": "x"}, "must be strings"),
                            ({"text": "t", "id": 1}, r"it has \['id', 'text'\]"),
                            (["messages"], "must be a JSON object")]:
        with pytest.raises(ChatError, match=problem):
            conversation_from_record(record)
    assert chat_format.is_chat_record({"messages": []}) and chat_format.is_chat_record({"instruction": "x"})
    assert not chat_format.is_chat_record({"text": "x"}) and not chat_format.is_chat_record(["messages"])


def test_chat_files_are_told_apart_and_bad_records_named(tmp_path):
    chat, text = tmp_path / "chat.jsonl", tmp_path / "text.jsonl"
    good = {"messages": [user("q"), assistant("a")]}
    chat.write_text("\n".join(json.dumps(r) for r in [good, {"messages": [user("q")]}, good]) + "\n")
    text.write_text(json.dumps({"text": "plain"}) + "\n")
    assert chat_format.is_chat_file(str(chat)) and not chat_format.is_chat_file(str(text))
    read = list(chat_format.read_conversations(str(chat)))
    assert [r for _, r in read][0::2] == [good["messages"]] * 2
    bad = read[1][1]
    assert isinstance(bad, records.BadRecord) and "line 2" in str(bad) and "no assistant turn" in str(bad)
