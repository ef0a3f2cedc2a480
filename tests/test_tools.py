"""The calculator tool: its safe evaluator, the tool tokens in the chat format (outputs masked), older chat-token
lists still loading, and the engine answering calls row by row."""

import pytest
import torch

from model import GPT, GPTConfig
from nanoforge import chat_format, loading, tools
from nanoforge.checkpoint import CheckpointError
from nanoforge.engine import Generator
from nanoforge.tokenizer import (CHAT_TOKENS, CHAT_TOKENS_V1, ByteTokenizer, CharTokenizer, ChatTokenizer,
                                 has_tools, tokenizer_from_dict, with_chat_tokens)


@pytest.mark.parametrize("expression, output", [
    ("347+85", "432"), ("7/2", "3.5"), ("6/3", "2"), ("-5//2", "-3"), ("2**10", "1024"), ("(1+2)*3 % 4", "1"),
    (" 12 * 12 ", "144"), ("2**0.5", "1.414213562"),
    ("1/0", "error: division by zero"), ("5 % 0", "error: division by zero"),
    ("10**10**10", "error: exponent above 1000"), ("9**999", "error: number too large"),
    ("1e308*10", "error: number too large"), ("9" * 101, "error: number too large"),
    ("(3", "error: not an arithmetic expression"), ("", "error: not an arithmetic expression"),
    ("__import__('os').system('true')", "error: only numbers, + - * / // % ** and parentheses are allowed"),
    ("x + 1", "error: only numbers, + - * / // % ** and parentheses are allowed"),
    ("True + 1", "error: only numbers, + - * / // % ** and parentheses are allowed"),
    ("(-8) ** 0.5", "error: a negative number to a fractional power is not a real number"),
])
def test_calculator_answers_or_says_what_is_wrong(expression, output):
    assert tools.calculate(expression) == output


def test_calculator_refuses_long_expressions_without_evaluating_them():
    assert tools.calculate("1+" * 150 + "1").startswith("error: expression longer than 200")


def test_old_five_token_chat_tokenizers_still_load_with_their_ids():
    base = CharTokenizer("0123456789+ ")
    old = {**base.to_dict(), "chat_tokens": list(CHAT_TOKENS_V1)}  # as checkpoints and data of earlier versions say
    loaded = tokenizer_from_dict(old)
    assert loaded.vocab_size == base.vocab_size + 5 and not has_tools(loaded)
    new = with_chat_tokens(base)
    assert has_tools(new) and new.vocab_size == base.vocab_size + len(CHAT_TOKENS)
    assert all(loaded.chat_ids[name] == new.chat_ids[name] for name in CHAT_TOKENS_V1)  # appended: ids unchanged
    assert loaded.to_dict() == old and tokenizer_from_dict(new.to_dict()).to_dict() == new.to_dict()
    loading.check_extends(loaded, new, "old_chat_run")  # an old chat model may be fine-tuned on data with tool calls
    with pytest.raises(CheckpointError, match="nor it plus the chat tokens"):
        loading.check_extends(new, loaded, "new_chat_run")  # but ids cannot be taken away
    # an old chat model cannot be taught the tool format: the renderer says so
    with pytest.raises(chat_format.ChatError, match="no tool tokens"):
        chat_format.render_conversation(loaded, [{"role": "user", "content": "1+1"},
                                                 {"role": "assistant", "content": [{"type": "python", "text": "1+1"}]}])


def test_tool_outputs_are_masked_from_the_loss():
    tokenizer = with_chat_tokens(CharTokenizer("0123456789+ abcdefghijklmnopqrstuvwxyz?"))
    chat = tokenizer.chat_ids
    ids, mask = chat_format.render_conversation(tokenizer, [
        {"role": "user", "content": "what is 2 + 3?"},
        {"role": "assistant", "content": [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                                          {"type": "text", "text": "5"}]}])
    e = tokenizer.encode
    reply = [chat["<|python_start|>"], *e("2+3"), chat["<|python_end|>"], chat["<|output_start|>"], *e("5"),
             chat["<|output_end|>"], *e("5"), chat["<|assistant_end|>"]]
    assert ids[-len(reply) - 1:] == [chat["<|assistant_start|>"], *reply]
    # learned: the call and its tokens, the answer, the end; never the output the engine writes
    assert mask[-len(reply) - 1:] == [0, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1]
    parts = tools.reply_parts(tokenizer, reply)
    assert parts == [{"type": "python", "text": "2+3"}, {"type": "python_output", "text": "5"},
                     {"type": "text", "text": "5"}]
    assert tools.final_text(parts) == "5"


# ---------------------------------------------------------------------------------------------
# The engine: a scripted model writes calls, the engine answers them in each row on its own


TOKENIZER = with_chat_tokens(ByteTokenizer())


def scripted_generator(scripts):
    """A Generator whose model, for row b, writes the tokens scripts[b] (greedy), skipping over whatever the engine
    feeds it between <|output_start|> and <|output_end|> (the forced tool outputs)."""
    config = GPTConfig(block_size=128, vocab_size=TOKENIZER.vocab_size, n_layer=1, n_head=1, n_embd=8)
    gen = Generator(GPT(config), TOKENIZER)
    chat = TOKENIZER.chat_ids
    state = {}

    def forward(idx, cache):
        if cache.pos == 0:
            state["seqs"] = [row.tolist() for row in idx]
            state["starts"] = [len(row) for row in idx]
        else:
            for seq, token in zip(state["seqs"], idx[:, -1].tolist()):
                seq.append(token)
        logits = torch.full((idx.size(0), config.vocab_size), -10.0)
        for b, seq in enumerate(state["seqs"]):
            written, inside = 0, False
            for token in seq[state["starts"][b]:]:
                if token == chat["<|output_start|>"]:
                    inside = True
                written += not inside
                if token == chat["<|output_end|>"]:
                    inside = False
            logits[b, scripts[b][min(written, len(scripts[b]) - 1)]] = 10.0
        return logits

    gen.forward = gen.decode_step = forward
    return gen


