"""
Measure a model: loss on a prepared data directory, or exact-match accuracy on conversations.

    python eval.py (--ckpt DIR | --init-from gpt2) --data PATH [--max N] [--batch-size N]
                   [--max-new-tokens N] [--json] [--device D]
    python eval.py (--ckpt DIR | --init-from gpt2) --task hellaswag [--data FILE.jsonl] [--max N]
    python eval.py (--ckpt DIR | --init-from gpt2) --harness TASK[,TASK...] [--harness-include DIR] [--max N]

PATH is one of:
    a prepared data directory  loss, perplexity and bits per byte on its val split (below)
    FILE.jsonl, FILE.parquet   chat records ({"messages": [...]}, or Alpaca's instruction/output): the
                               model answers the last assistant turn of each conversation given the turns
                               before it, greedily; accuracy is exact match with that turn, whitespace
                               normalised (runs of whitespace are one space, ends stripped)
    chat_tasks                 the built-in task set's val split, as prepare.py makes it (the tasks have their
                               own seed): the 500 questions no model fine-tuned on its train split has seen

Loss on a data directory: the val tokens are read in order, in windows of block_size + 1 tokens that
overlap by one (plain data: one stream, cut into consecutive windows, the last one shorter; chat data:
each conversation on its own, from its <|bos|>, in windows the same way), so every token after the
first of a stream or conversation is predicted exactly once, given the tokens before it in its window.
Chat data counts only the tokens the model learns to say (mask 1: the replies and their
<|assistant_end|>). loss is the mean cross-entropy over the counted tokens (nats), perplexity is
exp(loss), and bits_per_byte is the counted tokens' total cross-entropy in bits divided by the UTF-8
bytes of their text (tokenizer.token_byte_counts: end-of-text and chat tokens add bits but no bytes),
which compares models across tokenizers. --max N stops after N batches of --batch-size windows.

Accuracy on conversations: --max N takes the first N conversations. They are answered in batches of
--batch-size; a reply ends at <|assistant_end|> or after --max-new-tokens (default: the longest expected
answer of the batch in tokens, plus 8: a longer reply cannot match). A conversation too long for the
model's context loses its oldest turns first (counted as trimmed); one whose last user message alone is
longer than block_size gets no reply and counts as wrong (too_long). Needs a model fine-tuned on chat
data (its tokenizer has the chat tokens); a data directory works with any model whose tokenizer
prepared it.

--task hellaswag: multiple-choice accuracy on HellaSwag's validation split (downloaded once into
data/hellaswag/, or --data FILE.jsonl, a local copy in HellaSwag's own format), acc and acc_norm with
their 95 % intervals, beside GPT-2 124M's published scores (docs/evaluation.md says how they are scored).
--max N scores the first N examples.

--harness TASK[,TASK...]: the tasks of EleutherAI's lm-evaluation-harness (pip install -e '.[harness]'),
run on this model through lm_eval.simple_evaluate; prints its table. --harness-include DIR adds the
task YAML files of DIR; --max N limits each task to N examples.

--json prints one JSON object instead: {"loss", "perplexity", "bits_per_byte", "tokens", "bytes",
"batches", ...} or {"accuracy", "n", "correct", "trimmed", "too_long", ...}.
"""

import argparse
import itertools
import json
import math
import os
import sys

import numpy as np
import torch
from torch.nn import functional as F

from nanoforge import chat_format, chat_tasks, checkpoint, cli, gpt2, harness, hellaswag, loading, multiple_choice, records
from nanoforge.config import ConfigError
from nanoforge.data import DataError, open_array, open_split, read_meta
from nanoforge.device import resolve_device
from nanoforge.engine import Generator
from nanoforge.errors import UserError
from nanoforge.tokenizer import TokenizerError, token_byte_counts, tokenizer_from_dict

EXAMPLES = 3  # right and wrong answers shown


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
        mask = open_array(data_dir, "val_mask.bin", np.uint8, meta["val_tokens"])
        starts = open_array(data_dir, "val_starts.bin", np.int64, meta["val_conversations"])
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
def evaluate_loss(model, tokenizer, data_dir, batch_size, max_batches=None):
    """Loss, perplexity and bits per byte over the val split's windows (the first max_batches batches)."""
    device = next(model.parameters()).device
    byte_counts = torch.from_numpy(token_byte_counts(tokenizer))
    nats, tokens, nbytes, n = 0.0, 0, 0, 0
    for x, y in batches(val_windows(data_dir, tokenizer, model.config.block_size), batch_size):
        if max_batches is not None and n == max_batches:
            break
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


