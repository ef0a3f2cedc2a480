"""The engine's per-row settings, cancellation and log-probabilities, the batching scheduler, and the "why"
view's explain_step: each against what it must equal (a row alone, the model's own softmax, explain())."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import calculator_model, conversation
from nanoforge import tools
from nanoforge.batching import Job, QueueFull, Scheduler
from nanoforge.chat_format import render_for_reply
from nanoforge.engine import Generator, reply_end_ids
from nanoforge.inspect_model import explain, explain_step
from test_generate import CHARS, small_model


@pytest.fixture(scope="module")
def gen():
    return Generator(small_model(sharpen=3), CHARS)


ROWS = dict(prompts=["First", "All:\nSpeak", "Re", "First"], max_new_tokens=[30, 12, 25, 30],
            temperature=[1.0, 0.0, 0.7, 1.0], top_p=[0.9, 1.0, 1.0, 0.9], seed=[5, 9, 5, 6],
            stop=[[], ["e"], ["ak", "x"], []])


def test_rows_with_their_own_settings_get_what_they_would_get_alone(gen):
    prompts = ROWS["prompts"]
    batch = gen.generate(prompts, **{k: v for k, v in ROWS.items() if k != "prompts"}, slide=4)
    for i, prompt in enumerate(prompts):
        alone = gen.generate([prompt], **{k: v[i] for k, v in ROWS.items() if k != "prompts"}, slide=4)
        assert alone == [batch[i]]
    assert batch[0] != batch[3]  # the same prompt and settings, another seed
    assert len(batch[1].ids) <= 12 and "e" not in batch[1].text


def test_a_list_of_settings_must_have_one_per_prompt(gen):
    from nanoforge.sampling import SettingError

    with pytest.raises(SettingError, match="one value, or a list of 2"):
        gen.generate(["a", "b"], max_new_tokens=[3])
    with pytest.raises(SettingError, match="top_p must be in"):
        gen.generate(["a", "b"], top_p=[0.5, 0.0])


def test_a_cancelled_row_stops_and_the_others_go_on(gen):
    steps = [0]

    def cancelled(row):
        steps[0] += row == 0
        return row == 1 and steps[0] > 3

    out = gen.generate(["First", "First"], max_new_tokens=20, temperature=0, cancelled=cancelled)
    assert out[1].finish_reason == "cancelled" and len(out[1].ids) == 4
    assert out[0].finish_reason == "length" and len(out[0].ids) == 20
    assert out[0].ids[:3] == out[1].ids[:3]


def test_token_logprobs_are_the_models_own(gen):
    model = small_model(sharpen=3)
    seen = {0: [], 1: []}
    out = gen.generate(["First", "Re"], max_new_tokens=6, temperature=1.0, seed=2, top_logprobs=3,
                       on_token=lambda row, token, lp: seen[row].append((token, lp)))
    for row, prompt in enumerate(["First", "Re"]):
        ids = CHARS.encode(prompt) + out[row].ids
        logits, _ = model(torch.tensor([ids]))
        expected = F.log_softmax(logits[0], dim=-1)  # (T, V)
        assert [t for t, _ in seen[row]] == out[row].ids
        for n, (token, (logprob, top)) in enumerate(seen[row]):
            at = len(CHARS.encode(prompt)) - 1 + n
            assert logprob == pytest.approx(expected[at, token].item(), abs=1e-5)
            best = torch.topk(expected[at], 3)
            assert [i for i, _ in top] == best.indices.tolist()
            assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=1e-5)


def test_explain_step_is_explain_at_the_last_position():
    model = small_model(sharpen=3)
    ids = CHARS.encode("First Citizen")
    step, full = explain_step(model, CHARS, ids), explain(model, CHARS, ids)
    torch.testing.assert_close(step.probs, full.probs[-1])
    torch.testing.assert_close(step.attention, full.patterns[:, :, -1])
    assert step.labels == full.labels
    token = step.top(3)[2][0]
    assert step.rank(token) == full.rank(len(ids) - 1, token) == 3


class Recorder:
    """A job's events, and an Event set when it is done (or failed)."""

    def __init__(self):
        self.events, self.finished = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if event[0] in ("done", "error"):
            self.finished.set()


def job(gen, prompt, seed, max_new_tokens=20, **extra):
    settings = {**dict(max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, seed=seed, stop=[],
                       top_logprobs=None), **extra}
    return Job(gen.encode(prompt), settings, Recorder())


