"""
Benchmark multiple-choice scoring (eval.py --task hellaswag) on this machine, in one run, with a model of
GPT-2 124M's shape (random weights: speed does not depend on them) on HellaSwag-shaped examples (four endings,
token lengths drawn as below: no tokenizer or data download needed):

- scoring: multiple_choice.continuation_logprobs, batched (--batch-size rows, longest first);
- forward bound: the same batches through model.forward alone, nothing else: what scoring cannot beat;
- one example per forward pass (its four rows padded together), as build-nanogpt's hellaswag.py scores.

    python -m bench.hellaswag_speed [--examples N] [--batch-size N] [--device cpu|cuda] [--dtype float32|bfloat16]

Prints examples/s for each and the ratios, with the machine's load average before and after: the figures
are only as good as the machine was idle. HellaSwag's 10,042 validation examples take 10042 / (examples/s).
"""

import argparse
import os
import platform
import random
import time

import torch

from model import GPT, GPTConfig
from nanoforge.multiple_choice import continuation_logprobs, fit_row

# HellaSwag's validation split in GPT-2 tokens, roughly: contexts of ~20-80 tokens, endings of ~10-40.
CONTEXT_TOKENS, ENDING_TOKENS = (20, 80), (10, 40)


def examples(n, vocab_size, seed=0):
    """n examples as [(context ids, ending ids)] x 4, lengths drawn uniformly from the ranges above."""
    rng = random.Random(seed)
    ids = lambda k: [rng.randrange(vocab_size) for _ in range(k)]  # noqa: E731
    return [[(context, ids(rng.randint(*ENDING_TOKENS))) for _ in range(4)]
            for context in (ids(rng.randint(*CONTEXT_TOKENS)) for _ in range(n))]


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def forward_only(model, pairs, batch_size, device):
    """model.forward over the batches continuation_logprobs makes (same rows, order and padding)."""
    rows = sorted((fit_row(c, x, model.config.block_size)[0] for c, x in pairs), key=len, reverse=True)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        idx = torch.zeros(len(chunk), len(chunk[0]) - 1, dtype=torch.long)
        for b, row in enumerate(chunk):
            idx[b, : len(row) - 1] = torch.tensor(row[:-1])
        model(idx.to(device))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (4 rows per example)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024)).to(device, getattr(torch, args.dtype)).eval()
    data = examples(args.examples, 50257)
    pairs = [pair for example in data for pair in example]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{name}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    continuation_logprobs(model, pairs[: 2 * args.batch_size], args.batch_size)  # warm-up
    scoring = timed(lambda: continuation_logprobs(model, pairs, args.batch_size), device)
    bound = timed(lambda: forward_only(model, pairs, args.batch_size, device), device)
    one_each = timed(lambda: [continuation_logprobs(model, example, 4) for example in data], device)
    n = args.examples
    print(f"scoring            {n / scoring:8.2f} examples/s  ({scoring:.2f} s for {n})")
    print(f"forward bound      {n / bound:8.2f} examples/s  (scoring takes {scoring / bound:.2f}x the forward passes)")
    print(f"one example/pass   {n / one_each:8.2f} examples/s  (batched scoring is {one_each / scoring:.2f}x faster)")
    print(f"HellaSwag's 10,042 examples at the scoring rate: {10042 / (n / scoring) / 60:.1f} min; "
          f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
