"""
A scaling sweep: train depths 1..N at the compute-optimal token budget (the depth dial's tokens_per_param) and
fit validation loss against training compute with a power law, L(C) = a * C^(-b). scaling.py runs it; this
module holds its parts: the runs' plan, where each run stands, reading back their results, the fit, the table
and the figure.

Compute is counted as model.flops_per_token() x the tokens trained: 6 FLOPs per parameter per token for the
weight matrices (forward + backward), plus 12 x n_layer x block_size x n_embd for the attention scores (PaLM,
appendix B), the count train.py's MFU uses. 6ND alone would leave out the attention, a large share of the work
at the sweep's widths: against the blocks' weight matrices (72 x n_layer x n_embd^2) it is block_size / (6 x
n_embd), with a 128-token context 53% at width 40 and 2.7 times as much at width 8.
"""

import contextlib
import dataclasses
import io
import json
import math
import os

import torch

from model import GPT, GPTConfig
from nanoforge import checkpoint
from nanoforge.config import build_config
from nanoforge.data import read_meta
from nanoforge.datasets import BUILTINS
from nanoforge.errors import UserError
from nanoforge.plotting import read_log, save

# Validation points per run: enough to draw each run's curve, few enough that evaluating (eval_iters batches of
# both splits each time) stays a small part of the larger runs.
EVALS_PER_RUN = 8


class ScalingError(UserError):
    """A sweep that cannot run as asked, phrased for the user."""


@dataclasses.dataclass
class Run:
    """One depth of the sweep: its run directory and the steps the depth dial gives it."""

    depth: int
    out_dir: str
    max_iters: int
    eval_interval: int


@dataclasses.dataclass
class Result:
    """A finished run, read back from its run directory."""

    depth: int
    params: int  # embeddings included, as the token budget counts them
    tokens: int
    flops: float
    val_loss: float
    minutes: float  # wall time of the run, evaluations included, across resumes
    curve: list  # [(FLOPs so far, val loss)] at each evaluation
    machine: str


def parse_depths(text):
    """'N' -> depths 1..N; 'A-B' -> depths A..B. At least two depths: a fit needs two points."""
    first, sep, last = text.partition("-")
    try:
        low, high = (int(first), int(last)) if sep else (1, int(first))
    except ValueError:
        raise ScalingError(f"--depths '{text}' is not N or A-B: e.g. --depths 5 (depths 1..5) or --depths 3-6")
    if min(low, high) < 1:
        raise ScalingError(f"--depths '{text}' goes below 1: depths run from 1 up, e.g. --depths 5")
    if high < low:
        raise ScalingError(f"--depths '{text}' runs backwards: write the smaller depth first, e.g. --depths {high}-{low}")
    if high == low:
        raise ScalingError(f"--depths '{text}' is one depth: the fit needs two or more, e.g. --depths {low}-{low + 1}")
    return list(range(low, high + 1))


def check_prepared(data_dir):
    """A one-line error saying how to prepare the sweep's corpus when data_dir is not prepared."""
    name = os.path.basename(os.path.normpath(data_dir))
    if name in BUILTINS and not os.path.isfile(os.path.join(data_dir, "meta.json")):
        raise ScalingError(f"the sweep's corpus '{data_dir}' is not prepared: run `python prepare.py {name} --out "
                           f"{data_dir}` first")
    read_meta(data_dir)  # any other data directory: its own message


def plan(config_path, depths, out):
    """The sweep's runs, sized as train.py will size them (the depth dial, read from the same config)."""
    runs = []
    for depth in depths:
        out_dir = os.path.join(out, f"d{depth}")
        with contextlib.redirect_stderr(io.StringIO()):  # train.py prints the dial's summary when the run starts
            cfg = build_config(config_path, [f"--depth={depth}", f"--out_dir={out_dir}"])
        runs.append(Run(depth, out_dir, cfg.max_iters, max(1, math.ceil(cfg.max_iters / EVALS_PER_RUN))))
    check_prepared(cfg.data_dir)  # one corpus for every depth
    return runs


def status(run):
    """'finished' (its checkpoint reached max_iters), 'unfinished' (a checkpoint to resume) or 'new'."""
    latest = checkpoint.run_files(run.out_dir)["latest"]
    if not os.path.isfile(latest):
        return "new"
    try:
        step = checkpoint.read_info(latest)["step"]
    except checkpoint.CheckpointError:
        return "unfinished"  # train.py --resume falls back to the newest intact checkpoint
    return "finished" if step >= run.max_iters else "unfinished"


