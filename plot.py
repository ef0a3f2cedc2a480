"""
Plot training runs from their log.jsonl: training and validation loss of one or more runs on
one figure (the legend names the runs), the learning rate and tokens/s beneath, and HellaSwag's acc_norm
when a run scored it (train.py's hellaswag_interval).

    python plot.py --ckpt out/quickstart out/shakespeare_char_fast --png loss.png --x time

Works while a run is still writing its log (a half-written last line is left out). A resumed
run appends to the same log, so it plots as one run; records written again after a resume
replace the earlier ones of the same step. --x tokens counts batch_size * block_size *
gradient_accumulation_steps tokens per step (from the run's config.json); --x time uses the
records' elapsed_s (wall seconds since the run began, across resumes) and, for logs written
before train.py recorded it, estimates time from tokens/s (training time only, no evaluation).
--smooth N averages the training loss over N log records.

An RL run (rl.py's log: reward_mean, pass@1, ...) gets its own panels: the rollouts' mean reward (smoothed by
--smooth) with the held-out pass@1 and pass@k at each evaluation, the mean completion length, the policy's entropy
and its KL to the starting model, and the learning rate.
"""

import json
import os
import sys

from nanoforge import cli
from nanoforge.plotting import PlotError, pyplot, read_log, save

X_LABELS = {"step": "step", "tokens": "tokens", "time": "wall time (minutes)"}


def tokens_per_step(run_dir):
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise PlotError(f"--x tokens needs '{run_dir}/config.json' (written by train.py): use --x step") from None
    if "batch_size" not in cfg:
        raise PlotError(f"'{run_dir}' is an rl.py run, which has no fixed tokens per step: use --x step or --x time")
    return cfg["batch_size"] * cfg["block_size"] * cfg.get("gradient_accumulation_steps", 1)


def x_values(records, run_dir, x):
    """The x coordinate of each record, and a note when time had to be estimated."""
    if x == "step":
        return [r["step"] for r in records], None
    if x == "tokens":
        per_step = tokens_per_step(run_dir)
        return [r["step"] * per_step for r in records], None
    if all("elapsed_s" in r for r in records):
        return [r["elapsed_s"] / 60 for r in records], None
    per_step = tokens_per_step(run_dir)
    # Older logs have no elapsed_s: add up each window's steps at its measured speed.
    minutes, previous, total = [], 0, 0.0
    for r in records:
        if r.get("tokens_per_sec"):
            total += (r["step"] - previous) * per_step / r["tokens_per_sec"]
        previous = r["step"]
        minutes.append(total / 60)
    return minutes, f"{run_dir}: no elapsed_s in log.jsonl, time estimated from tokens/s (training steps only)"


def smoothed(values, n):
    """Trailing mean over the last n values (the first ones average what there is)."""
    out, window = [], []
    for v in values:
        window = (window + [v])[-n:]
        out.append(sum(window) / len(window))
    return out


def plot_rl(run_dirs, logs, out, x, smooth):
    """rl.py's runs: rewards and held-out pass@k, completion length, entropy and KL, learning rate."""
    if x == "tokens":
        raise PlotError("--x tokens is for train.py's runs: plot RL runs with --x step or --x time")
    plt = pyplot("plot.py")
    fig, (ax_reward, ax_len, ax_kl, ax_lr) = plt.subplots(4, 1, figsize=(9, 9), sharex=True,
                                                          gridspec_kw={"height_ratios": [3, 1, 1.5, 1]})
    notes = []
    for i, (run_dir, records) in enumerate(zip(run_dirs, logs)):
        xs, note = x_values(records, run_dir, x)
        notes += [note] if note else []
        name, color = os.path.basename(os.path.normpath(run_dir)), f"C{i}"
        steps = [(xv, r) for xv, r in zip(xs, records) if "reward_mean" in r]
        if steps:
            ax_reward.plot([p[0] for p in steps], smoothed([100 * p[1]["reward_mean"] for p in steps], smooth),
                           color=color, alpha=0.6, label=f"{name} reward (rollouts)")
            ax_len.plot([p[0] for p in steps], [p[1]["completion_len"] for p in steps], color=color)
            ax_kl.plot([p[0] for p in steps], [p[1]["entropy"] for p in steps], color=color, label=f"{name} entropy")
            kl = [(p[0], p[1]["kl"]) for p in steps if p[1].get("kl") is not None]
            if kl:
                ax_kl.plot(*zip(*kl), color=color, linestyle="--", label=f"{name} KL to start")
            ax_lr.plot([p[0] for p in steps], [p[1]["lr"] for p in steps], color=color)
        for key, marker in (("pass@1", "o"), *((k, "s") for k in sorted({k for r in records for k in r
                                                                          if k.startswith("pass@") and k != "pass@1"}))):
            scored = [(xv, 100 * r[key]) for xv, r in zip(xs, records) if key in r]
            if scored:
                ax_reward.plot(*zip(*scored), color=color, marker=marker, linestyle="--" if key == "pass@1" else ":",
                               label=f"{name} held-out {key}")
    ax_reward.set_ylabel("%" + (f" (reward: mean of {smooth} steps)" if smooth > 1 else ""))
    ax_reward.legend()
    ax_len.set_ylabel("completion tokens")
    ax_kl.set_ylabel("nats per token")
    ax_kl.legend()
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel(X_LABELS[x])
    save(fig, (ax_reward, ax_len, ax_kl, ax_lr), out)
    return notes


