"""nanoforge/sampling.py and the engine's per-row settings against hand-computed values: the nucleus of a
distribution written down, the inverse-CDF pick at chosen uniforms, the repetition penalty's arithmetic, the
text a stream releases token by token, prompt-lookup drafts, each setting's boundary, and the log-probabilities
the engine reports against log_softmax of logits we set."""

import math

import pytest
import torch

from nanoforge.engine import Generator
from nanoforge.sampling import (SettingError, TextStream, candidates, check_lookup, check_settings, lookup_draft,
                                penalize_repetition, sample_from)
from nanoforge.tokenizer import ByteTokenizer, CharTokenizer
from test_references import LOGITS, TOKENS, fixed_logits_model

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])


@pytest.mark.parametrize("top_p, kept", [(0.5, 1), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)])
def test_nucleus_is_the_smallest_set_reaching_top_p(top_p, kept):
    """Probabilities 0.5, 0.3, 0.15, 0.05: the nucleus for top_p holds the most likely tokens until their sum
    reaches top_p (Holtzman et al. 2019)."""
    values, ids = candidates(PROBS.log(), top_p=top_p)
    finite = torch.isfinite(values[0])
    assert int(finite.sum()) == kept and bool(finite[:kept].all())
    if top_p < 1.0:
        assert ids[0].tolist() == [0, 1, 2, 3]  # sorted, most likely first
    else:
        assert ids is None  # no filter: column j is token j


def test_top_k_keeps_the_k_largest_and_zero_or_too_many_keeps_all():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5, 0.0]])
    values, ids = candidates(logits, top_k=2)
    assert ids.tolist() == [[1, 3]] and values.tolist() == [[2.0, 1.5]]
    values, ids = candidates(logits, top_k=9)
    assert ids.tolist() == [[1, 3, 0, 4, 2]]
    assert candidates(logits, top_k=0)[1] is None and candidates(logits)[1] is None
    values, ids = candidates(logits, top_k=3, top_p=0.7)  # top-k first, the nucleus within it
    probs = torch.tensor([2.0, 1.5, 0.1]).softmax(0)  # 0.54, 0.33, 0.13: the first two reach 0.7
    assert probs[0] < 0.7 < probs[0] + probs[1]
    assert ids.tolist() == [[1, 3, 0]] and torch.isfinite(values).tolist() == [[True, True, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, -1.0]]


@pytest.mark.parametrize("u, token", [(0.0, 0), (0.49, 0), (0.51, 1), (0.79, 1), (0.81, 2), (0.999, 2)])
def test_pick_is_the_inverse_cdf_at_u(u, token):
    """Probabilities 0.5, 0.3, 0.2: cumulative 0.5, 0.8, 1.0; u picks the first token whose cumulative
    probability exceeds it."""
    values = torch.tensor([[0.5, 0.3, 0.2]]).log()
    assert sample_from(values, None, torch.tensor([u])).tolist() == [token]
    ids = torch.tensor([[7, 3, 5]])
    assert sample_from(values, ids, torch.tensor([u])).tolist() == [[7, 3, 5][token]]


def test_pick_never_takes_a_filtered_token_and_rows_are_independent():
    values = torch.tensor([[0.0, float("-inf"), 0.0], [float("-inf"), 0.0, float("-inf")]])
    assert sample_from(values, None, torch.tensor([0.5, 0.999])).tolist() == [2, 1]
    assert sample_from(values, None, torch.tensor([0.4999, 0.0])).tolist() == [0, 1]


def test_stream_releases_text_except_a_possible_stop_start():
    stream = TextStream(CharTokenizer.train("abcx"), stop=["bc"])
    ids = {c: i for i, c in enumerate("abcx")}
    assert [stream.push(ids[c]) for c in "ab"] == ["a", ""]  # "b" might start "bc": held back
    assert stream.push(ids["x"]) == "bx"  # it did not
    assert [stream.push(ids[c]) for c in "abc"] == ["a", "", ""] and stream.stopped
    assert stream.text == "abxa" and stream.finish() == ""
    plain = TextStream(CharTokenizer.train("abcx"), stop=["", "xx"])
    assert [plain.push(ids[c]) for c in "axb"] == ["a", "", "xb"]
    assert plain.push(ids["x"]) == "" and plain.finish() == "x" and plain.text == "axbx"


def test_stream_holds_back_every_prefix_of_a_longer_stop_string():
    stream = TextStream(CharTokenizer.train("abcx"), stop=["abc"])
    ids = {c: i for i, c in enumerate("abcx")}
    assert [stream.push(ids[c]) for c in "xa"] == ["x", ""]  # "a" may start "abc"
    assert stream.push(ids["b"]) == ""  # so may "ab"
    assert stream.push(ids["c"]) == "" and stream.text == "x" and stream.stopped


def test_stream_waits_for_a_whole_utf8_character():
    stream = TextStream(ByteTokenizer())
    assert [stream.push(b) for b in "€".encode()] == ["", "", "€"]  # three bytes, one character
    assert stream.push(0xE2) == "" and stream.finish() == "\ufffd"  # an unfinished character at the end
    invalid = TextStream(ByteTokenizer())
    pieces = [invalid.push(0xFF) for _ in range(TextStream.MAX_PENDING)]
    assert pieces[:-1] == [""] * (TextStream.MAX_PENDING - 1) and pieces[-1]  # given up on after 16 bytes


