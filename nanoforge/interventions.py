"""
What each head, attention layer and MLP contributes, found by changing the forward pass and watching
what changes (the causal tools TransformerLens popularised, for our own GPT and every architecture option):

- ablation: the model with chosen parts removed (their output set to zero, or to its mean at each position
  over a reference set of text, as in Wang et al. 2022's IOI work), and how the loss and each next-token
  probability move;
- head importance: for every head, how much the loss over a prepared data set rises when it alone is ablated;
- direct logit attribution: one logit split into what the embeddings, each head and each MLP write into
  the residual stream, read through the final norm with its scale frozen (Elhage et al. 2021, "A
  mathematical framework for transformer circuits");
- activation patching: a clean and a corrupted prompt; copy one clean activation (the residual stream at
  one layer and position, or one head's output) into the corrupted run, and measure how much of the
  answer's clean-vs-corrupted logit difference that restores (Meng et al. 2022, "Locating and editing
  factual associations in GPT").

Every number comes from the model's own forward pass: forward hooks on its modules replace or record an
activation, and nothing of model.py is re-implemented. A head's output is its slice of the input of the
attention's output projection (attn.c_proj), where the heads are concatenated: head h of n_head owns
channels h * head_dim .. (h + 1) * head_dim - 1, so a pre-hook on c_proj reaches one head without any
switch in model.py.
"""

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from model import RMSNorm
from nanoforge.errors import UserError

NORM_EPS = 1e-5  # model.py's LayerNorm and RMSNorm both normalise with this epsilon


class InterventionError(UserError):
    """A part, position or token that this model or prompt does not have."""


@dataclass(frozen=True)
class Part:
    """A place in the forward pass: one head's output ("head", layer, head), a whole attention layer's or
    MLP's output ("attn" / "mlp", layer), or the residual stream ("resid", i): i = 0 after the embeddings,
    i = l + 1 after block l."""

    kind: str
    layer: int
    head: int = None

    def __str__(self):
        """The name --ablate takes: 1.2, attn1, mlp1 (and resid0 .. resid{n_layer} for the stream)."""
        return f"{self.layer}.{self.head}" if self.kind == "head" else f"{self.kind}{self.layer}"


SPEC = re.compile(r"(\d+)\.(\d+)|(attn|mlp)(\d+)")


def parse_parts(spec):
    """'1.2,attn0,mlp3' -> [Part]; the syntax only (check_parts checks them against a model)."""
    parts = []
    for item in spec.split(","):
        match = SPEC.fullmatch(item.strip())
        if not match:
            raise InterventionError(f"--ablate: '{item}' is not a part: write a head as LAYER.HEAD (e.g. 1.2), "
                                    "a whole attention layer as attnL, an MLP as mlpL, comma-separated")
        layer, head, kind, kind_layer = match.groups()
        parts.append(Part("head", int(layer), int(head)) if kind is None else Part(kind, int(kind_layer)))
    return parts


def check_parts(parts, config):
    for part in parts:
        if part.layer >= config.n_layer or (part.kind == "head" and part.head >= config.n_head):
            raise InterventionError(f"--ablate: this model has layers 0..{config.n_layer - 1} and heads "
                                    f"0..{config.n_head - 1}; there is no '{part}'")


def all_heads(config):
    return [Part("head", layer, head) for layer in range(config.n_layer) for head in range(config.n_head)]


# ----------------------------------------------------------------------------- hooks

def register(model, part, edit):
    """Hook edit(activation) -> activation into the model at part; returns the hook's handle.
    Activations: a head's (B, T, head_dim); attn, mlp and resid (B, T, n_embd)."""
    tr = model.transformer
    if part.kind == "head":
        attn = tr.h[part.layer].attn
        channels = slice(part.head * attn.head_dim, (part.head + 1) * attn.head_dim)

        def edit_head(module, args):
            heads = args[0].clone()  # (B, T, n_embd): the heads concatenated, before the output projection
            heads[..., channels] = edit(heads[..., channels])
            return (heads, *args[1:])

        return attn.c_proj.register_forward_pre_hook(edit_head)
    if part.kind == "resid":
        module = tr.drop if part.layer == 0 else tr.h[part.layer - 1]
    else:
        module = getattr(tr.h[part.layer], part.kind)
    return module.register_forward_hook(lambda module, args, out: edit(out))


