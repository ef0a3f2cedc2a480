"""
The engine's decoding options on a trained checkpoint: int8's quality against float32, and the
speed-up of prompt lookup on repetitive text.

    python -m bench.decode_options --ckpt out/shakespeare_char_cpu --data data/shakespeare_char --threads 1

int8 (Generator(quantize="int8"): int8 matrices, bfloat16 activations), against float32 and
bfloat16 engines on the same weights:
- greedy agreement: greedy continuations of --new-tokens from prompts cut out of the val split;
  how many tokens each precision produces before its first difference from float32, and the
  share of positions that agree.
- perplexity on held-out text: exp(mean cross-entropy) over consecutive block_size windows of
  the val split (each window scored from its own start), with every position's logits.
Prompt lookup (generate(lookup=k)): plain greedy and lookup greedy from a prompt that repeats
one val passage, timed in alternation (--rounds), with the tokens checked equal.
"""

import argparse
import math
import time

import torch
from torch.nn import functional as F

from nanoforge.data import Dataset
from nanoforge.engine import Generator
from nanoforge.machine import probe


@torch.no_grad()
def perplexity(gen, tokens, block_size, windows):
    """exp(mean next-token cross-entropy) of the engine's decoder over `windows` consecutive windows."""
    decoder = gen.decoder
    decoder.lm_head.keep = block_size  # every position's logits, not only the last one
    try:
        losses = []
        for w in range(windows):
            chunk = torch.from_numpy(tokens[w * block_size : (w + 1) * block_size + 1].astype("int64"))
            x, y = chunk[:-1].unsqueeze(0).to(gen.device), chunk[1:].to(gen.device)
            logits, _ = decoder(x)  # (1, block_size, vocab_size)
            losses.append(F.cross_entropy(logits[0].float(), y).item())
    finally:
        decoder.lm_head.keep = 1
    return math.exp(sum(losses) / len(losses))


def agreement(ids, reference):
    first = next((i for i, (a, b) in enumerate(zip(ids, reference)) if a != b), len(reference))
    return first, sum(a == b for a, b in zip(ids, reference)) / len(reference)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run directory or checkpoint file")
    parser.add_argument("--data", required=True, help="prepared data directory whose val split to score")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=8, help="greedy continuations compared per precision")
    parser.add_argument("--windows", type=int, default=200, help="val windows scored for perplexity")
    parser.add_argument("--lookup", type=int, nargs="+", default=[4, 8], help="draft lengths to time")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(probe().summary())
    if args.prompts < 2:
        parser.error(f"--prompts must be at least 2 (they are spread over the val split), got {args.prompts}")
    if args.threads:
        torch.set_num_threads(args.threads)

    gens = {"float32": Generator.from_checkpoint(args.ckpt, "cpu")}
    gens["bfloat16"] = Generator.from_checkpoint(args.ckpt, "cpu", dtype=torch.bfloat16)
    gens["int8"] = Generator.from_checkpoint(args.ckpt, "cpu", quantize="int8")
    block = gens["float32"].config.block_size
    val = Dataset(args.data, block).splits["val"]
    windows = min(args.windows, (len(val) - 1) // block)
    starts = [i * (len(val) - block) // args.prompts for i in range(args.prompts)]
    prompts = [val[s : s + block // 2].astype("int64").tolist() for s in starts]
    greedy = {name: [g.generate([p], max_new_tokens=args.new_tokens, temperature=0, stop_at_eot=False)[0].ids
                     for p in prompts] for name, g in gens.items()}
    print(f"{args.ckpt}: {args.prompts} prompts of {block // 2} val tokens, {args.new_tokens} greedy tokens each; "
          f"perplexity over {windows} val windows of {block} tokens")
    print("| precision | tokens before the first difference from float32 (min / mean) | positions agreeing "
          "| val perplexity | vs float32 |")
    print("|---|---|---|---|---|")
    base = perplexity(gens["float32"], val, block, windows)
    for name, gen in gens.items():
        firsts, shares = zip(*(agreement(ids, ref) for ids, ref in zip(greedy[name], greedy["float32"])))
        ppl = base if name == "float32" else perplexity(gen, val, block, windows)
        print(f"| {name} | {min(firsts)} / {sum(firsts) / len(firsts):.0f} of {args.new_tokens} "
              f"| {sum(shares) / len(shares):.1%} | {ppl:.4f} | {ppl / base - 1:+.2%} |", flush=True)

    gen = gens["float32"]
    passage = val[starts[1] : starts[1] + block // 2].astype("int64").tolist()
    prompt = passage * 2  # text that repeats itself, as quoted or edited text does
    print(f"\nprompt lookup, float32, {args.new_tokens} greedy tokens after a {len(passage)}-token passage written twice")
    print("| draft length | tok/s plain greedy | tok/s with lookup | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    for k in args.lookup:
        plain = lookup = 0.0
        for _ in range(args.rounds):  # alternate, so both see the same load
            start = time.perf_counter()
            a = gen.generate([prompt], max_new_tokens=args.new_tokens, temperature=0, stop_at_eot=False)
            plain += time.perf_counter() - start
            start = time.perf_counter()
            b = gen.generate([prompt], max_new_tokens=args.new_tokens, temperature=0, stop_at_eot=False, lookup=k)
            lookup += time.perf_counter() - start
        n = args.rounds * args.new_tokens
        print(f"| {k} | {n / plain:.1f} | {n / lookup:.1f} | {plain / lookup:.2f}× | {a == b} |", flush=True)


if __name__ == "__main__":
    main()
