"""
serve.py under a realistic load: throughput, time to first token and inter-token latency at 1, 4, 16 and 64
concurrent clients, for one-at-a-time serving (--max-batch 1), static batching (--batching static: a new batch
starts only when the last one is done) and continuous batching (the default), side by side in one run.

    python -m bench.serve_speed (--ckpt RUN | --shape configs/shakespeare_char.toml) [--clients 1 4 16 64]
                                [--requests 2] [--think 0.5] [--long 0.25] [--max-batch 16] [--max-queue 64]
                                [--device auto] [--dtype auto]

The workload: each client sends --requests streamed completions, one after another, waiting an exponentially
distributed time (mean --think seconds) before each, so requests arrive as a Poisson process per client. Each
request is short (a 4-32 character prompt, 8-32 tokens) or, with probability --long, long (a 100-240 character
prompt, 128-256 tokens). The workload is drawn once from a fixed seed, so the three servers get the same requests
at the same moments. A request refused with 503 counts as refused (it must carry Retry-After; any other failure
counts as an error) and its client goes on to its next one. Time to first token (TTFT) runs from sending a
request to its first piece of text; inter-token latency (ITL) is the time between consecutive pieces. The server's
resident memory is sampled throughout (peak RSS). --shape serves a model of that config's shape with random
weights (decoding speed does not depend on what the weights hold), so no training is needed first. Each server
is serve.py itself, on a free port of 127.0.0.1; the three are started together, and for each number of clients
they are measured one right after the other, never at the same time.
"""

import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LETTERS = "abcdefghijklmnopqrstuvwxyz     "
SERVINGS = {"one at a time": ["--max-batch", "1"], "static": ["--batching", "static"], "continuous": []}


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


def start_server(source, flags, device, dtype):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), *source, "--port", str(port),
                                *flags, "--device", device, "--dtype", dtype], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            sys.exit("bench.serve_speed: serve.py exited")
        try:
            httpx.get(url + "/health", timeout=2)
            return process, url
        except httpx.TransportError:
            time.sleep(0.2)


@dataclasses.dataclass
class Ask:
    """One request of the workload: wait `think` seconds, then ask for max_tokens after prompt."""

    think: float
    prompt: str
    max_tokens: int
    seed: int


def workload(clients, requests, think, long_share, seed=0):
    """[[Ask] per client], drawn from a fixed seed: the same for every server."""
    rng = random.Random(seed)

    def ask(n):
        long = rng.random() < long_share
        length, tokens = (rng.randint(100, 240), rng.randint(128, 256)) if long else (rng.randint(4, 32),
                                                                                     rng.randint(8, 32))
        return Ask(rng.expovariate(1 / think), "".join(rng.choice(LETTERS) for _ in range(length)), tokens, n)

    return [[ask(1000 * k + r) for r in range(requests)] for k in range(clients)]


@dataclasses.dataclass
class Outcome:
    """What happened to one request: "ok", "refused" (503 with Retry-After) or "error"; its first-text time, the
    gaps between its pieces of text and the tokens it got."""

    status: str
    ttft: float = None
    gaps: list = dataclasses.field(default_factory=list)
    tokens: int = 0


def one_request(url, ask):
    body = {"prompt": ask.prompt, "max_tokens": ask.max_tokens, "temperature": 1.0, "seed": ask.seed, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    outcome, last = Outcome("ok"), None
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            if r.status_code == 503 and r.headers.get("retry-after"):
                return Outcome("refused")
            if r.status_code != 200:
                return Outcome("error")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    if last is None:
                        outcome.ttft = now - start
                    else:
                        outcome.gaps.append(now - last)
                    last = now
                if chunk.get("usage"):
                    outcome.tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        return Outcome("error")
    return outcome


def peak_rss(pid, stop, peak):
    """Sample pid's resident memory (MiB) into peak[0] until stop is set."""
    while not stop.wait(0.2):
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            peak[0] = max(peak[0], kb / 1024)
        except (OSError, StopIteration):
            return


def measure(url, pid, asks_per_client):
    """Run every client's asks concurrently; returns (seconds, [Outcome], peak RSS MiB)."""
    def client(asks):
        outcomes = []
        for ask in asks:
            time.sleep(ask.think)
            outcomes.append(one_request(url, ask))
        return outcomes

    stop, peak = threading.Event(), [0.0]
    sampler = threading.Thread(target=peak_rss, args=(pid, stop, peak), daemon=True)
    sampler.start()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(asks_per_client)) as pool:
        outcomes = [o for per_client in pool.map(client, asks_per_client) for o in per_client]
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    return seconds, outcomes, peak[0]