def run_jobs(scheduler, jobs, seconds=60):
    for j in jobs:
        scheduler.submit(j)
    for j in jobs:
        assert j.emit.finished.wait(seconds)
    return [j.emit.events[-1] for j in jobs]


def test_jobs_submitted_together_are_decoded_together_and_get_their_own_replies(gen):
    scheduler = Scheduler(gen, max_batch=8, max_queue=8)
    try:
        jobs = [job(gen, p, seed) for p, seed in [("First", 1), ("Re", 2), ("All", 3)]]
        run_jobs(scheduler, jobs)
        assert scheduler.largest_batch == 3
        for j, (p, seed) in zip(jobs, [("First", 1), ("Re", 2), ("All", 3)]):
            sample = j.emit.events[-1][1]
            assert sample == gen.generate([p], max_new_tokens=20, seed=seed)[0]
            assert "".join(e[1] for e in j.emit.events if e[0] == "text") == sample.text
    finally:
        scheduler.close()


MIX = [("First Citizen:\nBefore we", 1, 24, 1.0, 1.0, []), ("Re", 2, 7, 0.0, 1.0, []), ("All", 3, 30, 0.8, 0.9, ["e"]),
       ("F", 4, 20, 1.2, 1.0, []), ("Speak, speak", 5, 22, 1.0, 0.5, ["ak"])]


@pytest.mark.parametrize("arch,dtype", [({}, torch.float32), (dict(pos_emb="rope", n_kv_head=2), torch.float32),
                                        ({}, torch.bfloat16)], ids=["gpt2", "rope-gqa", "gpt2-bfloat16"])
def test_the_same_seed_gives_the_same_reply_alone_or_in_any_mix(arch, dtype):
    """Fewer slots than jobs, prompts prefilled 3 tokens a step, replies past block_size (16: the window
    slides), jobs arriving while others run: each reply is generate()'s for that prompt alone. In bfloat16
    a CPU decodes with cpu_decoding.OneQueryAttention, which must honour the slots' mask too; there prompts
    are prefilled whole, as generate() does (chunks would round differently in 16 bits)."""
    gen = Generator(small_model(sharpen=3, **arch).to(dtype), CHARS)
    alone = [gen.generate([p], max_new_tokens=n, temperature=t, top_p=top_p, seed=seed, stop=stop)[0]
             for p, seed, n, t, top_p, stop in MIX]
    mixes = [(3, [4, 2, 0, 3, 1])]  # (slots, the order jobs arrive in)
    if not arch and dtype == torch.float32:
        mixes.append((2, [0, 1, 2, 3, 4]))
    for slots, order in mixes:
        scheduler = Scheduler(gen, max_batch=slots, max_queue=8)
        scheduler.decoder.prefill_chunk = 3 if dtype == torch.float32 else 64
        try:
            jobs = {}
            for n, i in enumerate(order):
                p, seed, max_new, t, top_p, stop = MIX[i]
                jobs[i] = job(gen, p, seed, max_new_tokens=max_new, temperature=t, top_p=top_p, stop=stop)
                scheduler.submit(jobs[i])
                if n == 1:  # the rest arrive while the first ones decode
                    while not any(e[0] == "text" for e in jobs[order[0]].emit.events):
                        threading.Event().wait(0.005)
            for i, j in jobs.items():
                assert j.emit.finished.wait(60)
                assert j.emit.events[-1] == ("done", alone[i]), (slots, i)
        finally:
            scheduler.close()


def test_a_long_prompt_is_prefilled_in_chunks_beside_a_short_one():
    """A 200-token prompt beside a 1-token one takes a few steps (64-token chunks), not one step per token."""
    gen = Generator(small_model(block_size=256, n_layer=1, n_embd=32, sharpen=3), CHARS)
    scheduler = Scheduler(gen, max_batch=2, max_queue=2)
    try:
        long_prompt = CHARS.decode([i % CHARS.vocab_size for i in range(200)])
        events = run_jobs(scheduler, [job(gen, long_prompt, 1, max_new_tokens=1), job(gen, "F", 2, max_new_tokens=1)])
        assert [e[1].finish_reason for e in events] == ["length", "length"]
        assert scheduler.steps <= 200 // 64 + 2
    finally:
        scheduler.close()