def train_args(run, config_path, resume):
    """train.py's arguments for this run."""
    args = [config_path, f"--depth={run.depth}", f"--out_dir={run.out_dir}", f"--eval_interval={run.eval_interval}"]
    return args + ["--resume"] * resume


def machine_name(record):
    """The device a log record says the run trained on: the GPU's name, else the CPU's and its core count."""
    machine = record.get("machine") or {}
    return machine.get("cuda") or f"{machine.get('cpu', 'unknown CPU')}, {os.cpu_count()} cores"


def read_result(run):
    """The finished run's size, compute, final val loss, time and val-loss curve."""
    with open(os.path.join(run.out_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    info = checkpoint.read_info(checkpoint.run_files(run.out_dir)["latest"])
    with torch.device("meta"):  # the trained model's shape, without allocating it
        model = GPT(GPTConfig(**info["model"]))
    per_step = cfg["batch_size"] * cfg["block_size"] * cfg["gradient_accumulation_steps"]
    flops_per_step = model.flops_per_token() * per_step
    records = read_log(run.out_dir)
    curve = [(r["step"] * flops_per_step, r["val_loss"]) for r in records if r.get("val_loss") is not None]
    final = [r for r in records if r["step"] == info["step"] and r.get("val_loss") is not None]
    if not final:
        raise ScalingError(f"'{run.out_dir}/log.jsonl' has no val loss at the last step ({info['step']}): "
                           f"delete '{run.out_dir}' and run the sweep again to retrain depth {run.depth}")
    first = next((r for r in records if "machine" in r), {})
    return Result(run.depth, model.num_params(non_embedding=False), info["step"] * per_step,
                  info["step"] * flops_per_step, final[0]["val_loss"], records[-1]["elapsed_s"] / 60, curve,
                  machine_name(first))


def fit_power_law(compute, loss):
    """(a, b) of L = a * C^(-b), by least squares on ln L = ln a - b ln C."""
    xs, ys = [math.log(c) for c in compute], [math.log(v) for v in loss]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
             / sum((x - mean_x) ** 2 for x in xs))
    return math.exp(mean_y - slope * mean_x), -slope


def short(n):
    """A count for people: 3400 -> '3.4k', 2_100_000 -> '2.1M'."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:.3g}"


def table(results):
    lines = [f"{'depth':>5}  {'params':>8}  {'tokens':>8}  {'FLOPs':>8}  {'val loss':>8}  {'minutes':>7}"]
    for r in results:
        lines.append(f"{r.depth:>5}  {short(r.params):>8}  {short(r.tokens):>8}  {r.flops:>8.2e}  "
                     f"{r.val_loss:>8.4f}  {r.minutes:>7.2f}")
    return "\n".join(lines)


def describe_fit(a, b, n):
    """The fit, and what it means: the loss at ten times the compute."""
    return (f"fit over {n} depths: L(C) = {a:.4g} * C^(-{b:.4f}); ten times the compute multiplies the val loss by "
            f"{10 ** -b:.3f} ({100 * (1 - 10 ** -b):.1f}% lower)")


def figure(results, fit, out, title):
    """Val loss against compute on log axes: each run's curve, its final point labelled with its size, the fit."""
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(9, 6))
    for i, r in enumerate(results):
        color = f"C{i}"
        ax.plot(*zip(*r.curve), color=color, linestyle="--", marker="o", markersize=3, alpha=0.6)
        ax.plot(r.flops, r.val_loss, "o", color=color, markersize=8,
                label=f"depth {r.depth}: {short(r.params)} params, {short(r.tokens)} tokens")
        ax.annotate(short(r.params), (r.flops, r.val_loss), textcoords="offset points", xytext=(6, 6), fontsize=9)
    a, b = fit
    ends = [min(r.flops for r in results) / 2, max(r.flops for r in results) * 2]
    ax.plot(ends, [a * c ** -b for c in ends], color="black", linestyle=":",
            label=f"fit: L = {a:.3g} C^(-{b:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # The losses span less than a factor of 10: plain numbers at even steps read better than powers of ten.
    ax.yaxis.set_major_locator(ticker.MaxNLocator(8))
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=9)
    save(fig, [ax], out)
