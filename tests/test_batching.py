"""The engine's per-row settings, cancellation and log-probabilities, the batching scheduler, and the "why"
view's explain_step: each against what it must equal (a row alone, the model's own softmax, explain())."""

import threading
import time

import pytest
import torch
import torch.nn.functional as F

from nanoforge.batching import Job, QueueFull, Scheduler
from nanoforge.engine import Generator
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
        bad = [job(gen, "Re", 2, top_p=0.0), job(gen, "All", 3, top_logprobs=gen.config.vocab_size + 1)]
        run_jobs(scheduler, [good, *bad])
        assert good.emit.events[-1] == ("done", gen.generate(["First"], max_new_tokens=20, seed=1)[0])
        assert [j.emit.events[-1][0] for j in bad] == ["error", "error"]
        assert "top_p" in str(bad[0].emit.events[-1][1]) and "top_logprobs" in str(bad[1].emit.events[-1][1])
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
        while scheduler.running == 0:
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
