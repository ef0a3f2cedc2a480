"""
Write a small multiple-choice file in HellaSwag's format from Python code a model trained on pystdlib has not
seen (the sources of an installed package, numpy by default): the context is a few lines of a file, the right
ending the next line, the wrong ones lines of the same indentation from other files. It stands in for
HellaSwag where the real file is not at hand, for the quickstart model (which knows Python, not English):

    python -m bench.code_choices --out data/code_choices.jsonl [--n 500] [--package numpy]
    python eval.py --ckpt out/quickstart --task hellaswag --data data/code_choices.jsonl

Only characters of the pystdlib vocabulary (printable ASCII, newline) are kept, so a char model can read it.
"""

import argparse
import glob
import importlib
import json
import os
import random
import string

CONTEXT_LINES = 4
ALLOWED = set(string.printable) - set("\x0b\x0c\r")


def candidate_lines(path):
    """The file's lines, when all its characters are ones the quickstart's vocabulary holds."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    return text.split("\n") if set(text) <= ALLOWED else []


def make_records(package, n, seed=0):
    rng = random.Random(seed)
    root = os.path.dirname(importlib.import_module(package).__file__)
    files = [lines for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
             if len(lines := candidate_lines(path)) > 50]
    pool = [line for lines in files for line in lines if 12 <= len(line.strip()) <= 60]
    records = []
    while len(records) < n:
        lines = rng.choice(files)
        i = rng.randrange(CONTEXT_LINES, len(lines))
        right = lines[i]
        if not 12 <= len(right.strip()) <= 60:
            continue
        indent = right[: len(right) - len(right.lstrip())]
        if not indent.endswith(" "):  # the space HellaSwag puts before an ending is its last column
            continue
        wrong = [line for line in (rng.choice(pool) for _ in range(200))
                 if line != right and line.startswith(indent) and not line[len(indent)].isspace()][:3]
        if len(wrong) < 3:
            continue
        # the ending is the next line: the context ends with its indentation but the last space
        endings = [right.lstrip(), *[w.lstrip() for w in wrong]]
        order = rng.sample(range(4), 4)
        records.append({"ind": len(records), "ctx": "\n".join(lines[i - CONTEXT_LINES : i]) + "\n" + indent[:-1],
                        "endings": [endings[j] for j in order], "label": order.index(0),
                        "source_id": f"{package}~{len(records)}"})
    return records


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--package", default="numpy")
    args = parser.parse_args()
    records = make_records(args.package, args.n)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    print(f"wrote {args.out}: {len(records)} examples from {args.package}'s sources")


if __name__ == "__main__":
    main()
