"""
LoRA against a full fine-tune on GPT-2 (124M)'s shapes, side by side in one process: the training state each
keeps (weights, gradients, AdamW's moments) and the time of a whole training step (forward, backward, update).
The two take turns, round after round, so both see the same machine load; each step's CPU time is reported
beside its wall time, since on a shared machine the wall time is mostly waiting for a core. The weights are random: memory and
time depend on the shapes, not on the values (docs/lora.md has the loss of real fine-tunes).

    python -m bench.lora_memory                      # rank 8 on attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj
    OMP_NUM_THREADS=1 python -m bench.lora_memory    # one thread: CPU time is then the work, not spinning
    python -m bench.lora_memory --rank 16 --targets attn.c_attn --block-size 512
"""

import argparse
import copy
import statistics
import time

import torch

from model import GPT, GPTConfig
from nanoforge import lora
from nanoforge.config import TrainConfig
from nanoforge.machine import probe
from nanoforge.optim import build_optimizer

MB = 2**20


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def training_state(model, optimizer):
    """Bytes of what a step keeps between steps: the weights, their gradients, the optimizer's state."""
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {"weights": nbytes(params), "gradients": nbytes([p.grad for p in params if p.grad is not None]),
            "optimizer": nbytes(state)}


def step(model, optimizer, x, y):
    """One training step (forward, backward, AdamW update); returns its (wall, CPU) seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    _, loss = model(x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # keep the gradients' memory allocated, as a training loop does
    return time.perf_counter() - wall, time.process_time() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each (after one warm-up step)")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = GPT(GPTConfig(vocab_size=50257, block_size=1024, dropout=0.0))  # GPT-2 (124M)
    cfg = TrainConfig(init_from="gpt2", lora_rank=args.rank, lora_alpha=2.0 * args.rank, lora_targets=args.targets,
                      weight_decay=0.0)
    cfg.validate()
    full = copy.deepcopy(base)
    adapted = lora.add_adapters(base, cfg, tokenizer=object())  # no chat tokens: no new embedding rows
    runs = {"full fine-tune": (full, build_optimizer(full, cfg, "cpu")),
            f"LoRA r={args.rank}": (adapted, build_optimizer(adapted, cfg, "cpu"))}
    x = torch.randint(0, 50257, (args.batch_size, args.block_size), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, dims=1)
    times = {name: [] for name in runs}
    for round_ in range(args.rounds + 1):  # round 0 warms up (and creates the optimizer state)
        for name, (model, optimizer) in runs.items():
            seconds = step(model, optimizer, x, y)
            if round_:
                times[name].append(seconds)

    print(probe().summary())
    print(f"GPT-2 124M shapes, float32, {args.batch_size} x {args.block_size} tokens a step, targets {args.targets}, "
          f"median of {args.rounds} steps each, taking turns, {torch.get_num_threads()} threads")
    print(f"{'':<18} {'trainable':>12} {'weights MB':>11} {'grads MB':>9} {'AdamW MB':>9} {'state MB':>9} "
          f"{'wall s':>7} {'CPU s':>7}")
    rows = {}
    for name, (model, optimizer) in runs.items():
        state = training_state(model, optimizer)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        wall, cpu = (statistics.median(t[i] for t in times[name]) for i in (0, 1))
        rows[name] = (state, wall, cpu)
        print(f"{name:<18} {trainable:>12,} {state['weights'] / MB:>11.1f} {state['gradients'] / MB:>9.1f} "
              f"{state['optimizer'] / MB:>9.1f} {sum(state.values()) / MB:>9.1f} {wall:>7.3f} {cpu:>7.3f}")
    (full_state, full_wall, full_cpu), (lora_state, lora_wall, lora_cpu) = rows.values()
    print(f"LoRA / full: optimizer memory {lora_state['optimizer'] / full_state['optimizer']:.4f}, training state "
          f"{sum(lora_state.values()) / sum(full_state.values()):.3f}, step time {lora_wall / full_wall:.3f} wall, "
          f"{lora_cpu / full_cpu:.3f} CPU")


if __name__ == "__main__":
    main()
