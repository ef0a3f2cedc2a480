"""
serve.py's throughput and latency: requests/s, generated tokens/s and time to first token at 1, 4 and 16
concurrent clients, with batched serving (--max-batch 16) against one-at-a-time serving (--max-batch 1) of the
same model, measured side by side in one run.

    python -m bench.serve_speed (--ckpt RUN | --shape configs/shakespeare_char.toml) [--clients 1 4 16]
                                [--requests 4] [--max-tokens 64] [--device auto] [--dtype auto]

Each client sends --requests streamed completions one after another (the same prompt, its own seed,
temperature 1, --max-tokens each); time to first token is from sending a request to its first piece of text.
--shape serves a model of that config's shape with random weights (decoding speed does not depend on what the
weights hold), so no training is needed first. Each server is serve.py itself, on a free port of 127.0.0.1;
the two run one after the other, never at the same time.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "\n"


def random_checkpoint(config_path, directory):
    """A checkpoint of the model shape in a train config, with random weights and a character tokenizer."""
    from model import GPT, GPTConfig
    from nanoforge import checkpoint
    from nanoforge.config import build_config
    from nanoforge.tokenizer import CharTokenizer

    cfg = build_config(config_path)
    tokenizer = CharTokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    shape = {k: v for k, v in dataclasses.asdict(cfg).items() if k in fields}
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**shape, "vocab_size": tokenizer.vocab_size, "dropout": 0.0}))
    path = os.path.join(directory, "model.safetensors")
    checkpoint.save(path, model.state_dict(), {"model": dataclasses.asdict(model.config),
                                               "tokenizer": tokenizer.to_dict()})
    return path


def start_server(source, max_batch, device, dtype):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), *source, "--port", str(port),
                                "--max-batch", str(max_batch), "--max-queue", "64", "--device", device,
                                "--dtype", dtype], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            sys.exit("bench.serve_speed: serve.py exited")
        try:
            httpx.get(url + "/health", timeout=2)
            return process, url
        except httpx.TransportError:
            time.sleep(0.2)


def one_request(url, seed, max_tokens):
    """(seconds to the first text, tokens generated) of one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


def measure(url, clients, requests, max_tokens):
    """Requests/s, tokens/s and the time-to-first-token list of `clients` clients sending `requests` each."""
    def client(k):
        return [one_request(url, 1000 * k + r, max_tokens) for r in range(requests)]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [x for per_client in pool.map(client, range(clients)) for x in per_client]
    seconds = time.perf_counter() - start
    return len(results) / seconds, sum(t for _, t in results) / seconds, [f for f, _ in results if f is not None]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="RUN", help="run directory or checkpoint file to serve")
    source.add_argument("--shape", metavar="CONFIG", help="serve a random-weight model of this train config's shape")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or random_checkpoint(args.shape, tmp)
        results = {}
        for mode, max_batch in (("one at a time", 1), ("batched", max(args.clients))):
            process, url = start_server(["--ckpt", ckpt], max_batch, args.device, args.dtype)
            try:
                one_request(url, 0, args.max_tokens)  # warm up
                for clients in args.clients:
                    results[mode, clients] = measure(url, clients, args.requests, args.max_tokens)
            finally:
                process.terminate()
                process.wait()
    print(f"\n{args.ckpt or args.shape}: {args.requests} requests per client, {args.max_tokens} tokens each")
    print(f"{'clients':>7} {'serving':>14} {'requests/s':>11} {'tokens/s':>9} {'TTFT median':>12} {'TTFT max':>9}")
    for clients in args.clients:
        for mode in ("one at a time", "batched"):
            rps, tps, firsts = results[mode, clients]
            print(f"{clients:>7} {mode:>14} {rps:>11.2f} {tps:>9.1f} {statistics.median(firsts):>11.3f}s "
                  f"{max(firsts):>8.3f}s")
        ratio = results["batched", clients][1] / results["one at a time", clients][1]
        print(f"{'':>7} {'batched / one':>14} {'':>11} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