@contextmanager
def intervene(model, edits):
    """While inside, the model runs with each {Part: edit} applied."""
    handles = [register(model, part, edit) for part, edit in edits.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def record(model, idx, parts):
    """One forward pass of idx (B, T): the logits (B, T, vocab_size) and {part: its activation}."""
    seen = {}

    def keep(part):
        def edit(activation):
            seen[part] = activation.detach().clone()
            return activation
        return edit

    with intervene(model, {part: keep(part) for part in parts}):
        logits, _ = model(idx)
    return logits, seen


def ablations(parts, mode, means=None):
    """{part: edit} that removes each part: its output set to zero, or (mode "mean") to its mean at the same
    position over a reference set (means, from mean_activations). The reference is other text than the one
    ablated: a mean over the ablated prompt itself would keep 1/T of what it removes."""
    if mode == "zero":
        return {part: torch.zeros_like for part in parts}
    if means is None:
        raise InterventionError("mean ablation needs a reference set: give --data DIR (a prepared data directory; "
                                "its validation split's mean activations replace the parts')")
    return {part: (lambda activation, mean=means[part]: mean[:, : activation.size(1)].expand_as(activation))
            for part in parts}


@torch.no_grad()
def mean_activations(model, windows, parts, batch_size=8):
    """{part: (1, T, width)} each part's output averaged over the reference windows (N, T) at each position:
    activations differ by position (position 0's most of all), so position t is replaced by the mean at t."""
    device = next(model.parameters()).device
    sums = {}
    for batch in windows.split(batch_size):
        _, seen = record(model, batch.to(device), parts)
        for part in parts:
            sums[part] = sums.get(part, 0) + seen[part].float().sum(dim=0, keepdim=True)
    return {part: (total / len(windows)).to(seen[part].dtype) for part, total in sums.items()}


def next_token_loss(logits, idx):
    """Mean cross-entropy of each position's prediction of the next token of idx (B, T)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), idx[:, 1:].flatten()).item()


# ----------------------------------------------------------------------------- ablation of one prompt

@dataclass
class Ablation:
    parts: list
    mode: str
    loss: float  # over the prompt, as the model is
    ablated_loss: float  # with the parts removed
    p: list  # (T - 1) probability of the actual next token at each position
    ablated_p: list

    def to_json(self, labels):
        return {"ablate": ",".join(map(str, self.parts)), "ablation": self.mode, "loss": self.loss,
                "ablated_loss": self.ablated_loss,
                "positions": [{"position": t, "token": labels[t], "next": labels[t + 1], "p": p, "ablated_p": q}
                              for t, (p, q) in enumerate(zip(self.p, self.ablated_p))]}


@torch.no_grad()
def ablate(model, idx, parts, mode="zero", means=None):
    """The prompt idx (1, T), T >= 2, run as it is and with parts ablated (means: for mode "mean")."""
    logits, _ = model(idx)
    with intervene(model, ablations(parts, mode, means)):
        ablated, _ = model(idx)
    targets = idx[0, 1:, None]  # (T - 1, 1)

    def next_p(lg):
        return F.softmax(lg[0, :-1].float(), dim=-1).gather(1, targets)[:, 0].tolist()

    return Ablation(parts, mode, next_token_loss(logits, idx), next_token_loss(ablated, idx), next_p(logits),
                    next_p(ablated))


@torch.no_grad()
def head_importance(model, batches, mode="zero", means=None):
    """For every head, the rise in mean loss over batches [(x, y)] when it alone is ablated (means: for mode
    "mean"). Returns (the model's own loss, a (n_layer, n_head) tensor of increases)."""
    heads = all_heads(model.config)
    base, ablated = 0.0, torch.zeros(len(heads))
    edits = ablations(heads, mode, means)
    for x, y in batches:
        base += model(x, y)[1].item()
        for i, head in enumerate(heads):
            with intervene(model, {head: edits[head]}):
                ablated[i] += model(x, y)[1].item()
    n = len(batches)
    return base / n, (ablated / n - base / n).view(model.config.n_layer, model.config.n_head)


# ----------------------------------------------------------------------------- direct logit attribution

@dataclass
class Attribution:
    token: int
    position: int
    logit: float  # the model's own logit of token at position
    parts: list  # [(name, value)] that sum to logit
    norm_scale: float  # 1 / sigma of the final norm, frozen from the real forward pass
    cap_scale: float  # capped / uncapped logit (1.0 without logit_softcap)

    def to_json(self, label):
        return {"token": label, "position": self.position, "logit": self.logit,
                "parts": [{"name": name, "value": value} for name, value in self.parts],
                "norm_scale": self.norm_scale, "softcap_scale": self.cap_scale}


def residual_parts(model, seen, position):
    """The vectors (n_embd,) at position whose sum is the residual stream entering the final norm:
    the embeddings, then for each layer each head (its slice through c_proj), c_proj's bias, and the MLP."""
    parts = [("embeddings", seen[Part("resid", 0)][0, position])]
    for layer, block in enumerate(model.transformer.h):
        proj, width = block.attn.c_proj, block.attn.head_dim
        for head in range(block.attn.n_head):
            z = seen[Part("head", layer, head)][0, position]  # (head_dim,)
            parts.append((f"{layer}.{head}", proj.weight[:, head * width : (head + 1) * width] @ z))
        if proj.bias is not None:
            parts.append((f"attn{layer} bias", proj.bias))
        parts.append((f"mlp{layer}", seen[Part("mlp", layer)][0, position]))
    return parts


@torch.no_grad()
def attribute(model, idx, position, token):
    """The logit of token at position of idx (1, T) split into the contributions of the embeddings, each
    head, each attention bias and each MLP, plus the final norm's bias.

    The final norm is not linear: it divides the stream by its scale sigma (the standard deviation for
    LayerNorm, the root mean square for RMSNorm). Frozen at the value of the real forward pass, it is: each
    part is centred (LayerNorm), divided by that same sigma, multiplied by the norm's weight and read by the
    lm_head's row for the token, and the parts sum to the logit. A logit_softcap is treated the same way:
    each part is multiplied by the real ratio capped / uncapped logit."""
    n_layer = model.config.n_layer
    parts = [Part("resid", 0), Part("resid", n_layer)] + all_heads(model.config)
    logits, seen = record(model, idx, parts + [Part("mlp", layer) for layer in range(n_layer)])
    ln_f, row = model.transformer.ln_f, model.lm_head.weight[token]  # row: (n_embd,)
    stream = seen[Part("resid", n_layer)][0, position].float()  # what ln_f normalises
    layer_norm = not isinstance(ln_f, RMSNorm)  # LayerNorm also subtracts the mean
    centred = stream - stream.mean() if layer_norm else stream
    norm_scale = 1.0 / torch.sqrt(centred.square().mean() + NORM_EPS)
    read = (ln_f.weight.float() * row.float()) * norm_scale  # a part's logit is (centred part) . read

    def through_norm(v):
        v = v.float()
        return ((v - v.mean()) if layer_norm else v) @ read

    parts = [(name, through_norm(v)) for name, v in residual_parts(model, seen, position)]
    if getattr(ln_f, "bias", None) is not None:
        parts.append(("ln_f bias", ln_f.bias.float() @ row.float()))
    logit = logits[0, position, token].float()
    uncapped = sum(v for _, v in parts)
    cap_scale = (logit / uncapped).item() if model.config.logit_softcap > 0 and uncapped != 0 else 1.0
    return Attribution(token, position, logit.item(), [(name, v.item() * cap_scale) for name, v in parts],
                       norm_scale.item(), cap_scale)


# ----------------------------------------------------------------------------- activation patching

@dataclass
class Patching:
    answer: int
    clean_logit: float  # the answer's logit at the last position, clean prompt
    corrupted_logit: float  # and corrupted prompt
    streams: torch.Tensor  # (n_layer + 1, T) fraction restored by patching the stream at (i, position)
    heads: torch.Tensor  # (n_layer, n_head) fraction restored by patching one head's output at every position

    def to_json(self, label, labels, corrupted_labels):
        return {"answer": label, "clean_logit": self.clean_logit, "corrupted_logit": self.corrupted_logit,
                "tokens": labels, "corrupted_tokens": corrupted_labels,
                "streams": ["embeddings"] + [f"after block {i}" for i in range(len(self.streams) - 1)],
                "residual": [[round(v, 6) for v in row] for row in self.streams.tolist()],
                "heads": [[round(v, 6) for v in row] for row in self.heads.tolist()]}


def patched(clean, position=None):
    """An edit that puts the clean activation (1, T, width) in place of the corrupted one: at one
    position, or (None) at every position."""
    def edit(activation):
        if position is None:
            return clean.expand_as(activation)
        activation = activation.clone()
        activation[:, position] = clean[:, position]
        return activation
    return edit


@torch.no_grad()
def restored(model, corrupted, edits, answer, clean_logit, corrupted_logit):
    """The fraction of the answer's clean - corrupted logit difference that edits restore in the corrupted run."""
    with intervene(model, edits):
        logits, _ = model(corrupted)
    return (logits[0, -1, answer].item() - corrupted_logit) / (clean_logit - corrupted_logit)


@torch.no_grad()
def patch(model, clean, corrupted, answer):
    """Activation patching of the answer's logit at the last position: clean and corrupted are (1, T)."""
    cfg, T = model.config, clean.size(1)
    streams = [Part("resid", i) for i in range(cfg.n_layer + 1)]
    heads = all_heads(cfg)
    clean_logits, seen = record(model, clean, streams + heads)
    corrupted_logits, _ = model(corrupted)
    clean_logit, corrupted_logit = clean_logits[0, -1, answer].item(), corrupted_logits[0, -1, answer].item()
    if abs(clean_logit - corrupted_logit) < 1e-6:
        raise InterventionError("the answer has the same logit after both prompts, so there is nothing to restore: "
                                "choose another --answer or a corrupted prompt that changes it")
    args = (answer, clean_logit, corrupted_logit)
    by_stream = torch.tensor([[restored(model, corrupted, {s: patched(seen[s], t)}, *args) for t in range(T)]
                              for s in streams])  # (n_layer + 1, T)
    by_head = torch.tensor([restored(model, corrupted, {h: patched(seen[h])}, *args) for h in heads])
    return Patching(answer, clean_logit, corrupted_logit, by_stream, by_head.view(cfg.n_layer, cfg.n_head))


# ----------------------------------------------------------------------------- inputs from the command line

def one_token(tokenizer, text, flag):
    """The id of text, which must be exactly one token of this tokenizer."""
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise InterventionError(f"{flag} '{text}' is {len(ids)} tokens for this model's {tokenizer.kind} tokenizer: "
                                "give text that is exactly one token (e.g. a single character for a char model)")
    return ids[0]


def position_in(position, T):
    """A position given from the start (0 ..) or from the end (-1 is the last) -> 0 .. T - 1."""
    if not -T <= position < T:
        raise InterventionError(f"--position {position} is outside the prompt's {T} tokens: use 0..{T - 1}, "
                                "or -1 for the last")
    return position % T


def validation_data(data_dir, tokenizer, block_size):
    """A prepared data directory whose tokenizer is the model's."""
    from nanoforge.data import Dataset

    data = Dataset(data_dir, block_size)
    if data.tokenizer.to_dict() != tokenizer.to_dict():
        raise InterventionError(f"'{data_dir}' was prepared with another tokenizer ({data.tokenizer.kind}, "
                                f"{data.tokenizer.vocab_size} tokens) than the model's ({tokenizer.kind}, "
                                f"{tokenizer.vocab_size}): use the data the model was trained on")
    return data


def importance_batches(data_dir, tokenizer, block_size, n_batches, batch_size=8):
    """n_batches fixed (seeded) batches [(x, y)] of the validation split of a prepared data directory,
    block_size tokens long; its tokenizer must be the model's."""
    data = validation_data(data_dir, tokenizer, block_size)
    generator = torch.Generator().manual_seed(0)
    return [data.get_batch("val", batch_size, generator) for _ in range(n_batches)]


def reference_windows(data_dir, tokenizer, block_size, n_windows=64):
    """Mean ablation's reference set: n_windows windows (n_windows, block_size) of the validation split's
    token stream, at seeded random places other than importance_batches' (seed 1, not 0). Each window starts
    where the model's context starts, so its position t is what position t of a prompt sees."""
    data = validation_data(data_dir, tokenizer, block_size)
    tokens = data.splits["val"]
    if len(tokens) < block_size:
        raise InterventionError(f"the validation split of '{data_dir}' has {len(tokens)} tokens, fewer than the "
                                f"{block_size} positions mean ablation averages over: use a larger data directory")
    starts = torch.randint(len(tokens) - block_size + 1, (n_windows,), generator=torch.Generator().manual_seed(1))
    return torch.stack([torch.from_numpy(tokens[s : s + block_size].astype("int64")) for s in starts.tolist()])
