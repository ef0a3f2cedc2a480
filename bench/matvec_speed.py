"""
How close each way of multiplying one vector by GPT-2 124M's matrices comes to the memory bandwidth: the
ceiling on batch-1 decoding, where every weight is read once a token and nothing is reused.

    python -m bench.matvec_speed                         # float32 and bfloat16, 1 and 2 threads
    python -m bench.matvec_speed --threads 2 --dtypes float32

The weights are the 124M model's 49 matrices (per block: qkv 2304x768, attention out 768x768, MLP up
3072x768 and down 768x3072; then the 50257x768 un-embedding), random, in the precision asked. Each way runs
all 49 products back to back, as a decode step does, and its speed is the bytes of those weights over its
time, set against the read bandwidth of summing a 1 GiB float32 tensor measured in the same run (the
figure bench.sample_speed's "of bandwidth bound" uses). Each time is the best of 7 passes after a warm-up;
the bandwidth is the best of 5, each measured again before every thread count.

- F.linear: nn.Linear's own call (x @ W^T through torch's BLAS), the engine's plain path;
- F.linear, oneDNN off: the same with oneDNN switched off for the call, so torch's own matrix-vector kernel
  runs (the engine's bfloat16 path for one row);
- packed: the weight reordered once for oneDNN (PackedLinear, the engine's fast path where the probe allows);
- torch.mv: the matrix-vector product on the [out, in] weight;
- x @ W^T stored: a transposed [in, out] copy multiplied from the left.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from nanoforge.cpu_decoding import one_row_without_onednn
from nanoforge.machine import probe

D = 768
SHAPES = [(3 * D, D), (D, D), (4 * D, D), (D, 4 * D)] * 12 + [(50257, D)]  # (out, in)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def best_seconds(fn, passes=7):
    fn()
    timings = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        timings.append(time.perf_counter() - start)
    return min(timings)


def read_bandwidth():
    """Bytes per second of summing 1 GiB of float32 (the best of 5)."""
    x = torch.ones(2**28)
    return x.numel() * 4 / best_seconds(x.sum, passes=5)


def ways(dtype):
    """{name: a closure running every product once}, and the bytes of the weights they read."""
    torch.manual_seed(0)
    weights = [torch.randn(shape).to(dtype) for shape in SHAPES]
    inputs = {n: torch.randn(1, n).to(dtype) for n in (D, 4 * D)}
    transposed = [w.t().contiguous() for w in weights]
    found = {
        "F.linear": lambda: [F.linear(inputs[w.size(1)], w) for w in weights],
        "torch.mv": lambda: [torch.mv(w, inputs[w.size(1)][0]) for w in weights],
        "x @ W^T stored": lambda: [inputs[t.size(0)] @ t for t in transposed],
        "F.linear, oneDNN off": lambda: [one_row_without_onednn(inputs[w.size(1)], w, None) for w in weights],
    }
    machine = probe()
    if {torch.float32: machine.packed_linear, torch.bfloat16: machine.packed_linear_bf16}[dtype]:
        packed = [(torch.ops.mkldnn._reorder_linear_weight(w, 1), w.size(1)) for w in weights]
        found["packed (oneDNN)"] = lambda: [
            torch.ops.mkldnn._linear_pointwise(inputs[n], p, None, "none", [], "") for p, n in packed]
    return found, sum(w.numel() * w.element_size() for w in weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    args = parser.parse_args()
    print(probe().summary())
    print("| threads | precision | way | ms per pass | GB/s | of read bandwidth |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        bandwidth = read_bandwidth()
        print(f"| {threads} | | read bandwidth (sum of 1 GiB) | | {bandwidth / 1e9:.1f} | 100% |")
        for name in args.dtypes:
            found, nbytes = ways(DTYPES[name])
            for way, run in found.items():
                seconds = best_seconds(run)
                print(f"| {threads} | {name} | {way} | {1000 * seconds:.1f} | {nbytes / seconds / 1e9:.1f} | "
                      f"{nbytes / seconds / bandwidth:.0%} |", flush=True)


if __name__ == "__main__":
    main()
