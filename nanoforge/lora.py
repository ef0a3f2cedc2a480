"""
LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): fine-tune a pretrained model by training, beside each
chosen frozen weight W (out, in), two small matrices A (r, in) and B (out, r), so the layer computes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

Only A and B (r * (in + out) numbers per layer instead of in * out) get gradients and AdamW's two moments, so a
model whose full fine-tune does not fit a GPU's memory can be fine-tuned on it. A starts as PEFT starts it
(kaiming_uniform with a = sqrt(5), nn.Linear's own initialisation) and B at zero, so a fresh adapter leaves the
model's outputs unchanged. After training, W + (alpha / r) B A is one matrix again (merge): the merged model is a
plain GPT, as fast as the base.

model.py's classes are not touched: add_adapters() swaps the chosen nn.Linear modules (by name pattern, e.g.
"attn.c_attn") for LoRALinear modules holding the same weight and bias. When the data's tokenizer adds tokens the
base never saw (SFT's chat tokens), their rows of the token embedding (and of the un-embedding) also train, as a
delta on the frozen rows (NewTokenRows): a frozen embedding would keep every chat token at the same vector.

A LoRA run's checkpoint holds only what trains (the adapters, the new rows) and names its base by path and a
content hash (base_reference); loading it rebuilds the base, checks the hash and adds the adapters.
"""

import functools
import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from safetensors import safe_open

from nanoforge import gpt2
from nanoforge.checkpoint import CheckpointError, checkpoint_path, is_checkpoint, read_info


class LoRALinear(nn.Module):
    """An nn.Linear's frozen weight and bias plus a trainable low-rank update B A scaled by alpha / rank.
    A and B stay float32 even when the frozen weight is bfloat16 (see freeze_base)."""

    def __init__(self, linear, rank, alpha, dropout):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: state-dict names unchanged
        device = linear.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r)
        # PEFT's (and nn.Linear's) initialisation of A; B = 0 makes the update zero until B trains.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x):  # x: (..., in) -> (..., out)
        y = F.linear(x, self.weight, self.bias)
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., r) -> (..., out)
        return y + self.scaling * update

    def merged(self):
        """The plain nn.Linear computing the same thing (without dropout): W + (alpha / r) B A."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=self.weight.device)
        with torch.no_grad():
            delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())  # (out, in)
            linear.weight.copy_(self.weight.float() + delta)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class NewTokenRows(nn.Module):
    """Trainable rows for token ids first .. first + n - 1 (tokens the base never saw), added to a frozen
    embedding's rows: used for the lookup (as_input) and, the same rows when the lm_head is tied, for the
    logits (as_output). They start at zero: the grown rows begin where the base put them."""

    def __init__(self, first, n, n_embd, device):
        super().__init__()
        self.first = first
        self.delta = nn.Parameter(torch.zeros(n, n_embd, device=device))  # (n, n_embd)

    def as_input(self, idx):
        """(B, T) ids -> (B, T, n_embd): each new token's delta, zero for the others."""
        is_new = (idx >= self.first) & (idx < self.first + len(self.delta))
        rows = F.embedding((idx - self.first).clamp(0, len(self.delta) - 1), self.delta)
        return rows * is_new.unsqueeze(-1).to(rows.dtype)

    def as_output(self, x, vocab_size):
        """(B, T, n_embd) -> (B, T, vocab_size): the new tokens' extra logits, zero for the others."""
        extra = F.linear(x, self.delta)  # (B, T, n)
        return F.pad(extra, (self.first, vocab_size - self.first - len(self.delta)))


class EmbeddingWithNewRows(nn.Module):
    def __init__(self, embedding, rows):
        super().__init__()
        self.weight, self.new_rows = embedding.weight, rows

    def forward(self, idx):
        return F.embedding(idx, self.weight) + self.new_rows.as_input(idx)


class HeadWithNewRows(nn.Module):
    def __init__(self, head, rows):
        super().__init__()
        self.weight, self.new_rows = head.weight, rows

    def forward(self, x):
        return F.linear(x, self.weight) + self.new_rows.as_output(x, len(self.weight))


def add_adapters(model, cfg, tokenizer):
    """Freeze model and give it LoRA adapters on cfg.lora_targets, plus trainable rows for the tokens the
    tokenizer adds to its base (the chat tokens). Returns the model (changed in place)."""
    model.requires_grad_(False)
    targets = tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())  # checked by the config
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(tuple("." + t for t in targets)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    LoRALinear(module, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout))
    base = getattr(tokenizer, "base", None)  # a chat tokenizer: its base's ids are the ones the weights know
    if base is not None:
        wte = model.transformer.wte
        rows = NewTokenRows(base.vocab_size, tokenizer.vocab_size - base.vocab_size, wte.weight.size(1),
                            wte.weight.device)
        model.transformer.wte = EmbeddingWithNewRows(wte, rows)
        # A tied lm_head shares the embedding's new rows; an untied one gets its own.
        head_rows = rows if model.config.tie_embeddings else NewTokenRows(
            rows.first, len(rows.delta), wte.weight.size(1), wte.weight.device)
        model.lm_head = HeadWithNewRows(model.lm_head, head_rows)
    return model


