"""
Measure a model: loss on a prepared data directory, or exact-match accuracy on conversations.

    python eval.py --ckpt out/quickstart --data data/pystdlib
    python eval.py --ckpt out/sft_quickstart --data chat_tasks
    python eval.py --ckpt out/quickstart --task hellaswag [--data FILE.jsonl] [--max N]
    python eval.py --ckpt out/rl_quickstart --task addition [--samples K] [--max N]   # pass@1, pass@k, tool on/off
    python eval.py --init-from gpt2 --harness hellaswag,lambada_openai [--harness-include DIR] [--max N]

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
which compares models across tokenizers. --max N stops after the first N windows.

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

--task addition, multiplication, chat_tasks or gsm8k (nanoforge/tasks.py; gsm8k downloads GSM8K once, or
--data FILE.jsonl): the task's held-out problems (the first --max N, default 200), answered with the calculator
and without it. pass@1: answered greedily, the share the task's verifier rewards; pass@k (k = --samples, default
8): k answers sampled at --temperature (default 1), the share of problems with at least one rewarded (Chen et al.
2021's estimator with n = k). Without the tool, a call the model writes is not answered: the model writes the
output itself. --max-new-tokens (default 32) caps each reply.

--harness TASK[,TASK...]: the tasks of EleutherAI's lm-evaluation-harness (pip install -e '.[harness]'),
run on this model through lm_eval.simple_evaluate; prints its table. --harness-include DIR adds the
task YAML files of DIR; --max N limits each task to N examples.

--json prints one JSON object instead: {"loss", "perplexity", "bits_per_byte", "tokens", "bytes",
"batches", ...} or {"accuracy", "n", "correct", "trimmed", "too_long", ...}.
"""

import json
import os

from nanoforge import cli, harness, hellaswag, loading, multiple_choice, tasks
from nanoforge.reinforce import score_problems
from nanoforge.config import ConfigError
from nanoforge.device import resolve_device
from nanoforge import chat_format
from nanoforge.engine import Generator
from nanoforge.evaluation import EvalError, evaluate_accuracy, evaluate_loss, read_examples
from nanoforge.tokenizer import has_tools

EXAMPLES = 3  # right and wrong answers shown


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
        convention = f", {results['acc_norm_convention']}" if name == "acc_norm" else ""
        print(f"{args.task} {name:8s} {results[name]:.2%} (95 % CI {low:.2%} to {high:.2%}; {right}/{results['n']}"
              f"{convention})")
    print(f"reference: {hellaswag.REFERENCE}")


def run_verified_task(args):
    """--task addition (or another task with a verifier): pass@1 and pass@k with the tool and without it."""
    if not args.temperature > 0:
        raise ConfigError(f"--temperature must be above 0 (pass@k samples), got {args.temperature}")
    task = tasks.get_task(args.task, args.data)
    problems = task.problems("test", args.max or 200, tasks.TEST_SEED)
    model, tokenizer = loading.load_model_from_args(args, resolve_device(args.device))
    generator = Generator(model, tokenizer)
    chat_format.require_chat_tokens(tokenizer)
    modes = (True, False) if has_tools(tokenizer) else (False,)
    results = {"task": args.task, "n": len(problems)}
    for use_tools in modes:
        scores = score_problems(generator, task, problems, args.samples, args.temperature, use_tools,
                                args.max_new_tokens or 32, seed=0, batch_size=args.batch_size * 16)
        name = "with_tool" if use_tools else "without_tool"
        results[name] = {k: v for k, v in scores.items() if k.startswith("pass@")}
        if not args.json:
            right = [e for e in scores["examples"] if task.reward(tasks.Problem(e[0], e[2]), e[1]) > 0][:1]
            wrong = [e for e in scores["examples"] if task.reward(tasks.Problem(e[0], e[2]), e[1]) == 0][:2]
            for prompt, said, expected in right + wrong:
                print(f"  {prompt[:60]!r} -> {said!r}" + ("" if said.strip() == expected else f" (expected {expected!r})"))
            figures = ", ".join(f"{k} {v:.1%}" for k, v in results[name].items())
            print(f"{args.task} {name.replace('_', ' ')}: {figures} ({len(problems)} held-out problems)")
    if args.json:
        print(json.dumps(results))


@cli.command
def main(argv=None):
    parser = cli.parser(__doc__)
    cli.add_model_arguments(parser)
    parser.add_argument("--data", help="prepared data directory, chat JSONL or Parquet file, or chat_tasks; with "
                        "--task hellaswag: a local copy of its validation file")
    parser.add_argument("--task", choices=["hellaswag", *tasks.TASKS], help="hellaswag: multiple-choice accuracy; "
                        "a task with a verifier: pass@1 and pass@k on its held-out problems, with and without the tool")
    parser.add_argument("--samples", type=int, default=8, metavar="K", help="--task with a verifier: k of pass@k")
    parser.add_argument("--temperature", type=float, default=1.0, help="--task with a verifier: of pass@k's samples")
    parser.add_argument("--harness", metavar="TASK[,TASK...]", help="lm-evaluation-harness tasks to run")
    parser.add_argument("--harness-include", metavar="DIR", help="directory of extra harness task YAML files")
    parser.add_argument("--max", type=int, metavar="N", help="at most N examples: val windows of a data directory, "
                        "conversations, task examples (per task with --harness)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="examples per forward pass (task "
                        "rows: one per ending)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="chat: most tokens per reply "
                        "(default: the batch's longest expected answer + 8)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results")
    cli.add_device_arguments(parser, dtype=False)
    args = parser.parse_args(argv)
    for name in ("max", "batch_size", "max_new_tokens", "samples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.task in tasks.TASKS:
        return run_verified_task(args)
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
