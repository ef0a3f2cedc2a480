"""
Multiple-choice scoring: the one routine behind HellaSwag and every task of its shape (a context, a few
endings, one of them right), and behind the lm-evaluation-harness bridge (harness.py).

Each ending is scored by the log-likelihood the model gives its tokens after the context's, as GPT-2's,
GPT-3's and the harness's papers score them. Two predictions follow, named as the literature names them:

    acc        the ending with the highest summed log-likelihood
    acc_norm   the ending with the highest log-likelihood per token (length-normalised), so a long
               ending is not penalised for having more tokens to be wrong about; this is how
               build-nanogpt and llm.c score HellaSwag (GPT-2 124M: 29.55 %). lm-evaluation-harness
               normalises by the ending's length in characters instead (its hellaswag: 31.14 %).

Context and ending are tokenized together and split where the context's own tokens end (encode_pair:
the ending keeps its leading space, so a BPE splits them where a word starts); a chat model reads them
with its base tokenizer, as it reads plain text. Rows longer than block_size + 1 tokens keep their end: the context loses
its oldest tokens, never the ending (an ending longer than block_size cannot be scored and is an error).
Rows are scored in batches sorted by length, so padding costs little and the work is the forward passes.
"""

import math
from dataclasses import dataclass

import torch

from nanoforge.errors import UserError
from nanoforge.tokenizer import TokenizerError

Z95 = 1.959964  # the standard normal's 97.5th percentile: a two-sided 95 % interval
# Said beside every acc_norm this module reports, so that nobody sets it beside lm-eval's (per character, and
# for hellaswag with the activity label before the context: GPT-2 124M 31.14 % there, 29.55 % here).
ACC_NORM_CONVENTION = "per-token (build-nanogpt, llm.c)"
HARNESS_ACC_NORM_CONVENTION = "per-character (lm-evaluation-harness; its hellaswag prefixes the activity label)"


class TaskError(UserError):
    """A task or example this model cannot be scored on; the message says which and what to do."""


@dataclass
class Example:
    context: str
    endings: list  # each with the separator it needs (HellaSwag's start with a space)
    label: int  # index of the right ending


