"""
Experiment trackers beside log.jsonl: Weights & Biases (wandb_log, wandb_project, wandb_run_name,
nanoGPT's keys) and TensorBoard (tensorboard_dir). Both are off by default and optional extras;
each receives the same records train.py writes to log.jsonl. Only the master process logs.
"""

import importlib.util
import os

from nanoforge.config import ConfigError


def require(module, extra, key):
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key} needs the {module} package, which is not installed: pip install -e '.[{extra}]'")


def check_installed(cfg):
    """A one-line ConfigError when a tracker the config turns on is not installed: called before a run
    writes anything, since the trackers themselves start only when its loop does."""
    if cfg.wandb_log:
        require("wandb", "wandb", "wandb_log = true")
    if cfg.tensorboard_log:
        require("tensorboard", "tensorboard", "tensorboard_log = true")


class Trackers:
    """Fans each log record out to the trackers the config turns on (check_installed first)."""

    def __init__(self, cfg, enabled=True):
        self.wandb_run = self.tensorboard = None
        if not enabled:
            return
        if cfg.wandb_log:
            import wandb

            # The run's own files (and offline runs, WANDB_MODE=offline) go in the run directory.
            name = cfg.wandb_run_name or os.path.basename(os.path.normpath(cfg.out_dir))
            self.wandb_run = wandb.init(project=cfg.wandb_project, name=name, dir=cfg.out_dir,
                                        config=cfg.to_dict())
        if cfg.tensorboard_log:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))

    def log(self, record):
        """A log.jsonl record: its numbers (None is left out) at its step."""
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()

    def close(self):
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