def freeze_base(model, dtype):
    """Store the frozen weights of the blocks' linear layers in dtype (bfloat16 on a GPU halves the base's
    memory); the adapters, norms and embeddings stay float32 and autocast computes in bfloat16. Untested on GPU."""
    for module in model.transformer.h.modules():
        if isinstance(module, (nn.Linear, LoRALinear)):
            module.weight.data = module.weight.data.to(dtype)


def merge(model):
    """The model with every adapter folded into its base weights: a plain GPT (in place, returned)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    wte = model.transformer.wte
    if isinstance(wte, EmbeddingWithNewRows):
        head, device = model.lm_head, wte.weight.device
        embedding = nn.Embedding(*wte.weight.shape, device=device)
        lm_head = nn.Linear(head.weight.size(1), head.weight.size(0), bias=False, device=device)
        with torch.no_grad():
            embedding.weight.copy_(wte.weight)
            embedding.weight[wte.new_rows.first:][: len(wte.new_rows.delta)] += wte.new_rows.delta
            if model.config.tie_embeddings:
                lm_head.weight = embedding.weight
            else:
                lm_head.weight.copy_(head.weight)
                lm_head.weight[head.new_rows.first:][: len(head.new_rows.delta)] += head.new_rows.delta
        model.transformer.wte, model.lm_head = embedding, lm_head
    return model.requires_grad_(True)


def adapter_state(model, state):
    """The part of a model's state dict that a LoRA run trains (and its checkpoint stores)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {name: t for name, t in state.items() if name in trainable}


def load_adapter_state(model, state):
    """Load adapter tensors (adapter_state's) into a model that add_adapters prepared; every trainable
    tensor must be there and nothing else."""
    trainable = set(adapter_state(model, dict(model.named_parameters())))
    if set(state) != trainable:
        odd = sorted(set(state) ^ trainable)
        raise CheckpointError(f"the checkpoint's adapters do not fit this model (first differing tensor "
                              f"'{odd[0]}'): its lora_rank, lora_targets or tokenizer differ")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected


# ----------------------------------------------------------------------------- the base a run adapts

@functools.lru_cache(maxsize=8)
def _file_sha256(path, mtime_ns, size):  # cached by the file's identity: a run hashes its base once
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(kind, path):
    """Our checkpoint: the checksum of every tensor its header stores (read without the tensors). A Hugging
    Face weights file: a sha256 of its bytes."""
    if kind == "checkpoint":
        read_info(path)  # refuses a file that is not one of our checkpoints
        with safe_open(path, framework="pt") as f:
            return f.metadata()["sha256"]
    stat = os.stat(path)
    return _file_sha256(path, stat.st_mtime_ns, stat.st_size)


def base_reference(init_from):
    """{"kind", "path", "sha256"} of a run's base weights: one of our checkpoints (a run directory or file), or
    the weights file of a Hugging Face GPT-2 directory or name."""
    if is_checkpoint(init_from):
        kind, path = "checkpoint", checkpoint_path(init_from)
    else:
        directory = gpt2.locate(init_from)
        kind, path = "gpt2", os.path.join(directory, "model.safetensors")
        if not os.path.isfile(path):
            path = os.path.join(directory, "pytorch_model.bin")
    path = os.path.abspath(path)
    return {"kind": kind, "path": path, "sha256": content_hash(kind, path)}


def base_location(recorded):
    """What init_from takes to rebuild the recorded base: our checkpoint file, or the GPT-2 directory."""
    return recorded["path"] if recorded["kind"] == "checkpoint" else os.path.dirname(recorded["path"])


def check_base(recorded, adapters):
    """Refuse, in one line, a base that is missing or no longer the one the adapters were trained on."""
    path = recorded["path"]
    fix = (f"put the base the adapters were trained on back at '{path}', or use a merged checkpoint "
           f"(python export.py --ckpt ADAPTERS --merge --out FILE, run where the base exists)")
    try:
        now = content_hash(recorded["kind"], path)
    except (OSError, CheckpointError) as e:
        raise CheckpointError(f"the base of LoRA checkpoint '{adapters}' is missing or unreadable "
                              f"({getattr(e, 'strerror', None) or e}): {fix}") from None
    if now != recorded["sha256"]:
        raise CheckpointError(f"the base of LoRA checkpoint '{adapters}' has changed since the adapters were "
                              f"trained ('{path}' hashes to {now[:12]}..., they expect {recorded['sha256'][:12]}...): "
                              f"{fix}")