def start_ids(tokenizer):
    """The token an empty context starts from: end-of-text, or a newline for tokenizers that have none
    (as the engine starts an empty prompt)."""
    return [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n")


def encode_pair(tokenizer, context, continuation):
    """(context ids, continuation ids), split as lm-evaluation-harness splits them for a causal model, so
    both score the same tokens: whitespace that ends the context moves to the continuation ("Answer: " +
    "yes" reads as "Answer:" + " yes"), the two are encoded together, and the continuation is what follows
    the context's own tokens. An empty context is the start token."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return start_ids(tokenizer), tokenizer.encode(continuation)
    context_ids = tokenizer.encode(stripped)
    return context_ids, tokenizer.encode(stripped + continuation)[len(context_ids):]


def fit_row(context_ids, continuation_ids, block_size):
    """The model's input (at most block_size tokens) and the number of continuation tokens, which are the
    targets of its last positions: the row keeps its end when it is too long."""
    if len(continuation_ids) > block_size:
        raise TaskError(f"an ending of {len(continuation_ids)} tokens does not fit the model's block_size "
                        f"{block_size}: it cannot be scored with this model (use --max to score fewer examples, "
                        "or a model with a longer context)")
    if not continuation_ids:
        raise TaskError("an ending is empty after tokenization: every ending needs text to score")
    row = (context_ids + continuation_ids)[-(block_size + 1):]
    return row, len(continuation_ids)


@torch.no_grad()
def continuation_logprobs(model, pairs, batch_size=32, vocab_size=None):
    """For each (context ids, continuation ids): (summed log-probability of the continuation given the
    context, whether greedy decoding would have produced it), in the order given. The rows run in
    batches of batch_size, longest first, right-padded (padding comes after every scored position).
    vocab_size: the tokenizer's; a model in training may pad its vocabulary (vocab_multiple) with ids no
    text maps to, and these are left out of the softmax, as loading a checkpoint for inference cuts them."""
    device = next(model.parameters()).device
    rows = [fit_row(c, x, model.config.block_size) for c, x in pairs]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        T = len(rows[chunk[0]][0]) - 1
        idx = torch.zeros(len(chunk), T, dtype=torch.long)
        for b, i in enumerate(chunk):
            row = rows[i][0]
            idx[b, : len(row) - 1] = torch.tensor(row[:-1])
        logits, _ = model(idx.to(device))  # (B, T, vocab_size)
        for b, i in enumerate(chunk):
            row, n = rows[i]
            # positions len(row) - 1 - n .. len(row) - 2 predict the continuation's n tokens
            scored = logits[b, len(row) - 1 - n : len(row) - 1, :vocab_size].float().log_softmax(-1)  # (n, vocab)
            target = torch.tensor(row[-n:], device=device)
            logprob = scored.gather(1, target[:, None]).sum().item()
            results[i] = (logprob, bool((scored.argmax(-1) == target).all()))
    return results


def encode_examples(tokenizer, examples):
    """[(context ids, ending ids)] of every ending of every example, in order; an example the tokenizer
    cannot encode is named."""
    pairs = []
    for n, example in enumerate(examples, 1):
        try:
            pairs += [encode_pair(tokenizer, example.context, ending) for ending in example.endings]
        except TokenizerError as e:
            raise TaskError(f"example {n}: {e} (this model's vocabulary cannot hold the task's text: evaluate a "
                            "model with a byte-level tokenizer, bpe or gpt2)") from None
    return pairs


def score_examples(model, tokenizer, examples, batch_size=32):
    """[(summed log-likelihoods, token counts)] per example, one entry per ending."""
    pairs = encode_examples(tokenizer, examples)
    logprobs = continuation_logprobs(model, pairs, batch_size, tokenizer.vocab_size)
    scores, i = [], 0
    for example in examples:
        k = len(example.endings)
        scores.append(([lp for lp, _ in logprobs[i : i + k]], [len(x) for _, x in pairs[i : i + k]]))
        i += k
    return scores


def count_correct(examples, scores):
    """(right by acc, right by acc_norm) over the examples."""
    acc = acc_norm = 0
    for example, (sums, counts) in zip(examples, scores):
        acc += max(range(len(sums)), key=lambda j: sums[j]) == example.label
        acc_norm += max(range(len(sums)), key=lambda j: sums[j] / counts[j]) == example.label
    return acc, acc_norm


def wilson_interval(correct, n):
    """The 95 % Wilson score interval of a proportion (sound at small n and near 0 or 1, unlike p ± 1.96 SE)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def results(correct, correct_norm, n):
    """The report: acc and acc_norm with their 95 % intervals, and the counts."""
    out = {"n": n, "correct": correct, "correct_norm": correct_norm, "acc_norm_convention": ACC_NORM_CONVENTION}
    for name, k in (("acc", correct), ("acc_norm", correct_norm)):
        out[name] = k / n if n else 0.0
        out[f"{name}_ci95"] = list(wilson_interval(k, n))
    return out


def evaluate(model, tokenizer, examples, batch_size=32, ddp=None):
    """acc and acc_norm over the examples. Under torchrun (ddp enabled) each process scores every
    world_size-th example and the counts are summed, so every process returns the totals."""
    if ddp is not None and ddp.enabled:
        examples = examples[ddp.rank :: ddp.world_size]
    was_training = model.training
    model.eval()
    try:
        correct, correct_norm = count_correct(examples, score_examples(model, tokenizer, examples, batch_size))
    finally:
        model.train(was_training)
    counts = [(correct, correct_norm, len(examples))]
    if ddp is not None:
        counts = ddp.gather(counts[0])
    return results(*(sum(column) for column in zip(*counts)))
