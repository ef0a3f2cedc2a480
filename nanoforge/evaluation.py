"""
Measuring a model: loss, perplexity and bits per byte on a prepared data directory's val split, and exact-match
accuracy on conversations (eval.py's two modes; its docstring says how each is computed).
"""


import itertools
import math

import numpy as np
import torch
from torch.nn import functional as F

from nanoforge import chat_format, chat_tasks, records
from nanoforge.data import open_chat_split, open_split, read_meta
from nanoforge.errors import UserError
from nanoforge.tokenizer import token_byte_counts, tokenizer_from_dict


class EvalError(UserError):
    """Data that this model cannot be evaluated on; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# Loss, perplexity and bits per byte on a prepared data directory

def same_ids(a, b):
    """Whether every id of two tokenizers means the same, names and pre-split patterns aside, and the chat
    tokens too: they come after the base vocabulary, so a chat model reads its base tokenizer's data with
    every id unchanged (chat data itself needs a chat model: checked before)."""
    def meaning(tokenizer):
        return {k: v for k, v in tokenizer.to_dict().items() if k not in ("name", "pattern", "chat_tokens")}

    return meaning(a) == meaning(b)


def val_windows(data_dir, tokenizer, block_size):
    """(x, y) pairs of the val split, in order: x (L,) and y (L,) int64 arrays, L <= block_size, y -1
    where a token is not counted. Every token after the first of a stream or conversation is a target once."""
    meta = read_meta(data_dir)
    data_tokenizer = tokenizer_from_dict(meta["tokenizer"])
    if meta.get("chat") and not hasattr(tokenizer, "chat_ids"):
        raise EvalError(f"'{data_dir}' holds chat data, but this model's tokenizer has no chat tokens: evaluate a "
                        "model fine-tuned on chat data, or this model on plain text prepared with its tokenizer")
    if not same_ids(data_tokenizer, tokenizer):
        raise EvalError(f"'{data_dir}' was prepared with another tokenizer ({data_tokenizer.kind}, "
                        f"{data_tokenizer.vocab_size} tokens) than the model's ({tokenizer.kind}, "
                        f"{tokenizer.vocab_size} tokens): prepare it with the model's tokenizer "
                        "(--tokenizer-from CKPT)")
    tokens = open_split(data_dir, "val", meta)
    if meta.get("chat"):
        mask, starts = open_chat_split(data_dir, "val", meta, len(tokens))
        segments = zip(starts.tolist(), [*starts[1:].tolist(), len(tokens)])
    else:
        mask, segments = None, [(0, len(tokens))]
    for start, end in segments:
        for s in range(start, end - 1, block_size):
            e = min(s + block_size + 1, end)
            window = np.asarray(tokens[s:e], dtype=np.int64)
            y = window[1:].copy()
            if mask is not None:
                y[np.asarray(mask[s + 1 : e]) == 0] = -1
            yield window[:-1], y


def batches(windows, batch_size):
    """Windows stacked into (x, y) batches (B, L), padded on the right (padding is never a target)."""
    windows = iter(windows)
    while group := list(itertools.islice(windows, batch_size)):  # one batch in memory at a time
        L = max(len(x) for x, _ in group)
        x = torch.zeros(len(group), L, dtype=torch.long)
        y = torch.full((len(group), L), -1, dtype=torch.long)
        for b, (xs, ys) in enumerate(group):
            x[b, : len(xs)], y[b, : len(ys)] = torch.from_numpy(xs), torch.from_numpy(ys)
        yield x, y


@torch.no_grad()
def evaluate_loss(model, tokenizer, data_dir, batch_size, max_windows=None):
    """Loss, perplexity and bits per byte over the val split's windows (the first max_windows of them)."""
    device = next(model.parameters()).device
    byte_counts = torch.from_numpy(token_byte_counts(tokenizer))
    nats, tokens, nbytes, n = 0.0, 0, 0, 0
    windows = itertools.islice(val_windows(data_dir, tokenizer, model.config.block_size), max_windows)
    for x, y in batches(windows, batch_size):
        logits, _ = model(x.to(device))  # (B, L, vocab_size)
        nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten().to(device), ignore_index=-1,
                                reduction="sum").item()
        counted = y[y != -1]
        tokens, nbytes, n = tokens + len(counted), nbytes + int(byte_counts[counted].sum()), n + 1
    if not tokens:
        raise EvalError(f"the val split of '{data_dir}' has no token to predict")
    loss = nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": nats / math.log(2) / nbytes if nbytes else None,
            "tokens": tokens, "bytes": nbytes, "batches": n}


# ---------------------------------------------------------------------------------------------
# Exact-match accuracy on conversations

def read_examples(path):
    """[(messages before the last assistant turn, that turn's text)] of a chat JSONL or Parquet file,
    or of chat_tasks' val split."""
    if path == "chat_tasks":
        _, val = chat_tasks.chat_tasks(0, chat_tasks.CHAT_TASKS_VAL, chat_tasks.CHAT_TASKS_SEED)  # val does not depend on n_train
        return [(m[:-1], m[-1]["content"]) for m in val]
    examples = []
    for _, messages in chat_format.read_conversations(path):
        if isinstance(messages, records.BadRecord):
            raise EvalError(str(messages))
        examples.append((messages[:-1], messages[-1]["content"]))
    if not examples:
        raise EvalError(f"'{path}' holds no conversation")
    return examples


def normalize(text):
    return " ".join(text.split())


def evaluate_accuracy(generator, examples, batch_size, max_new_tokens=None):
    """Answer every example greedily, in batches. Returns the results and [(messages, reply, expected, right)];
    a conversation whose last user message alone does not fit the context gets no reply (None): wrong."""
    chat_format.require_chat_tokens(generator.tokenizer)
    answers, trimmed, too_long = [], 0, 0
    for i in range(0, len(examples), batch_size):
        group = examples[i : i + batch_size]
        longest = max(len(generator.tokenizer.encode(expected)) for _, expected in group)
        new_tokens = max_new_tokens or longest + 8
        asks = {}  # index in group -> the conversation as the model sees it
        for j, (messages, _) in enumerate(group):
            try:
                asks[j], dropped = chat_format.fit_to_context(generator.tokenizer, messages, generator.config.block_size,
                                                       new_tokens)
                trimmed += dropped > 0
            except chat_format.ChatError:
                too_long += 1
        replies = dict(zip(asks, generator.replies(list(asks.values()), max_new_tokens=new_tokens, temperature=0)))
        for j, (messages, expected) in enumerate(group):
            reply = replies[j].text if j in replies else None
            answers.append((messages, reply, expected, reply is not None and normalize(reply) == normalize(expected)))
    correct = sum(right for *_, right in answers)
    return {"accuracy": correct / len(answers), "n": len(answers), "correct": correct, "trimmed": trimmed,
            "too_long": too_long}, answers
