"""
A scaling sweep you can run on a laptop: train depths 1..N of the depth dial, each at its compute-optimal token
budget (tokens_per_param x parameters), on a small built-in corpus; then print a table and the power law fitted
to validation loss against training compute, and draw them.

    python prepare.py pystdlib             # the corpus, offline, a few seconds
    python scaling.py                      # depths 1..5: 4.4 minutes on 2 quiet CPU cores (docs/scaling.md)
    python scaling.py --depths 6           # later: trains depth 6 only, reusing 1..5

Each depth is a plain train.py run into its own directory, OUT/d<depth>:
    python train.py CONFIG --depth=<depth> --out_dir=OUT/d<depth> --eval_interval=<a few evaluations per run>
A depth whose run finished is reused; one that stopped part-way (Ctrl-C, a crash) is resumed with --resume.
Compute is model.flops_per_token() x the tokens trained (nanoforge/scaling.py says why).
"""

import os
import subprocess
import sys

from nanoforge import cli, scaling
from nanoforge.plotting import pyplot

TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")


def train(run, config, resume):
    """One depth's train.py run, its output going to this terminal. Ctrl-C reaches train.py too (same process
    group): it writes a checkpoint and stops, and we wait for that before stopping ourselves."""
    args = scaling.train_args(run, config, resume)
    print(f"depth {run.depth}: {'resuming' if resume else 'training'}: python train.py {' '.join(args)}", flush=True)
    process = subprocess.Popen([sys.executable, TRAIN_PY, *args])
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.wait()
        raise
    if code != 0:
        raise scaling.ScalingError(f"depth {run.depth}'s train.py run stopped (exit status {code}; its output is "
                                   "above): fix the cause, then run the same command again to resume it")


@cli.command(interrupted="interrupted; finished depths are kept and the one training was checkpointed: run the "
                         "same command again to go on")
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = cli.parser(__doc__)
    parser.add_argument("--depths", default="5", metavar="N|A-B", help="depths 1..N, or A..B (default 5)")
    parser.add_argument("--config", default="configs/scaling.toml", metavar="FILE",
                        help="the runs' config (default configs/scaling.toml)")
    parser.add_argument("--out", default="out/scaling", metavar="DIR",
                        help="where the runs go, one directory per depth (default out/scaling)")
    parser.add_argument("--png", metavar="FILE", help="figure to write (default OUT/scaling.png)")
    args = parser.parse_args(argv)
    depths = scaling.parse_depths(args.depths)
    pyplot("scaling.py")  # a missing matplotlib is said before minutes of training, not after
    runs = scaling.plan(args.config, depths, args.out)
    for run in runs:
        state = scaling.status(run)
        if state == "finished":
            print(f"depth {run.depth}: finished in {run.out_dir}, reused", flush=True)
        else:
            train(run, args.config, resume=state == "unfinished")
    results = [scaling.read_result(run) for run in runs]
    a, b = scaling.fit_power_law([r.flops for r in results], [r.val_loss for r in results])
    print(scaling.table(results))
    print(scaling.describe_fit(a, b, len(results)))
    png = args.png or os.path.join(args.out, "scaling.png")
    title = f"python scaling.py {' '.join(argv)}".rstrip() + f"\n{results[-1].machine}"
    scaling.figure(results, (a, b), png, title)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