def test_one_bad_row_fails_alone(gen):
    """top_p 0 (the engine's (0, 1]) and more log-probabilities than the vocabulary: those two get their own
    error; the job decoded beside them is unharmed."""
    scheduler = Scheduler(gen, max_batch=8, max_queue=8)
    try:
        good = job(gen, "First", 1)
        bad = [job(gen, "Re", 2, top_p=0.0), job(gen, "All", 3, top_logprobs=gen.config.vocab_size + 1),
               job(gen, "F", 4, tools=True)]  # a model without the tool tokens
        run_jobs(scheduler, [good, *bad])
        assert good.emit.events[-1] == ("done", gen.generate(["First"], max_new_tokens=20, seed=1)[0])
        assert [j.emit.events[-1][0] for j in bad] == ["error", "error", "error"]
        assert [str(j.emit.events[-1][1]).split()[0] for j in bad] == ["top_p", "top_logprobs", "tools"]
    finally:
        scheduler.close()


def test_each_row_gets_the_number_of_log_probabilities_it_asked_for(gen):
    scheduler = Scheduler(gen, max_batch=8, max_queue=8)
    try:
        jobs = [job(gen, "First", 1, max_new_tokens=6, top_logprobs=k) for k in (2, 0, None, 20)]
        run_jobs(scheduler, jobs)
        for j, k in zip(jobs, (2, 0, None, 20)):
            tokens = [e for e in j.emit.events if e[0] == "token"]
            if k is None:
                assert tokens == []
            else:
                assert len(tokens) == 6 and all(len(top) == k for _, _, (_, top) in tokens)
    finally:
        scheduler.close()


def test_a_short_request_finishes_while_a_long_one_generates(gen):
    """Continuous batching: the short job takes a free slot at once. Static batching (the bench's baseline)
    makes it wait until the long one is done."""
    for policy in ("continuous", "static"):
        scheduler = Scheduler(gen, max_batch=4, max_queue=4, policy=policy)
        try:
            long = job(gen, "First", 1, max_new_tokens=1000)
            scheduler.submit(long)
            while not long.emit.events:  # it is generating
                threading.Event().wait(0.01)
            short = job(gen, "Re", 2, max_new_tokens=5)
            scheduler.submit(short)
            assert short.emit.finished.wait(60)
            assert long.emit.finished.is_set() == (policy == "static")
            assert short.emit.events[-1] == ("done", gen.generate(["Re"], max_new_tokens=5, seed=2)[0])
            long.cancelled = True
            assert long.emit.finished.wait(60)
        finally:
            scheduler.close()


def test_the_queue_counts_live_jobs_only_and_a_deadline_ends_a_job(gen):
    scheduler = Scheduler(gen, max_batch=1, max_queue=1)
    try:
        long = job(gen, "First", 1, max_new_tokens=100000)
        scheduler.submit(long)
        deadline = time.monotonic() + 60
        while scheduler.running == 0:  # CHARS has no end token: the long job runs until its deadline
            assert time.monotonic() < deadline and not long.emit.finished.is_set()
            threading.Event().wait(0.01)
        gone = job(gen, "Re", 1)
        scheduler.submit(gone)
        scheduler.cancel(gone)  # its client went away while it waited: its place is free again
        late = job(gen, "All", 1, max_new_tokens=5)
        late.deadline = 0.0  # long past
        scheduler.submit(late)
        assert scheduler.cancelled == 1
        long.deadline = time.monotonic()
        assert long.emit.finished.wait(60) and long.emit.events[-1][1].finish_reason == "deadline"
        assert late.emit.finished.wait(60) and late.emit.events[-1][1].finish_reason == "deadline"
        assert gone.emit.events == []
    finally:
        scheduler.close()


def test_a_full_queue_refuses_and_a_failed_job_leaves_the_worker_running(gen):
    scheduler = Scheduler(gen, max_batch=1, max_queue=1)
    try:
        long = job(gen, "First", 1, max_new_tokens=2000)
        scheduler.submit(long)
        while scheduler.running == 0:  # the worker has taken it: the queue is empty again
            threading.Event().wait(0.01)
        bad = job(gen, "Re", 1, max_new_tokens=-1)  # fails in the engine (a SettingError)
        scheduler.submit(bad)
        with pytest.raises(QueueFull):
            scheduler.submit(job(gen, "All", 1))
        long.cancelled = True
        assert long.emit.finished.wait(30) and long.emit.events[-1][1].finish_reason == "cancelled"
        assert bad.emit.finished.wait(30) and bad.emit.events[-1][0] == "error"
        good = job(gen, "All", 4)
        scheduler.submit(good)
        assert good.emit.finished.wait(30) and good.emit.events[-1][0] == "done"
    finally:
        scheduler.close()