def percentile(values, p):
    """The p-th percentile by nearest rank (None for no values)."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))]


def summary(seconds, outcomes, rss):
    ok = [o for o in outcomes if o.status == "ok"]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    gaps = [g for o in ok for g in o.gaps]
    return dict(tokens_per_s=sum(o.tokens for o in ok) / seconds, requests_per_s=len(ok) / seconds,
                ttft_p50=percentile(ttfts, 50), ttft_p99=percentile(ttfts, 99), itl_p50=percentile(gaps, 50),
                itl_p99=percentile(gaps, 99), refused=sum(o.status == "refused" for o in outcomes),
                errors=sum(o.status == "error" for o in outcomes), rss=rss)


def seconds_text(x):
    return "-" if x is None else f"{x * 1000:.0f}ms" if x < 1 else f"{x:.2f}s"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def report(args, results):
    print(f"\n{args.ckpt or args.shape}: {args.requests} requests per client, think {args.think}s, "
          f"{args.long:.0%} long; --max-batch {args.max_batch} --max-queue {args.max_queue}")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average before: "
          f"{args.load_before}, after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'clients':>7} {'serving':>14} {'tok/s':>7} {'req/s':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
          f"{'ITL p99':>8} {'503s':>5} {'errors':>6} {'peak RSS':>9}")
    for clients in args.clients:
        for mode in SERVINGS:
            r = results[mode, clients]
            print(f"{clients:>7} {mode:>14} {r['tokens_per_s']:>7.1f} {r['requests_per_s']:>6.2f} "
                  f"{seconds_text(r['ttft_p50']):>9} {seconds_text(r['ttft_p99']):>9} {seconds_text(r['itl_p50']):>8} "
                  f"{seconds_text(r['itl_p99']):>8} {r['refused']:>5} {r['errors']:>6} {r['rss']:>7.0f}MB")
        static, continuous = results["static", clients], results["continuous", clients]
        ttft = (f"{static['ttft_p99'] / continuous['ttft_p99']:.2f}x" if static["ttft_p99"] and continuous["ttft_p99"]
                else "-")
        print(f"{'':>7} {'cont. / static':>14} {continuous['tokens_per_s'] / static['tokens_per_s']:>6.2f}x tokens/s; "
              f"static's p99 TTFT / continuous's: {ttft}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", metavar="RUN", help="run directory or checkpoint file to serve")
    source.add_argument("--shape", metavar="CONFIG", help="serve a random-weight model of this train config's shape")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=2, help="requests per client (default 2)")
    parser.add_argument("--think", type=float, default=0.5, help="mean seconds a client waits before each request")
    parser.add_argument("--long", type=float, default=0.25, help="share of long requests (default 0.25)")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    args.load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or random_checkpoint(args.shape, tmp)
        limits = ["--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue)]
        servers = {mode: start_server(["--ckpt", ckpt], limits + flags, args.device, args.dtype)
                   for mode, flags in SERVINGS.items()}
        results = {}
        try:
            for process, url in servers.values():
                one_request(url, Ask(0, "warm up", 8, 0))
            # For each number of clients the three servers run one right after the other (the idle ones wait
            # without using the CPU), so a change in the machine's load hits them alike.
            for clients in args.clients:
                asks = workload(clients, args.requests, args.think, args.long)
                for mode, (process, url) in servers.items():
                    results[mode, clients] = summary(*measure(url, process.pid, asks))
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait()
    report(args, results)


if __name__ == "__main__":
    main()