def call(expression, answer, closed=True):
    chat, e = TOKENIZER.chat_ids, TOKENIZER.encode
    return ([chat["<|python_start|>"], *e(expression)] + ([chat["<|python_end|>"]] if closed else [])
            + e(answer) + [chat["<|assistant_end|>"]])


def test_each_row_calls_the_calculator_on_its_own_and_errors_are_outputs():
    chat = TOKENIZER.chat_ids
    scripts = [call("347+85", "432"), TOKENIZER.encode("17") + [chat["<|assistant_end|>"]], call("1/0", "oops"),
               call("10**10**10", "big"), call("(3", "bad"),
               [chat["<|python_start|>"], *TOKENIZER.encode("2+2"), chat["<|output_end|>"], *TOKENIZER.encode("x"),
                chat["<|assistant_end|>"]]]  # never closed: another chat token comes inside the call
    gen = scripted_generator(scripts)
    prompts = [[chat["<|bos|>"], chat["<|assistant_start|>"]]] * len(scripts)
    samples = gen.generate(prompts, max_new_tokens=60, temperature=0, stop_ids=[chat["<|assistant_end|>"]],
                           tools=True)
    outputs = [[out for _, out in s.calls] for s in samples]
    assert outputs == [["432"], [], ["error: division by zero"], ["error: exponent above 1000"],
                       ["error: not an arithmetic expression"],
                       ["error: unclosed call"]]
    finals = [tools.final_text(tools.reply_parts(TOKENIZER, s.ids)) for s in samples]
    assert finals == ["432", "17", "oops", "big", "bad", "x"]  # every reply goes on after its tool's output
    assert all(s.finish_reason == "end" for s in samples)
    first = samples[0]
    fed = [t for t, forced in zip(first.ids, first.forced) if forced]
    assert fed == [chat["<|output_start|>"], *TOKENIZER.encode("432"), chat["<|output_end|>"]]
    assert not any(samples[1].forced)
    # a row's reply does not depend on what it was batched with
    alone = scripted_generator(scripts[2:3]).generate(prompts[:1], max_new_tokens=60, temperature=0,
                                                      stop_ids=[chat["<|assistant_end|>"]], tools=True)[0]
    assert (alone.ids, alone.forced) == (samples[2].ids, samples[2].forced)


def test_without_tools_the_model_writes_its_own_output():
    chat = TOKENIZER.chat_ids
    gen = scripted_generator([call("347+85", "432")])
    sample = gen.generate([[chat["<|bos|>"]]], max_new_tokens=30, temperature=0,
                          stop_ids=[chat["<|assistant_end|>"]])[0]
    assert sample.calls == [] and not any(sample.forced)
    assert tools.final_text(tools.reply_parts(TOKENIZER, sample.ids)) == "432"


def test_tools_need_the_tool_tokens():
    old = ChatTokenizer(ByteTokenizer(), CHAT_TOKENS_V1)
    gen = Generator(GPT(GPTConfig(block_size=16, vocab_size=old.vocab_size, n_layer=1, n_head=1, n_embd=8)), old)
    with pytest.raises(Exception, match="no tool tokens"):
        gen.generate([[1, 2]], max_new_tokens=2, tools=True)


def test_reply_text_streams_the_final_text_and_stop_strings_see_the_whole_reply():
    """tools.ReplyText (the server's stream of a reply with calls): piece by piece, it releases exactly
    final_text(reply_parts(ids)) of random replies (text, multi-byte characters, calls, outputs, stray chat tokens);
    a stop string is looked for in the whole reply, as the engine's TextStream does, and cuts the final text too."""
    import random

    chat, e = TOKENIZER.chat_ids, TOKENIZER.encode
    pieces = [e("a"), e(" "), e("€"), e("7"), *([i] for i in chat.values() if i != chat["<|bos|>"])]
    rng = random.Random(0)
    for _ in range(300):
        ids = [i for _ in range(rng.randint(0, 25)) for i in rng.choice(pieces)]
        reply = tools.ReplyText(TOKENIZER)
        shown = [reply.push(i) for i in ids]
        assert "".join(shown) + reply.finish() == tools.final_text(tools.reply_parts(TOKENIZER, ids)), ids
    ids = [*e("ab"), chat["<|python_start|>"], *e("1+1"), chat["<|python_end|>"], chat["<|output_start|>"], *e("2"),
           chat["<|output_end|>"], *e("c2d")]
    for stop, final in [("2", "ab"), ("c", "ab"), ("2d", "abc"), ("b<|py", "a"), ("z", "abc2d")]:
        reply = tools.ReplyText(TOKENIZER, [stop])
        shown = ""
        for i in ids:
            shown += reply.push(i)
            if reply.stopped:
                break
        assert shown + reply.finish() == final, stop
    reply, shows = tools.ReplyText(TOKENIZER), []
    for i in [*e("x"), chat["<|python_start|>"], *e("1"), chat["<|python_end|>"], *e("y")]:
        shows.append(reply.shows(i))  # asked before the token is pushed: is it part of the final text?
        reply.push(i)
    assert shows == [True, False, False, False, True]