# ---------------------------------------------------------------------------------------------
# Tools: a row of a chat model with the tool tokens runs the calculator as generate(tools=True) does


# (question, seed, max_new_tokens, temperature, stop, tools)
TOOL_ROWS = [("what is six times seven", 0, 40, 1.0, [], True), ("hello", 1, 30, 1.0, [], True),
             ("what is six times seven", 5, 40, 1.0, [], True),  # two calls
             ("what is six times seven", 5, 7, 0.0, [], True),  # max_new_tokens ends it inside the output "42"
             ("what is six times seven", 9, 40, 0.0, ["2"], True),  # a stop string in the output (the engine's too)
             ("add 2 3", 2, 25, 0.8, [], True), ("what is six times seven", 3, 30, 1.0, [], False)]


def tool_job(gen, question, seed, max_new_tokens, temperature, stop, use_tools, **extra):
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, seed=seed, stop=stop,
                    top_logprobs=None, tools=use_tools, **extra)
    return Job(render_for_reply(gen.tokenizer, conversation((question, None))), settings, Recorder())


def fed_after_a_slide(sample, block_size):
    """Indexes into sample.ids of the tokens that generate() fed right after sliding its window (alone, with the
    default slide: the cache is full when a token is to be fed, and it keeps block_size - slide + 1 tokens)."""
    pos, found = len(sample.prompt_ids), []
    for k in range(len(sample.ids) - 1):  # the last token is never fed
        if pos == block_size:
            found.append(k)
            pos = block_size - block_size // 4
        pos += 1
    return found


def test_tool_calls_give_generates_replies_alone_and_in_any_mix():
    """Rows that call the calculator (forced outputs fed in the middle of a reply, a reply ended by max_new_tokens
    or a stop string inside an output, windows sliding past block_size 32) beside a row without tools, in two mixes:
    each Sample (ids, which were forced, the calls, the engine's text) is Generator.replies(tools=True)'s for that
    conversation and seed alone. The streamed text is the final text only, and each call is reported with its
    tokens."""
    gen = Generator(*calculator_model())
    chat = gen.tokenizer.chat_ids
    alone = [gen.replies([conversation((q, None))], max_new_tokens=n, temperature=t, seed=seed, stop=stop,
                         tools=use_tools)[0] for q, seed, n, t, stop, use_tools in TOOL_ROWS]
    # what the rows cover
    assert [len(s.calls) for s in alone] == [1, 1, 2, 1, 1, 1, 0]
    assert alone[3].forced[-1] and alone[3].finish_reason == "length"
    assert alone[4].forced[-1] and alone[4].finish_reason == "stop"
    assert any(f and not later for s in alone for f, later in zip(s.forced, s.forced[1:]))  # sampled after an output
    # a window slides in the middle of an output: the slots prefill the rest of the output after the kept context
    assert any(s.forced[k] and s.forced[k + 1] for s in alone for k in fed_after_a_slide(s, gen.config.block_size))
    for slots, order, chunk in [(2, range(len(TOOL_ROWS)), 3), (4, reversed(range(len(TOOL_ROWS))), 64)]:
        scheduler = Scheduler(gen, max_batch=slots, max_queue=8, stop_ids=reply_end_ids(gen.tokenizer))
        scheduler.decoder.prefill_chunk = chunk
        try:
            jobs = {i: tool_job(gen, *TOOL_ROWS[i]) for i in order}
            run_jobs(scheduler, jobs.values())
            for i, j in jobs.items():
                assert j.emit.events[-1] == ("done", alone[i]), (slots, i)
                text = "".join(e[1] for e in j.emit.events if e[0] == "text")
                calls = [e[1:] for e in j.emit.events if e[0] == "call"]
                if TOOL_ROWS[i][-1]:
                    final = tools.final_text(tools.reply_parts(gen.tokenizer, alone[i].ids))
                    assert text == (final if not TOOL_ROWS[i][4] else "")  # row 4 stops inside its first output
                    assert [c[:2] for c in calls] == alone[i].calls
                else:
                    assert text == alone[i].text and calls == []
        finally:
            scheduler.close()
    # a call's tokens, as the page needs them for the "why" view: the call and its output
    greedy = jobs[3].emit.events
    e = gen.tokenizer.encode
    assert [c for c in greedy if c[0] == "call"] == [("call", "6*7", "42", [
        chat["<|python_start|>"], *e("6*7"), chat["<|python_end|>"], chat["<|output_start|>"], *e("4")])]
