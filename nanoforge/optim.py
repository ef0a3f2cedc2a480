"""
Optimizers for training: AdamW alone (nanoGPT's), or Muon for the hidden weight matrices with
AdamW for everything else (modded-nanogpt's and nanochat's).

Muon (Jordan et al. 2024, https://kellerjordan.github.io/posts/muon/) takes SGD-momentum's update
of a 2-D weight matrix and replaces it by the nearest semi-orthogonal matrix (found by a few
Newton-Schulz iterations), so every direction of the matrix moves at the same rate. It is defined
for matrices that map one hidden space to another; embeddings, the un-embedding and the gains and
biases (vectors) stay with AdamW. Our Muon is torch.optim.Muon (in PyTorch since 2.9) with its update
written out, because torch's runs Newton-Schulz in bfloat16 always, which a CPU without native bfloat16 only
emulates, many times slower than float32 (docs/machines.md has the figures). We orthogonalise
in bfloat16 where the machine multiplies it natively (CUDA, as the speedruns do; CPUs with avx512_bf16 or
AMX) and in float32 elsewhere. The state (a momentum_buffer per matrix) and the hyperparameters are
torch's, so checkpoints of either resume in the other.

With optimizer=muon each parameter group carries `lr_key`, the config key holding its peak learning rate
(a group without one uses learning_rate); set_lr scales that peak by the schedule.
"""

import inspect
import math

import torch
from nanoforge.machine import probe
from nanoforge.sharding import full, shard_like


class Optimizers:
    """Several torch optimizers, each over its own parameters, driven as one: step, zero_grad,
    param_groups (all of them, in order) and one state_dict in torch's format, whose parameter
    indices run on from one optimizer to the next (so a checkpoint stores it like any optimizer's)."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    def step(self):
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        state, groups, offset = {}, [], 0
        for opt in self.optimizers:
            own = opt.state_dict()
            state.update({offset + i: s for i, s in own["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in own["param_groups"])
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        first_group, offset = 0, 0
        for opt in self.optimizers:
            n_groups, n_params = len(opt.param_groups), sum(len(g["params"]) for g in opt.param_groups)
            groups = state_dict["param_groups"][first_group : first_group + n_groups]
            opt.load_state_dict({
                "state": {i - offset: s for i, s in state_dict["state"].items() if offset <= i < offset + n_params},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in groups],
            })
            first_group, offset = first_group + n_groups, offset + n_params


def adamw(groups, cfg, device_type):
    """torch's AdamW over the parameter groups, fused on CUDA (one kernel for all parameters)."""
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             **({"fused": True} if fused else {}))


def orthogonalize(update, coefficients, steps, eps, dtype):
    """The nearest semi-orthogonal matrix to update (out, in), roughly: `steps` quintic Newton-Schulz
    iterations X <- a X + (b A + c A^2) X with A = X X^T, computed in dtype. Like torch.optim.Muon's (whose
    coefficients push the singular values towards 1 fast rather than exactly), so in bfloat16 it is torch's."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T  # (small, large): the Gram matrix A is the smaller of the two
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm = 1: inside the iteration's range
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon (default nesterov momentum and learning-rate scaling) orthogonalising in ns_dtype.

    Under FSDP (nanoforge.sharding) a parameter, its gradient and its momentum buffer are DTensor shards
    (rows of the matrix). Orthogonalising needs the whole update matrix: every process gathers it
    (all-gather, full_tensor), orthogonalises all of it and keeps its own rows. The momentum buffer stays
    sharded. The cost: every process does every matrix's Newton-Schulz iterations (the same work as one
    unsharded process, not 1/N of it) and holds one whole matrix at a time, plus one all-gather of each
    matrix per step. For the model sizes we shard this is small beside the forward and backward passes;
    splitting the matrices over the processes would save the repeated work at the price of a second
    exchange of the results."""

    def __init__(self, params, lr, weight_decay, momentum, ns_dtype):
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum)
        self.ns_dtype = ns_dtype  # a property of the machine, not of the run: not in the state_dict

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)  # torch's: creates each momentum_buffer
            lr, momentum = group["lr"], group["momentum"]
            for p, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - momentum)
                update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                # Under FSDP: the whole matrix in every process (see the class docstring), orthogonalised, then
                # back to this process's rows (every process has the same whole update). Else unchanged.
                update = orthogonalize(full(update), group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       self.ns_dtype)
                update = shard_like(update, p)
                p.mul_(1 - lr * group["weight_decay"])
                # A tall matrix (out > in) moves sqrt(out / in) times further: torch's "original" scaling.
                p.add_(update, alpha=-lr * math.sqrt(max(1, p.size(0) / p.size(1))))


def newton_schulz_dtype(device_type):
    """bfloat16 where this machine multiplies it natively, else float32 (see the module docstring)."""
    machine = probe(cuda=device_type == "cuda")
    native = machine.cuda_bf16 if device_type == "cuda" else machine.native_bf16 if device_type == "cpu" else False
    return torch.bfloat16 if native else torch.float32


def build_optimizer(model, cfg, device_type):
    """The optimizer cfg.optimizer names, over the model's trainable parameters. All parameter grouping is here."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # a tied lm_head is listed once, as wte
    if cfg.optimizer == "adamw":
        # nanoGPT's groups: the matrices (Linear weights, embeddings) decay; biases and norm gains do not.
        return adamw([{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                      {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}], cfg, device_type)
    embeddings = [p for n, p in named if n.startswith(("transformer.wte.", "transformer.wpe."))]
    unembedding = [p for n, p in named if n.startswith("lm_head.")]  # only when untied
    vectors = [p for _, p in named if p.dim() < 2]
    taken = {id(p) for p in embeddings + unembedding + vectors}
    matrices = [p for _, p in named if id(p) not in taken]  # (out, in) weights of the blocks' Linear layers
    muon = Muon([{"params": matrices, "lr_key": "matrix_lr"}], lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum, ns_dtype=newton_schulz_dtype(device_type))
    groups = [{"params": embeddings, "lr_key": "embedding_lr"},
              {"params": unembedding, "lr_key": "unembedding_lr"},
              {"params": vectors, "lr_key": "learning_rate"}]
    groups = [{**g, "weight_decay": 0.0} for g in groups if g["params"]]
    return Optimizers(muon, adamw(groups, cfg, device_type))


def set_lr(optimizer, lr, cfg):
    """Give every parameter group the schedule's learning rate `lr` (which is for learning_rate's
    peak), scaled to the group's own peak rate key."""
    for group in optimizer.param_groups:
        key = group.get("lr_key", "learning_rate")
        group["lr"] = lr if key == "learning_rate" else lr * getattr(cfg, key) / cfg.learning_rate
