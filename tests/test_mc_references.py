"""nanoforge/multiple_choice.py against values we did not compute with it: log-likelihoods of a model whose
next-token distribution we set (so every score is a sum of known log-probabilities), the Wilson intervals
published by Newcombe (1998, Statistics in Medicine 17:857, table I, method 3), and rows cut by hand."""

import pytest
import torch

from nanoforge.multiple_choice import (Example, TaskError, continuation_logprobs, count_correct, encode_pair,
                                       fit_row, results, score_examples, wilson_interval)
from nanoforge.tokenizer import ByteTokenizer, CharTokenizer
from test_references import LOGITS, TOKENS, fixed_logits_model

LOG_PROBS = torch.log_softmax(LOGITS.double(), 0).tolist()  # the same at every position of fixed_logits_model


@pytest.mark.parametrize("correct, n, low, high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                                   (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_equals_newcombes_table(correct, n, low, high):
    assert wilson_interval(correct, n) == pytest.approx((low, high), abs=5e-5)


def test_results_report_accuracies_and_their_intervals():
    out = results(81, 15, 263)
    assert (out["n"], out["correct"], out["correct_norm"]) == (263, 81, 15)
    assert out["acc"] == pytest.approx(81 / 263) and out["acc_norm"] == pytest.approx(15 / 263)
    assert out["acc_ci95"] == pytest.approx([0.2553, 0.3662], abs=5e-5)
    assert results(0, 0, 0)["acc"] == 0.0 and results(0, 0, 0)["acc_ci95"] == [0.0, 1.0]


def test_acc_takes_the_largest_sum_and_acc_norm_the_largest_mean_per_token():
    examples = [Example("c", ["a", "b"], 0), Example("c", ["a", "b"], 1), Example("c", ["a", "b", "x"], 2)]
    scores = [([-1.0, -2.0], [1, 4]),  # acc: ending 0 (right); per token -1 vs -0.5: acc_norm ending 1 (wrong)
              ([-1.0, -2.0], [1, 4]),  # acc wrong, acc_norm right
              ([-3.0, -5.0, -1.0], [1, 1, 1])]  # both right
    assert count_correct(examples, scores) == (2, 2)


def test_scores_are_sums_of_the_continuations_log_probabilities():
    """Every position's next-token distribution is softmax(LOGITS): an ending's score is the sum of its
    tokens' log-probabilities, and greedy is true only when every token is the most likely (token 0)."""
    model = fixed_logits_model()
    pairs = [([1, 2], [0, 0]), ([3], [2, 5, 1]), ([4, 4, 4, 4], [0]), ([2], [0, 1])]
    got = continuation_logprobs(model, pairs, batch_size=3)
    for (logprob, greedy), (_, continuation) in zip(got, pairs):
        assert logprob == pytest.approx(sum(LOG_PROBS[t] for t in continuation), abs=1e-5)
        assert greedy == all(t == 0 for t in continuation)
    small = continuation_logprobs(model, [([1], [2])], vocab_size=3)[0][0]  # a softmax over ids 0..2 only
    assert small == pytest.approx(LOGITS[2].item() - torch.logsumexp(LOGITS[:3], 0).item(), abs=1e-5)


def test_score_examples_groups_endings_per_example():
    examples = [Example("ab", ["a", "ff"], 0), Example("c", ["e"], 0)]
    scores = score_examples(fixed_logits_model(), TOKENS, examples, batch_size=2)
    assert scores == [([pytest.approx(LOG_PROBS[0], abs=1e-5), pytest.approx(2 * LOG_PROBS[5], abs=1e-5)], [1, 2]),
                      ([pytest.approx(LOG_PROBS[4], abs=1e-5)], [1])]


def test_rows_keep_their_end_and_too_long_or_empty_endings_are_refused():
    assert fit_row([1, 2, 3, 4], [5, 6], 4) == ([2, 3, 4, 5, 6], 2)  # block_size + 1: input and shifted targets
    assert fit_row([1], [5, 6], 4) == ([1, 5, 6], 2)
    assert fit_row([], [5, 6, 7, 8], 4) == ([5, 6, 7, 8], 4)
    with pytest.raises(TaskError, match="an ending of 5 tokens does not fit the model's block_size 4"):
        fit_row([1], [1, 2, 3, 4, 5], 4)
    with pytest.raises(TaskError, match="empty after tokenization"):
        fit_row([1], [], 4)


def test_trailing_whitespace_moves_to_the_continuation_and_an_empty_context_starts_from_the_start_token():
    chars = CharTokenizer.train("Answer: yes\n")
    context, continuation = encode_pair(chars, "Answer: ", "yes")
    assert chars.decode(context) == "Answer:" and chars.decode(continuation) == " yes"
    assert encode_pair(chars, "", "yes") == (chars.encode("\n"), chars.encode("yes"))  # no end-of-text token
    assert encode_pair(chars, "  ", "yes") == (chars.encode("\n"), chars.encode("  yes"))
    assert encode_pair(ByteTokenizer(), "", "hi") == ([256], list(b"hi"))


def test_evaluate_splits_examples_over_processes_and_sums_the_counts():
    """Ending "a" (token 0, the most likely) wins every example: examples labelled 0 are right, 1 wrong. Under
    torchrun, process 1 of 2 scores examples 1 and 3 and the counts of both processes are summed."""
    from types import SimpleNamespace
    from nanoforge.multiple_choice import evaluate
    model = fixed_logits_model().train()
    examples = [Example("b", ["a", "f"], label) for label in (0, 1, 0, 1)]
    alone = evaluate(model, TOKENS, examples)
    assert (alone["n"], alone["correct"], alone["correct_norm"]) == (4, 2, 2)
    assert model.training  # evaluate leaves the model in the mode it found it in
    other = (1, 1, 2)  # what process 0 found on examples 0 and 2
    ddp = SimpleNamespace(enabled=True, rank=1, world_size=2, gather=lambda counts: [other, counts])
    both = evaluate(model.eval(), TOKENS, examples, ddp=ddp)
    assert (both["n"], both["correct"], both["correct_norm"]) == (4, 1, 1)
    assert not model.training
