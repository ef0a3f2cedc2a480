"""Chat with a model: replies stop at <|assistant_end|> (a general stop-token mechanism of the engine),
never show chat tokens, batch like single replies; the history fits the context; sample.py --chat end to end."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from nanoforge import chat_format
from nanoforge import checkpoint
from conftest import CHAT_LESSONS, REPO, conversation
from nanoforge.engine import Generator
from nanoforge.machine import probe
from model import GPT, GPTConfig
from test_generate import CHARS, char_generator, small_model
from nanoforge.tokenizer import CHAT_TOKENS, ByteTokenizer, with_chat_tokens


def test_stop_ids_end_a_sample_at_that_token_and_keep_it_out_of_the_text():
    gen = char_generator()
    prompts = ["First", "All:"]
    free = gen.generate(prompts, max_new_tokens=30, temperature=0)
    stop = free[0].ids[5]
    stopped = gen.generate(prompts, max_new_tokens=30, temperature=0, stop_ids=[stop])
    for before, after in zip(free, stopped):
        if stop in before.ids:
            n = before.ids.index(stop) + 1
            assert after.ids == before.ids[:n] and after.finish_reason == "end"
            assert after.text == CHARS.decode(before.ids[: n - 1])
        else:
            assert after == before


def test_chat_replies_what_the_model_learned_and_stops_at_assistant_end(chat_ckpt):
    gen = Generator.from_checkpoint(chat_ckpt, "cpu")
    end = gen.tokenizer.chat_ids["<|assistant_end|>"]
    for pairs in CHAT_LESSONS:
        messages = conversation(*pairs)
        reply = gen.chat(messages[:-1], max_new_tokens=10, temperature=0)
        assert reply.text == messages[-1]["content"]
        assert reply.finish_reason == "end" and reply.ids[-1] == end
        assert gen.tokenizer.decode(reply.ids[:-1]) == reply.text


def test_batched_replies_equal_single_replies(chat_ckpt):
    """Conversations of different prompt lengths in one batch, as eval.py runs them."""
    gen = Generator.from_checkpoint(chat_ckpt, "cpu")
    asks = [conversation(*pairs)[:-1] for pairs in CHAT_LESSONS] + [conversation(("yo", None))]
    batched = gen.replies(asks, max_new_tokens=12, temperature=0)
    assert [r.ids for r in batched] == [gen.chat(m, max_new_tokens=12, temperature=0).ids for m in asks]


def test_replies_never_show_chat_tokens():
    """An untrained chat model emits chat tokens at random: each one ends the reply and none is in the text."""
    tokenizer = with_chat_tokens(ByteTokenizer())
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=32))
    with torch.no_grad():
        model.transformer.wte.weight[-len(CHAT_TOKENS):].mul_(40)  # make chat tokens frequent
    gen = Generator(model, tokenizer)
    replies = gen.replies([conversation(("hello", None))] * 16, max_new_tokens=30, temperature=1.0, seed=0)
    chat_ids = set(tokenizer.chat_ids.values())
    assert sum(r.finish_reason == "end" for r in replies) >= 4  # the case under test did happen
    for r in replies:
        assert not any(name in r.text for name in CHAT_TOKENS)
        assert (r.ids[-1] in chat_ids) == (r.finish_reason == "end")
        assert not chat_ids & set(r.ids[:-1])


def test_chat_needs_chat_tokens_and_a_conversation_that_fits():
    gen = char_generator()
    with pytest.raises(chat_format.ChatError, match=r"tokenizer \(char, \d+ tokens\) has no chat tokens.*fine-tune"):
        gen.chat(conversation(("First", None)))
    tokenizer = with_chat_tokens(ByteTokenizer())
    gen = Generator(GPT(GPTConfig(block_size=16, vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_embd=8)),
                    tokenizer)
    with pytest.raises(chat_format.ChatError, match="conversation 1 is 24 tokens, more than the model's block_size 16"):
        gen.chat(conversation(("x" * 20, None)))


def test_fit_to_context_drops_the_oldest_exchanges_and_keeps_the_system_message():
    tokenizer = with_chat_tokens(ByteTokenizer())
    system = [{"role": "system", "content": "be brief"}]
    messages = system + conversation(("aaaa", "bbbb"), ("cccc", "dddd"), ("eeee", None))
    assert chat_format.fit_to_context(tokenizer, messages, 64, 8) == (messages, 0)
    # budget 40 - min(8, 20) = 32 tokens: the full prompt is 42 tokens, without the first exchange 30
    kept, dropped = chat_format.fit_to_context(tokenizer, messages, 40, 8)
    assert dropped == 2 and kept == system + conversation(("cccc", "dddd"), ("eeee", None))
    assert len(chat_format.render_for_reply(tokenizer, kept)) <= 32
    # the last message alone is kept when it fits in block_size, though it leaves the reply less room
    alone = system + conversation(("e" * 10, None))  # 24 tokens, over the budget of 40 - min(30, 20)
    assert chat_format.fit_to_context(tokenizer, alone, 40, 30) == (alone, 0)
    with pytest.raises(chat_format.ChatError, match="the message is too long: 44 tokens .* block_size 40"):
        chat_format.fit_to_context(tokenizer, system + conversation(("a", "b"), ("e" * 30, None)), 40, 8)


def run_chat(ckpt, *args, stdin=""):
    return subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", str(ckpt), "--chat",
                           "--temperature", "0", "--device", "cpu", *args], input=stdin, capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_sample_chat_keeps_the_conversation_and_clear_starts_over(chat_ckpt):
    result = run_chat(chat_ckpt, "--max-new-tokens", "8", stdin="hi\nbye\n/clear\nbye\n")
    assert result.returncode == 0, result.stderr
    gen = Generator.from_checkpoint(chat_ckpt, "cpu")
    alone = gen.chat(conversation(("bye", None)), max_new_tokens=8, temperature=0).text
    assert alone != "ok"  # so the second reply below can only come from the history
    assert result.stdout == f"yo\nok\n{alone}\n"
    assert result.stderr == probe().summary() + "\n(new conversation)\n"  # sample.py says its machine first


def test_sample_chat_drops_the_oldest_turns_once_the_context_is_full(chat_ckpt):
    # block_size 32, 8 new tokens: the conversation keeps at most 24 tokens
    result = run_chat(chat_ckpt, "--max-new-tokens", "8", stdin="hi\nreverse abc\nadd 2 3\nspell dog\nhi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "yo" and len(result.stdout.splitlines()) == 5
    assert result.stderr.count("its oldest turns are dropped") == 1
    assert "context of 32 tokens" in result.stderr


def test_sample_chat_prompt_answers_one_turn(chat_ckpt):
    result = run_chat(chat_ckpt, "--prompt", "spell dog", stdin="hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "d o g\n"
    result = run_chat(chat_ckpt, "--prompt", "x" * 40)
    last = result.stderr.splitlines()[-1]  # after the machine line sample.py prints once the model is loaded
    assert result.returncode != 0 and last.startswith("sample.py: error: the message is too long")


def test_sample_chat_refuses_a_model_without_chat_tokens(tmp_path):
    model = small_model()
    path = tmp_path / "base.safetensors"
    checkpoint.save(str(path), model.state_dict(), {"model": dataclasses.asdict(model.config),
                                                    "tokenizer": CHARS.to_dict()})
    result = run_chat(path, stdin="hi\n")
    assert result.returncode != 0 and result.stdout == ""
    assert "has no chat tokens" in result.stderr and result.stderr.strip().count("\n") == 0
    result = run_chat(path, "--interactive")
    assert result.returncode != 0 and "--chat reads messages from stdin" in result.stderr


def test_sample_chat_system_message_starts_the_conversation(chat_ckpt):
    gen = Generator.from_checkpoint(chat_ckpt, "cpu")
    messages = [{"role": "system", "content": "abc"}, {"role": "user", "content": "hi"}]
    with_system = gen.chat(messages, max_new_tokens=8, temperature=0).text
    assert with_system != gen.chat(messages[1:], max_new_tokens=8, temperature=0).text  # the system text counts
    result = run_chat(chat_ckpt, "--max-new-tokens", "8", "--system", "abc", stdin="hi\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{with_system}\n"
    result = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), "--ckpt", str(chat_ckpt), "--system",
                             "abc"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode != 0 and result.stderr.strip() == "sample.py: error: --system only applies with --chat"
