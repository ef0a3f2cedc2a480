"""
Data-parallel training across processes, started by torchrun:

    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.toml

One process per GPU (NCCL), or several CPU processes (gloo). Every process holds the whole
model (parallel = "ddp"; "fsdp" shards it: nanoforge.sharding); each trains on its share of one
batch stream (data.Dataset.get_batch), and DistributedDataParallel averages the gradients. In a
single process (plain `python train.py`) every method here is a no-op, so train.py reads the
same either way.
"""

import os
import sys

import torch
import torch.distributed as dist


class Distributed:
    def __init__(self):
        # torchrun sets these; a plain `python train.py` is rank 0 of a world of 1.
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.enabled = self.world_size > 1
        self.is_master = self.rank == 0  # the one process that logs and writes checkpoints
        self.device = torch.device("cpu")

    def start(self, device):
        """Join the process group; returns the device this process trains on."""
        if not self.enabled:
            return device
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        elif device.type != "cpu":
            raise ValueError(f"multi-process training needs CUDA or the CPU, not '{device.type}'")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        return device

    def mean(self, tensor):
        """The average of a tensor over all processes (in place)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def any(self, flag):
        """True on every process if it is true on any (so all of them stop at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def gather(self, obj):
        """A list with every process's obj, on every process."""
        if not self.enabled:
            return [obj]
        objects = [None] * self.world_size
        dist.all_gather_object(objects, obj)
        return objects

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def end_process(code):
    """Exit a training process with `code` (as sys.exit takes it), skipping Python's shutdown under torchrun.

    Why: gloo's worker threads free a finished collective's tensors a moment after the caller has its
    result, and freeing a tensor made in Python takes the GIL. When that moment falls after Python began
    shutting down, the thread is killed inside C++ and the process aborts ("terminate called without an
    active exception"; a core dump showed ~AsyncAllgatherWork in ProcessGroupGloo::runLoop). Destroying the
    group does not stop those threads here (DistributedDataParallel keeps it alive), so a process that has
    finished its work, closed its files and left the group ends with os._exit instead. Nothing registered
    with atexit runs there: close what needs closing before calling this.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