def show_examples(answers):
    for label, want in (("right", True), ("wrong", False)):
        shown = [a for a in answers if a[3] == want][:EXAMPLES]
        if shown:
            print(f"{label}:")
        for messages, reply, expected, _ in shown:
            question = messages[-1]["content"].replace("\n", " ")
            said = "(too long to answer)" if reply is None else repr(reply)
            print(f"  {question[:60]!r} -> {said}" + ("" if want else f" (expected {expected!r})"))


def run_task(args):
    """--task hellaswag or --harness TASK,...: print the accuracy (or the harness's table)."""
    if args.task and args.harness:
        raise ConfigError("pass --task or --harness, not both")
    model, tokenizer = loading.load_model_from_args(args, resolve_device(args.device))
    if args.harness:
        tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
        results, table = harness.run_tasks(model, tokenizer, tasks, args.max, args.harness_include, args.batch_size)
        print(json.dumps(results["results"]) if args.json else table)
        return
    examples = hellaswag.load(args.data, args.max)
    results = {"task": args.task, **multiple_choice.evaluate(model, tokenizer, examples, args.batch_size)}
    if args.json:
        print(json.dumps(results))
        return
    for name in ("acc", "acc_norm"):
        low, high = results[f"{name}_ci95"]
        right = results["correct" if name == "acc" else "correct_norm"]
        print(f"{args.task} {name:8s} {results[name]:.2%} (95 % CI {low:.2%} to {high:.2%}; {right}/{results['n']})")
    print(f"reference: {hellaswag.REFERENCE}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_arguments(parser)
    parser.add_argument("--data", help="prepared data directory, chat JSONL file, or chat_tasks; with --task "
                        "hellaswag: a local copy of its validation file")
    parser.add_argument("--task", choices=["hellaswag"], help="multiple-choice accuracy on this task")
    parser.add_argument("--harness", metavar="TASK[,TASK...]", help="lm-evaluation-harness tasks to run")
    parser.add_argument("--harness-include", metavar="DIR", help="directory of extra harness task YAML files")
    parser.add_argument("--max", type=int, metavar="N", help="data directory: at most N batches; chat: the first N "
                        "conversations; --task: the first N examples; --harness: N examples per task")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="windows, conversations or task rows "
                        "(endings) per forward pass")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="chat: most tokens per reply "
                        "(default: the batch's longest expected answer + 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        for name in ("max", "batch_size", "max_new_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if args.task or args.harness:
            return run_task(args)
        if args.data is None:
            raise ConfigError("pass --data PATH (or --task hellaswag, or --harness TASK)")
        is_data_dir = os.path.isdir(args.data)
        if not is_data_dir and args.data != "chat_tasks" and not os.path.isfile(args.data):
            raise EvalError(f"--data '{args.data}' is neither a prepared data directory, a chat JSONL or Parquet "
                            "file nor chat_tasks: prepare data with `python prepare.py SOURCE --out DIR` and pass DIR")
        model, tokenizer = loading.load_model_from_args(args, resolve_device(args.device))
        if is_data_dir:
            results = evaluate_loss(model, tokenizer, args.data, args.batch_size, args.max)
        else:
            examples = read_examples(args.data)[: args.max]
            results, answers = evaluate_accuracy(Generator(model, tokenizer), examples, args.batch_size,
                                                 args.max_new_tokens)
    except (EvalError, ConfigError, DataError, chat_format.ChatError, records.RecordError, checkpoint.CheckpointError,
            gpt2.GPT2Error, TokenizerError, UserError, OSError) as e:
        sys.exit(f"eval.py: error: {e}")
    results = {"data": args.data, **results}
    if args.json:
        print(json.dumps(results))
    elif is_data_dir:
        bpb = "n/a" if results["bits_per_byte"] is None else f"{results['bits_per_byte']:.4f}"
        print(f"{args.data} val: loss {results['loss']:.4f} | perplexity {results['perplexity']:.2f} | "
              f"bits per byte {bpb} ({results['tokens']:,} tokens, {results['bytes']:,} bytes, "
              f"{results['batches']} batches)")
    else:
        show_examples(answers)
        note = "".join(f"; {results[key]} {text}" for key, text in (
            ("trimmed", "lost their oldest turns to fit the context"),
            ("too_long", "had a last message longer than the context: counted wrong")) if results[key])
        print(f"{args.data}: accuracy {results['accuracy']:.1%} ({results['correct']}/{results['n']} exact "
              f"matches{note})")


if __name__ == "__main__":
    main()