def test_lookup_draft_by_hand():
    tokens = [1, 2, 3, 9, 8, 1, 2, 3]
    assert lookup_draft(tokens, 2) == [9, 8]  # [1, 2, 3] was followed by 9, 8
    assert lookup_draft(tokens, 10) == [9, 8, 1, 2, 3]
    assert lookup_draft(tokens, 0) == [] and lookup_draft([5], 3) == []
    assert lookup_draft([4, 7, 6, 4, 7, 5, 4], 2) == [7, 5]  # the latest earlier 4 wins
    assert lookup_draft([4, 7, 6, 4, 7, 5, 4, 7], 2, max_ngram=1) == [5, 4]
    assert lookup_draft([1, 2, 5, 9, 2], 2, max_ngram=3) == [5, 9]  # no 2- or 3-gram match: the 1-gram's
    assert lookup_draft([1, 2, 3], 2) == []


@pytest.mark.parametrize("name, value", [("max_new_tokens", 0), ("temperature", -0.1), ("temperature", math.nan),
                                         ("top_k", -1), ("top_p", 0.0), ("top_p", 1.01), ("repetition_penalty", 0.0),
                                         ("slide", 0), ("slide", 17)])
def test_each_setting_is_refused_just_past_its_range(name, value):
    good = dict(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0, slide=16)
    check_settings(**good, block_size=16)  # the boundaries themselves are allowed
    check_settings(**{**good, "top_k": None, "slide": 1, "temperature": 0.5}, block_size=16)
    with pytest.raises(SettingError) as e:
        check_settings(**{**good, name: value}, block_size=16)
    assert e.value.name == name and str(e.value).startswith(f"{name} must be")


def test_lookup_is_allowed_only_for_greedy_decoding_of_one_prompt():
    check_lookup(0, 1.0, 1.3, 4)
    check_lookup(3, 0, 1.0, 1)
    check_lookup(1, 0, 1.0, 1)  # a draft of one token is allowed
    for bad in [(3, 0.5, 1.0, 1), (3, 0, 1.1, 1), (3, 0, 1.0, 2), (-1, 0, 1.0, 1)]:
        with pytest.raises(SettingError, match="lookup must be"):
            check_lookup(*bad)


def test_engine_reports_log_probabilities_of_the_model_before_temperature():
    got = []
    gen = Generator(fixed_logits_model(), TOKENS)
    sample = gen.generate([[0]], max_new_tokens=3, temperature=0.5, seed=0, top_logprobs=2,
                          on_token=lambda row, token, lp: got.append((token, lp)))[0]
    expected = torch.log_softmax(LOGITS.double(), 0)
    assert [token for token, _ in got] == sample.ids and len(got) == 3
    for token, (chosen, top) in got:
        assert chosen == pytest.approx(expected[token].item(), abs=1e-5)
        assert [i for i, _ in top] == [0, 1]
        assert [v for _, v in top] == pytest.approx(expected[:2].tolist(), abs=1e-5)


def test_engine_rows_keep_their_own_temperature_seed_and_length():
    """Per-row settings: row i of a batch samples as it would alone (a greedy row takes token 0 every time)."""
    gen = Generator(fixed_logits_model(), TOKENS)
    rows = gen.generate([[0], [1], [2]], max_new_tokens=[4, 6, 5], temperature=[0, 1.5, 1.5], seed=[5, 6, 6])
    assert rows[0].ids == [0] * 4 and [len(r.ids) for r in rows] == [4, 6, 5]
    assert rows[1].ids[:5] == rows[2].ids  # the same seed and temperature: the same draws
    alone = gen.generate([[1]], max_new_tokens=6, temperature=1.5, seed=6)[0]
    assert alone.ids == rows[1].ids and alone.finish_reason == rows[1].finish_reason == "length"
    again = gen.generate([[1], [1]], max_new_tokens=6, temperature=1.5, seed=6)
    assert again[0].ids == alone.ids and again[1].ids != alone.ids  # seed once: row i gets seed + i
    with pytest.raises(SettingError, match="temperature must be one value, or a list of 2"):
        gen.generate([[1], [2]], temperature=[1.0])
    with pytest.raises(SettingError, match="stop must be"):
        gen.generate([[1], [2]], stop=[["a"]])


def test_unseeded_rows_draw_distinct_seeds():
    """seed=None takes a fresh random seed per row from a large range: 40 rows of 30 tokens never repeat one
    another (two independent rows agree on all 30 tokens with probability ~1e-12 here; a seed range of a
    hundred or so would repeat a row almost surely)."""
    torch.manual_seed(0)
    samples = Generator(fixed_logits_model(), TOKENS).generate([[0]] * 40, max_new_tokens=30, temperature=1.0)
    assert len({tuple(s.ids) for s in samples}) == 40


def test_successive_draws_of_a_row_are_independent_after_a_long_prompt():
    """Each generated token takes its own random number: with the same distribution at every step, a row's
    first two tokens agree with probability sum(p^2) (0.24 here), never always. A 12-token prompt: the
    numbers are counted from the first generated token, not from the start of the sequence."""
    probs = torch.softmax(LOGITS.double() / 2.0, 0)
    samples = Generator(fixed_logits_model(), TOKENS).generate([list(range(6)) * 2] * 100, max_new_tokens=30,
                                                              temperature=2.0, seed=7)
    same_first_pair = sum(s.ids[0] == s.ids[1] for s in samples)
    assert abs(same_first_pair - 100 * (probs**2).sum().item()) < 20  # ~4.6 standard deviations
    same_last_pair = sum(s.ids[-2] == s.ids[-1] for s in samples)
    assert abs(same_last_pair - 100 * (probs**2).sum().item()) < 20
