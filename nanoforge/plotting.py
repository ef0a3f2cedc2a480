"""
What plot.py and scaling.py draw with: a run's log.jsonl read back, and the one figure style they share
(matplotlib without a display, a light grid, 100 dpi), so their figures look alike.
"""

import json
import os

from nanoforge.errors import UserError


class PlotError(UserError):
    """A run directory or option that cannot be plotted, phrased for the user."""


def read_log(run_dir):
    """The records of run_dir/log.jsonl in step order, the last one written for each step winning
    (a resumed run writes the steps after its checkpoint again). A line that does not parse, such
    as the last one while the run is writing it, is left out."""
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise PlotError(f"no log.jsonl in '{run_dir}': pass a run directory (train.py's out_dir)")
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step[record["step"]] = record
    if not by_step:
        raise PlotError(f"'{path}' has no records yet: wait for the run's first log_interval steps")
    return [by_step[step] for step in sorted(by_step)]


def pyplot(command):
    """matplotlib.pyplot drawing to files only (no display needed), or a one-line error saying how to install it."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise PlotError(f"{command} needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, axes, out):
    """Grid every panel, fit the layout, write the figure to `out` and close it."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
