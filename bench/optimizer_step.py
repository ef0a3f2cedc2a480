"""
A Muon step against an AdamW step of the quickstart model (configs/quickstart.toml), and the whole training
steps they end (forward, backward, update), measured side by side in one process: the variants take turns,
round after round, so all of them see the same machine load. Muon runs twice, orthogonalising in float32 and
in bfloat16 (what torch.optim.Muon always does); the row of the dtype the probe picks (what train.py runs) is marked.

    python prepare.py pystdlib
    python -m bench.optimizer_step
    NANOFORGE_FAST_PATHS=off ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m bench.optimizer_step

The second line is this CPU made to behave like one without AVX-512 or native bfloat16 (docs/machines.md).
"""

import argparse
import copy
import dataclasses
import os
import statistics
import time

import torch

from nanoforge.config import build_config
from nanoforge.data import Dataset
from nanoforge.machine import probe
from nanoforge.optim import build_optimizer, newton_schulz_dtype, set_lr
from nanoforge.runs import build_model
from nanoforge.training import get_lr


def variants(cfg, data):
    """{name: (model, optimizer, cfg)}: copies of the same initial model, one per optimizer."""
    torch.manual_seed(cfg.seed)
    model, cfg = build_model(cfg, data, torch.device("cpu"))
    adamw_cfg = dataclasses.replace(cfg, optimizer="adamw")
    adamw_model = copy.deepcopy(model)
    found = {"AdamW": (adamw_model, build_optimizer(adamw_model, adamw_cfg, "cpu"), adamw_cfg)}
    chosen = newton_schulz_dtype("cpu")
    for ns_dtype in (torch.float32, torch.bfloat16):
        muon_model = copy.deepcopy(model)
        optimizer = build_optimizer(muon_model, cfg, "cpu")
        optimizer.optimizers[0].ns_dtype = ns_dtype
        notes = [note for note, holds in [("the probe's choice", ns_dtype == chosen),
                                          ("torch.optim.Muon's", ns_dtype == torch.bfloat16)] if holds]
        note = f" ({', '.join(notes)})" if notes else ""
        found[f"Muon, Newton-Schulz in {str(ns_dtype).removeprefix('torch.')}{note}"] = \
            (muon_model, optimizer, cfg)
    return found


def timed_step(model, optimizer, cfg, data, step):
    """One training step; returns (seconds of the optimizer's step, seconds of the whole step)."""
    x, y = data.get_batch("train", cfg.batch_size, None)  # (B, T) each
    start = time.perf_counter()
    set_lr(optimizer, get_lr(step, cfg), cfg)
    _, loss = model(x, y)
    loss.backward()
    before_update = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    return end - before_update, end - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per variant (after 3 untimed)")
    parser.add_argument("--data", default="data/pystdlib")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(probe().summary())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    cfg = build_config("configs/quickstart.toml", [f"--data_dir={args.data}"])
    data = Dataset(cfg.data_dir, cfg.block_size)
    runs = variants(cfg, data)
    times = {name: ([], []) for name in runs}
    for step in range(3 + args.rounds):
        for name, (model, optimizer, variant_cfg) in runs.items():
            update, whole = timed_step(model, optimizer, variant_cfg, data, step)
            if step >= 3:
                times[name][0].append(update)
                times[name][1].append(whole)
    base_update, base_whole = (statistics.median(t) for t in times["AdamW"])
    print(f"\nquickstart model, batch {cfg.batch_size} x {cfg.block_size}; medians of {args.rounds} interleaved steps")
    print("| optimizer | update ms | / AdamW | training step ms | / AdamW | 800 steps (no evals) |")
    print("|---|---|---|---|---|---|")
    for name, (updates, wholes) in times.items():
        update, whole = statistics.median(updates), statistics.median(wholes)
        print(f"| {name} | {1000 * update:.1f} | {update / base_update:.2f}x | {1000 * whole:.1f} | "
              f"{whole / base_whole:.2f}x | {800 * whole:.0f} s |")
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
