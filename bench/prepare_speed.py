"""
Benchmark data preparation on this machine, in one run:

- BPE training time and compression (UTF-8 bytes per token) at 4k and 16k vocab, on tinyshakespeare
  and on a generated corpus of web-like documents (JSONL, --mb megabytes);
- encode throughput (MB of text per second) on the generated corpus of the prepare pipeline with
  1 and N workers, against a plain single-process tiktoken loop (encode each document with the
  same tokenizer, append the ids to a .bin file): nanoGPT's way.

    python -m bench.prepare_speed [--quick] [--mb 200] [--workers N] [--shakespeare input.txt] [--work DIR]

--quick uses a 20 MB corpus. The machine's load average is printed before and after: the figures
are only as good as the machine was idle.
"""

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import time

import numpy as np

from nanoforge import datasets, preparation, sources
from nanoforge.tokenizer import BPETokenizer, ByteTokenizer, tokenizer_from_dict

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou", "ee")]


def generate_corpus(path, mb, shakespeare_path, seed=0):
    """Documents of Zipf-distributed words (tinyshakespeare's plus 100k invented ones), with
    capitals, punctuation, numbers and paragraphs: a stand-in for web text with a long vocabulary tail."""
    rng = np.random.default_rng(seed)
    invented = {"".join(rng.choice(SYLLABLES, rng.integers(1, 5))) for _ in range(100_000)}
    words = np.array(sorted(invented | set(open(shakespeare_path).read().split())))
    rng.shuffle(words)
    weights = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    weights /= weights.sum()
    written, n = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < mb * 2**20:
            ids = rng.choice(len(words), 200_000, p=weights)
            tokens = words[ids].tolist()
            for i in range(0, len(tokens) - 400, int(rng.integers(100, 400))):
                paragraphs = []
                for j in range(i, i + 300, 60):
                    sentence = " ".join(tokens[j:j + 60]).capitalize()
                    paragraphs.append(sentence.replace(" the ", f" {rng.integers(1900, 2030)} ", 1) + ".")
                doc = "\n\n".join(paragraphs)
                line = json.dumps({"id": n, "text": doc}, ensure_ascii=False) + "\n"
                f.write(line)
                written += len(line)
                n += 1
    return n


