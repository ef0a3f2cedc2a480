"""
Sharded data parallelism for train.py's parallel = "fsdp" (FSDP2, torch's fully_shard), under torchrun:

    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.toml --parallel=fsdp

Each of N processes keeps 1/N of every parameter, of its gradient and of its optimizer state (a
DTensor sharded on dim 0). Before a block runs, its whole weights are gathered (all-gather) and
dropped again after; gradients are reduce-scattered, so each process ends the backward pass with the
averaged gradient of its own shard. Each transformer block is one unit of gathering, the embeddings,
final norm and lm_head (the root) another: at any moment a process holds the whole weights of about
one block, not of the model.

Everything outside this module sees plain tensors: checkpoints are gathered into the same full,
self-contained file a single process writes (full_model_state, full_optimizer_state), and a full
checkpoint is cut back into shards when a sharded run loads it (load_model_state, load_optimizer_state).
So a run can stop under FSDP and go on under DDP or in one process, and the other way round. DDP
runs pass through every function here unchanged.
"""

from contextlib import contextmanager

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from nanoforge import loading
from nanoforge.config import ConfigError


def sharded(cfg, ddp):
    """Whether this run shards its model: parallel = "fsdp" with more than one process."""
    return cfg.parallel == "fsdp" and ddp.enabled


def check_dtype(cfg, dtype, ddp):
    """float16 needs a loss scaler (GradScaler), which does not know sharded gradients: refused."""
    if sharded(cfg, ddp) and dtype == torch.float16:
        raise ConfigError("parallel = 'fsdp' does not train in float16 (its loss scaling does not handle sharded "
                          "gradients): use --dtype=bfloat16 or --dtype=float32, or --parallel=ddp")


def shard(model, device, dtype):
    """fully_shard each transformer block, then the root (embeddings, final norm, lm_head). On CUDA with
    bfloat16 the blocks compute with bfloat16 copies of the weights while the shards, the gradients'
    reduction and the optimizer stay float32 (as DDP under autocast keeps them)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for block in model.transformer.h:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextmanager
def gradient_sync(runner, sync):
    """Average gradients across processes in this backward pass only when `sync` (the last micro-batch
    of a step): DDP's no_sync, FSDP's set_requires_gradient_sync (which keeps the unsharded gradients
    until then). A single process has nothing to sync."""
    if isinstance(runner, DistributedDataParallel) and not sync:
        with runner.no_sync():
            yield
        return
    if isinstance(getattr(runner, "_orig_mod", runner), FSDPModule):  # through torch.compile's wrapper too
        runner.set_requires_gradient_sync(sync)
    yield


def full(tensor):
    """A DTensor's whole value (every process takes part), or a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state(model):
    """The model's state dict with plain, whole tensors on the CPU. Every process must call it. A tied
    lm_head stays the same tensor as wte, so the checkpoint stores it once, as it does unsharded."""
    state, gathered = {}, {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            key = tensor.to_local().data_ptr()  # a tied weight is one shard under two names
            if key not in gathered:
                gathered[key] = tensor.full_tensor().cpu()
            tensor = gathered[key]
        state[name] = tensor
    return state


def full_optimizer_state(optimizer):
    """optimizer.state_dict() with each sharded state tensor (moments, momentum) whole, on the CPU: torch's
    format with integer parameter indices, exactly what a single process saves. Every process must call it.
    One tensor is whole on the device at a time: the whole state would not fit there, or FSDP was not needed."""
    state_dict = optimizer.state_dict()
    state = {index: {name: full(value).cpu() if isinstance(value, DTensor) else value for name, value in s.items()}
             for index, s in state_dict["state"].items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}


def shard_like(tensor, like):
    """A whole tensor cut to `like`'s shard (no communication: every process holds the whole tensor)."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def load_model_state(model, state):
    """Load a checkpoint's whole weights into a model, sharded or not (a tied lm_head, stored once as wte, is
    then wte's shard: loading.load_model_state fills it in)."""
    own = model.state_dict()
    loading.load_model_state(model, {name: shard_like(t, own[name]) if name in own else t
                                     for name, t in state.items()})


def load_optimizer_state(optimizer, state_dict):
    """Load a checkpoint's whole optimizer state; for a sharded parameter each tensor of its shape
    (moments, momentum; not the step count) is cut to the parameter's shard."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the order of the indices
    state = {}
    for index, s in state_dict["state"].items():
        p = params[int(index)]
        state[index] = {name: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v
                        for name, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": state_dict["param_groups"]})