def plot(run_dirs, out, x="step", smooth=1):
    logs = [read_log(run_dir) for run_dir in run_dirs]
    if any("reward_mean" in r for records in logs for r in records):
        return plot_rl(run_dirs, logs, out, x, smooth)
    plt = pyplot("plot.py")
    # A panel for HellaSwag when a run scored it (train.py's hellaswag_interval)
    hellaswag = any("hellaswag_acc_norm" in r for records in logs for r in records)
    fig, axes = plt.subplots(3 + hellaswag, 1, figsize=(9, 8 + 2 * hellaswag), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1, 1] + [1.5] * hellaswag})
    ax_loss, ax_lr, ax_speed = axes[:3]
    notes = []
    for i, (run_dir, records) in enumerate(zip(run_dirs, logs)):
        xs, note = x_values(records, run_dir, x)
        notes += [note] if note else []
        name = os.path.basename(os.path.normpath(run_dir))
        color = f"C{i}"
        train = [(xv, r["loss"]) for xv, r in zip(xs, records) if r.get("loss") is not None]
        if train:
            ax_loss.plot([p[0] for p in train], smoothed([p[1] for p in train], smooth), color=color, alpha=0.8,
                         label=f"{name} train")
        evals = [(xv, r["val_loss"]) for xv, r in zip(xs, records) if r.get("val_loss") is not None]
        if evals:
            ax_loss.plot(*zip(*evals), color=color, linestyle="--", marker="o", markersize=4, label=f"{name} val")
        ax_lr.plot(xs, [r.get("lr") for r in records], color=color)
        ax_speed.plot(xs, [r.get("tokens_per_sec") for r in records], color=color)
        scored = [(xv, 100 * r["hellaswag_acc_norm"]) for xv, r in zip(xs, records) if "hellaswag_acc_norm" in r]
        if scored:
            axes[3].plot(*zip(*scored), color=color, marker="o", markersize=4)
    ax_loss.set_ylabel("loss" + (f" (train: mean of {smooth} records)" if smooth > 1 else ""))
    ax_loss.legend()
    ax_lr.set_ylabel("learning rate")
    ax_speed.set_ylabel("tokens/s")
    if hellaswag:
        axes[3].set_ylabel("HellaSwag acc_norm (%)")
        axes[3].axhline(25, color="gray", linestyle=":", linewidth=1)  # chance: one ending in four
    axes[-1].set_xlabel(X_LABELS[x])
    save(fig, axes, out)
    return notes


@cli.command
def main(argv=None):
    parser = cli.parser(__doc__)
    parser.add_argument("--ckpt", nargs="+", required=True, metavar="RUN", help="run directories (train.py's out_dir)")
    parser.add_argument("--png", default="loss.png", metavar="FILE", help="image to write (default loss.png)")
    parser.add_argument("--x", default="step", choices=list(X_LABELS), help="x axis (default step)")
    parser.add_argument("--smooth", type=int, default=1, metavar="N", help="average the training loss over N log "
                        "records")
    args = parser.parse_args(argv)
    if args.smooth < 1:
        raise PlotError(f"--smooth must be at least 1, got {args.smooth}")
    pyplot("plot.py")  # before reading any log: a missing matplotlib is said first
    for note in plot(args.ckpt, args.png, args.x, args.smooth):
        print(note, file=sys.stderr)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