def text_bytes(path):
    with open(path, encoding="utf-8") as f:
        return sum(len(json.loads(line)["text"].encode()) for line in f)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def cpu_seconds():
    """CPU time of this process and of its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def tiktoken_loop(path, tokenizer, out=None):
    """The baselines, in one process: parse and encode each document with tiktoken, and either
    discard the ids (raw encode speed) or append them to a .bin file (nanoGPT's way)."""
    with open(path, encoding="utf-8") as f, open(out or os.devnull, "wb") as bin_file:
        for line in f:
            ids = tokenizer.enc.encode_ordinary(json.loads(line)["text"])
            if out:
                ids.append(tokenizer.eot_id)
                np.array(ids, dtype=np.uint16).tofile(bin_file)


def _loop_in_process(args):
    corpus, tokenizer_dict = args
    tiktoken_loop(corpus, tokenizer_from_dict(tokenizer_dict))


def independent_loops(corpus, tokenizer, n):
    """Seconds for n processes each running the encode-only loop over the whole corpus, with no
    communication at all: the most that n processes get out of this machine right now."""
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        pool.map(abs, range(n))  # the processes are up
        start = time.perf_counter()
        pool.map(_loop_in_process, [(corpus, tokenizer.to_dict())] * n, chunksize=1)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 20 MB generated corpus instead of --mb")
    parser.add_argument("--mb", type=int, default=200, help="size of the generated corpus in MB")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="N for the multi-process run")
    parser.add_argument("--shakespeare", help="local tinyshakespeare input.txt (default: download it)")
    parser.add_argument("--work", default="data/bench", help="scratch directory (the generated corpus is kept)")
    args = parser.parse_args()
    mb = 20 if args.quick else args.mb
    os.makedirs(args.work, exist_ok=True)
    shakespeare_path = datasets.tinyshakespeare(args.shakespeare, args.work)
    from nanoforge.machine import probe  # here: spawned workers re-import this module, and torch would slow them

    print(probe().summary())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    corpus = os.path.join(args.work, f"generated_{mb}mb.jsonl")
    if not os.path.exists(corpus):
        docs, seconds = timed(lambda: generate_corpus(corpus + ".tmp", mb, shakespeare_path))
        os.replace(corpus + ".tmp", corpus)
        print(f"generated {corpus}: {docs:,} documents in {seconds:.0f} s")
    corpus_mb = os.path.getsize(corpus) / 2**20
    corpus_text_bytes = text_bytes(corpus)

    print("\nBPE training (rustbpe, on the train split) and compression (tiktoken, whole corpus)")
    print(f"{'corpus':<24} {'vocab':>6} {'train s':>8} {'bytes/token':>12}   (bytes: 1.00 by definition)")
    tokenizers = {}
    corpora = {
        "tinyshakespeare (1 MB)": sources.text_file_source(shakespeare_path, {"name": "s"}, 0.1, sources.CHUNK_SIZE),
        f"generated ({corpus_mb:.0f} MB)": sources.files_source([corpus], {"name": "g"}, "text", sources.CHUNK_SIZE),
    }
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.workers))
    for name, source in corpora.items():
        for vocab in (4096, 16384):
            tok, seconds = timed(lambda: BPETokenizer.train(preparation.training_texts(source, 0.1, 1337), vocab))
            if name.startswith("tiny"):
                text = open(shakespeare_path, encoding="utf-8").read()
                ratio = len(text.encode()) / len(tok.encode(text))
            else:
                meta = preparation.write_splits(source, tok, os.path.join(args.work, "out"), 0.1, 1337, args.workers)
                ratio = corpus_text_bytes / (meta["train_tokens"] + meta["val_tokens"] - meta["train_documents"]
                                               - meta["val_documents"] + 2)  # not counting end-of-text tokens
                tokenizers[vocab] = tok
            print(f"{name:<24} {vocab:>6} {seconds:>8.1f} {ratio:>12.2f}")

    print(f"\nEncode throughput on the generated corpus ({corpus_mb:.0f} MB of JSONL), BPE 16k, MB/s of JSONL read")
    tok = tokenizers[16384]
    source = corpora[f"generated ({corpus_mb:.0f} MB)"]
    out = os.path.join(args.work, "out")
    runs, cpu, ceilings = {}, {}, []
    # interleaved twice so that a burst of load from elsewhere hits both sides alike; the best of each is kept
    for _ in range(2):
        for label, run in [
            ("tiktoken loop, encode only", lambda: tiktoken_loop(corpus, tok)),
            ("tiktoken loop + write (nanoGPT)", lambda: tiktoken_loop(corpus, tok, os.path.join(args.work, "raw.bin"))),
            ("prepare.py --workers 1", lambda: preparation.write_splits(source, tok, out, 0.1, 1337, 1)),
            (f"prepare.py --workers {args.workers}", lambda: preparation.write_splits(source, tok, out, 0.1, 1337, args.workers)),
        ]:
            cpu_before = cpu_seconds()
            _, seconds = timed(run)
            runs[label] = max(runs.get(label, 0), corpus_mb / seconds)
            cpu[label] = max(cpu.get(label, 0), corpus_mb / (cpu_seconds() - cpu_before))
        ceilings.append(args.workers * corpus_mb / independent_loops(corpus, tok, args.workers))
    raw, nanogpt, one, many = runs.values()
    print(f"{'':<34} {'wall':>9} {'per CPU-second':>16}")
    for label, speed in runs.items():
        print(f"{label:<34} {speed:>6.1f} MB/s {cpu[label]:>11.1f} MB/s")
    n = args.workers
    print(f"pipeline, 1 worker / encode-only loop:           {one / raw:.2f}")
    print(f"pipeline, 1 worker / nanoGPT-style loop:         {one / nanogpt:.2f}")
    print(f"pipeline, {n} workers / 1 worker:                  {many / one:.2f}")
    print(f"pipeline, {n} workers / ({n} x encode-only loop):    {many / (n * raw):.2f}  (per-core efficiency)")
    raw_cpu, _, one_cpu, many_cpu = cpu.values()
    ceiling = max(ceilings) / raw
    print(f"machine ceiling: {n} independent encode-only loops (no IPC) / 1 loop:  {ceiling:.2f}  "
          f"(pipeline, {n} workers / this ceiling: {many / max(ceilings):.2f})")
    print(f"MB per CPU-second, pipeline / encode-only loop:  {one_cpu / raw_cpu:.2f} (1 worker), "
          f"{many_cpu / raw_cpu:.2f} ({n} workers, the reading process included)")
    byte_source = sources.files_source([corpus], {"name": "g"}, "text", sources.CHUNK_SIZE)
    _, seconds = timed(lambda: preparation.write_splits(byte_source, ByteTokenizer(), out, 0.1, 1337, args.workers))
    print(f"prepare.py --tokenizer byte --workers {args.workers}: {corpus_mb / seconds:.1f} MB/s (reading, splitting, writing: the pipeline's own cost)")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
