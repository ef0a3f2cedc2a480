"""
Sparse-autoencoder (SAE) features: which directions a layer's activations are made of.

A TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders") rewrites an activation
x (n_embd,) as a sum of at most k of `latents` learned directions (latents = expansion x n_embd):

    pre  = relu((x - b_dec) @ W_enc.T + b_enc)       (latents,)
    acts = pre with all but its k largest set to 0   (latents,)  k active: L0 = k
    x^   = acts @ W_dec + b_dec                       (n_embd,)   W_dec's rows: the features' directions

The recipe the references agree on (OpenAI's paper, EleutherAI's sparsify, dictionary_learning):
- the loss is the fraction of variance unexplained, FVU = |x - x^|^2 / |x - mean(x)|^2 over a batch;
- W_dec's rows stay at unit norm: the part of each row's gradient along the row is removed before the step,
  and the rows are renormalised after it (a feature's activation then measures its size, not W_dec's);
- W_enc starts as W_dec (the transpose of the decoder, as a map), so each latent first reads its own direction;
- b_dec starts at the mean activation, so the encoder sees centred inputs;
- AuxK: latents that have not fired for `dead_after` tokens are "dead"; the top k_aux = n_embd / 2 of their
  pre-activations are asked to reconstruct the main reconstruction's error (weight auxk_alpha = 1/32), which
  gives them a gradient and brings most back.
BatchTopK (Bussmann et al. 2024) keeps the k x N largest pre-activations of a batch of N instead of k per row,
and at inference keeps those above a threshold learned as it trains (a running mean of the smallest kept one).

Activations are taken at a Site of a model of ours (`block2`: the residual stream after block 2; `mlp2`: block
2's MLP output), from random windows of a prepared data directory, one batch at a time: nothing is dumped to
disk. The first position of each window is left out of training and of splicing: it attends only to itself and
in GPT-2 carries an outlier of huge norm (the attention sink) that would dominate the variance.

The SAE file is a checkpoint (nanoforge.checkpoint: atomic, checksummed safetensors) whose info says what made it
(site, k, latents, data, tokens, step) and which model it belongs to (a hash of its weights), so an SAE is never
applied to another model.
"""

import hashlib
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanoforge import checkpoint
from nanoforge.errors import UserError

AUXK_ALPHA = 1 / 32  # OpenAI's weight of the AuxK loss
BETA_THRESHOLD = 0.999  # BatchTopK: the running mean's memory for the inference threshold


class FeatureError(UserError):
    """A site, setting or SAE file that does not fit the model or the data."""


# ---------------------------------------------------------------------------------------------
# Where activations come from

@dataclass(frozen=True)
class Site:
    """A place in the forward pass: "block" (the residual stream after block `layer`) or "mlp" (its MLP's output)."""

    kind: str
    layer: int

    def __str__(self):
        return f"{self.kind}{self.layer}"

    def module(self, model):
        block = model.transformer.h[self.layer]
        return block if self.kind == "block" else block.mlp


def parse_site(text, n_layer):
    match = re.fullmatch(r"(block|mlp)(\d+)", text.strip())
    if not match:
        raise FeatureError(f"--site '{text}' is not a site: write blockL (the residual stream after block L) or "
                           f"mlpL (block L's MLP output), e.g. block{n_layer // 2}")
    site = Site(match.group(1), int(match.group(2)))
    if site.layer >= n_layer:
        raise FeatureError(f"--site {site}: this model has blocks 0..{n_layer - 1}; use a layer in that range")
    return site


@contextmanager
def hooked(module, hook):
    """module's forward hook(module, inputs, output) registered for the with block only."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def site_activations(model, idx, site):
    """Token ids (B, T) -> the site's activations (B, T, n_embd), running only the blocks up to the site's."""
    captured = []
    with hooked(site.module(model), lambda module, inputs, output: captured.append(output)):
        x = model.embed(idx)
        for block in model.transformer.h[: site.layer + 1]:
            x = block(x)
    return captured[0]


def replaced(model, site, replace):
    """A context in which the site's output (B, T, n_embd) becomes replace(output) from position 1 on
    (position 0 stays as it was: see the top)."""
    def hook(module, inputs, output):
        return torch.cat([output[:, :1], replace(output[:, 1:]).to(output.dtype)], dim=1)
    return hooked(site.module(model), hook)


def model_identity(model):
    """A short hash of the model's weights: an SAE file records the one it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def training_activations(model, dataset, site, contexts, generator, split="train"):
    """One batch of activations from `contexts` random windows: (contexts x (block_size - 1), n_embd) float32."""
    device = next(model.parameters()).device
    x, _ = dataset.get_batch(split, contexts, generator)
    acts = site_activations(model, x.to(device), site)[:, 1:]  # (B, T - 1, n_embd): position 0 left out
    return acts.reshape(-1, acts.size(-1)).float()


# ---------------------------------------------------------------------------------------------
# The sparse autoencoder

@dataclass
class SAEConfig:
    n_embd: int
    latents: int
    k: int
    batch_topk: bool = False


def check_config(cfg):
    if not 1 <= cfg.k <= cfg.latents:
        raise FeatureError(f"--k {cfg.k} must be between 1 and the number of latents ({cfg.latents} = expansion x "
                           f"n_embd): lower --k or raise --expansion")


class SAEOutput:
    """One forward pass: the reconstruction (N, n_embd), the sparse latents (N, latents), FVU and AuxK loss."""

    def __init__(self, reconstruction, acts, fvu, auxk):
        self.reconstruction, self.acts, self.fvu, self.auxk = reconstruction, acts, fvu, auxk


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg, generator=None):
        super().__init__()
        self.cfg = cfg
        W_dec = torch.randn(cfg.latents, cfg.n_embd, generator=generator)
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)  # (latents, n_embd), unit rows
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.clone())  # (latents, n_embd): the decoder's transpose, as a map
        self.b_enc = nn.Parameter(torch.zeros(cfg.latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.n_embd))
        # BatchTopK's inference threshold (negative: not learned yet).
        self.register_buffer("threshold", torch.tensor(-1.0))

    def pre_activations(self, x):
        """x (N, n_embd) -> (N, latents), >= 0."""
        return F.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)

    def sparsify(self, pre):
        """Keep the k largest of each row (TopK), or the k x N largest of the batch (BatchTopK; in eval mode, those
        above the learned threshold). (N, latents) -> (N, latents), the rest set to 0."""
        if not self.cfg.batch_topk:
            top = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        if not self.training and self.threshold >= 0:
            return pre * (pre > self.threshold)
        flat = pre.flatten()
        top = flat.topk(min(self.cfg.k * pre.size(0), flat.numel()))
        acts = torch.zeros_like(flat).scatter(-1, top.indices, top.values).view_as(pre)
        if self.training:
            self.update_threshold(top.values)
        return acts

    @torch.no_grad()
    def update_threshold(self, kept):
        smallest = kept[kept > 0].min() if (kept > 0).any() else None
        if smallest is not None:
            old = self.threshold
            self.threshold.copy_(smallest if old < 0 else BETA_THRESHOLD * old + (1 - BETA_THRESHOLD) * smallest)

    def encode(self, x):
        return self.sparsify(self.pre_activations(x))

    def decode(self, acts):
        return acts @ self.W_dec + self.b_dec  # (N, n_embd)

    def forward(self, x, dead=None):
        """x (N, n_embd); dead: a (latents,) bool mask of dead latents for the AuxK loss, or None."""
        pre = self.pre_activations(x)
        acts = self.sparsify(pre)
        reconstruction = self.decode(acts)
        error = x - reconstruction
        variance = (x - x.mean(dim=0)).pow(2).sum()
        fvu = error.pow(2).sum() / variance
        auxk = self.auxk_loss(pre, error, dead, variance) if dead is not None and dead.any() else fvu.new_zeros(())
        return SAEOutput(reconstruction, acts, fvu, auxk)

    def auxk_loss(self, pre, error, dead, variance):
        """How well the top k_aux dead latents reconstruct the error of the live ones (Gao et al. appendix B.1),
        scaled down when fewer than k_aux latents are dead."""
        n_dead = int(dead.sum())
        k_aux = self.cfg.n_embd // 2
        scale = min(n_dead / k_aux, 1.0)
        top = torch.where(dead, pre, -torch.inf).topk(min(k_aux, n_dead), dim=-1)
        aux_acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        predicted = aux_acts @ self.W_dec  # (N, n_embd); the error already accounts for b_dec
        return scale * (predicted - error.detach()).pow(2).sum() / variance

    @torch.no_grad()
    def normalize_decoder(self):
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def remove_parallel_gradient(self):
        """Take out of each row's gradient its component along the (unit) row: a step then turns the row rather
        than stretching it, which the renormalisation would undo anyway."""
        parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)  # (latents, 1)
        self.W_dec.grad -= parallel * self.W_dec


# ---------------------------------------------------------------------------------------------
# Training

def default_lr(latents):
    """sparsify's Adam learning rate: 2e-4 at 2^14 latents, scaled by 1/sqrt(latents) (Gao et al. section 2.4)."""
    return 2e-4 / math.sqrt(latents / 2**14)


def make_optimizer(sae, lr):
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)


def train_step(sae, optimizer, x, dead=None, auxk_alpha=AUXK_ALPHA):
    """One step on a batch of activations x (N, n_embd); returns the SAEOutput of its forward pass."""
    out = sae(x, dead)
    optimizer.zero_grad(set_to_none=True)
    (out.fvu + auxk_alpha * out.auxk).backward()
    sae.remove_parallel_gradient()
    optimizer.step()
    sae.normalize_decoder()
    return out


class FiringTracker:
    """Tokens since each latent last fired; a latent silent for more than dead_after tokens counts as dead."""

    def __init__(self, latents, dead_after):
        self.since = torch.zeros(latents, dtype=torch.long)
        self.dead_after = dead_after

    def update(self, acts):
        self.since += acts.size(0)
        self.since[(acts > 0).any(dim=0).cpu()] = 0

    def dead(self):
        return self.since > self.dead_after


# ---------------------------------------------------------------------------------------------
# Metrics (dictionary_learning's definitions)

def loss_recovered(ce_clean, ce_spliced, ce_zero):
    """How much of the loss the site's zero-ablation costs the SAE's reconstruction gives back: 1 when spliced
    = clean, 0 when it is no better than zeroing the site."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)


def next_token_ce(logits, targets):
    """Mean cross-entropy from position 1 on (position 0 is never spliced). logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits[:, 1:].flatten(0, 1).float(), targets[:, 1:].flatten()).item()


def kl_divergence(clean_logits, other_logits):
    """Mean KL(clean || other) per position from 1 on, in nats."""
    clean = F.log_softmax(clean_logits[:, 1:].float(), dim=-1)
    other = F.log_softmax(other_logits[:, 1:].float(), dim=-1)
    return (clean.exp() * (clean - other)).sum(-1).mean().item()


@dataclass
class Metrics:
    l0: float  # mean active latents per token
    fvu: float  # fraction of variance unexplained
    dead: float  # fraction of latents that never fired on the evaluation tokens
    ce_clean: float
    ce_spliced: float  # the SAE's reconstruction in place of the site's activations
    ce_zero: float  # the site's activations set to zero
    loss_recovered: float
    kl: float  # KL(clean || spliced), nats per token

    def line(self):
        return (f"L0 {self.l0:.1f} | FVU {self.fvu:.4f} | dead {100 * self.dead:.1f}% | loss recovered "
                f"{100 * self.loss_recovered:.1f}% (CE clean {self.ce_clean:.4f}, spliced {self.ce_spliced:.4f}, "
                f"zero {self.ce_zero:.4f}) | KL {self.kl:.4f}")


@torch.no_grad()
def evaluate(model, sae, site, batches):
    """Metrics over batches [(x, y)] of token ids (B, T), on the model's device."""
    was_training = sae.training
    sae.eval()
    fired = torch.zeros(sae.cfg.latents, dtype=torch.bool)
    sums = dict(l0=0.0, fvu=0.0, ce_clean=0.0, ce_spliced=0.0, ce_zero=0.0, kl=0.0)
    for x, y in batches:
        acts = site_activations(model, x, site)[:, 1:].flatten(0, 1).float()
        out = sae(acts)
        fired |= (out.acts > 0).any(dim=0).cpu()
        clean, _ = model(x)
        with replaced(model, site, lambda a: sae(a.flatten(0, 1).float()).reconstruction.view_as(a)):
            spliced, _ = model(x)
        with replaced(model, site, torch.zeros_like):
            zeroed, _ = model(x)
        sums["l0"] += (out.acts > 0).sum(dim=-1).float().mean().item()
        sums["fvu"] += out.fvu.item()
        sums["ce_clean"] += next_token_ce(clean, y)
        sums["ce_spliced"] += next_token_ce(spliced, y)
        sums["ce_zero"] += next_token_ce(zeroed, y)
        sums["kl"] += kl_divergence(clean, spliced)
    sae.train(was_training)
    n = len(batches)
    m = {key: value / n for key, value in sums.items()}
    return Metrics(dead=1 - fired.float().mean().item(), loss_recovered=loss_recovered(
        m["ce_clean"], m["ce_spliced"], m["ce_zero"]), **m)


# ---------------------------------------------------------------------------------------------
# The SAE file

def save(path, sae, info, optimizer=None, tracker=None, generator=None):
    """Write the SAE (and, while training, its optimizer, firing tracker and data generator) atomically."""
    extra = {}
    if tracker is not None:
        extra["since_fired"] = tracker.since
    if generator is not None:
        extra["generator"] = generator.get_state()
    info = {**info, "sae": asdict(sae.cfg)}
    checkpoint.save(path, sae.state_dict(), info, None if optimizer is None else optimizer.state_dict(), extra)


class SAEFile:
    """A loaded SAE file: the SAE (eval mode), its info, and the training state it was saved with."""

    def __init__(self, sae, info, loaded):
        self.sae, self.info, self.loaded = sae, info, loaded
        self.site = Site(info["site"]["kind"], info["site"]["layer"])


def load(path, model=None, identity=None, device="cpu"):
    """An SAE file; given the model (or its identity), one trained on another model is refused."""
    loaded = checkpoint.load(path, objects=())  # its info describes an SAE, checked here
    if not isinstance(loaded.info.get("sae"), dict):
        raise FeatureError(f"'{path}' is a model checkpoint, not an SAE file: train one with "
                           "`python features.py train --ckpt RUN --data DIR`")
    identity = identity or (model_identity(model) if model is not None else None)
    if identity is not None and loaded.info["model_identity"] != identity:
        raise FeatureError(f"'{path}' was trained on another model ({loaded.info['model']}, weights "
                           f"{loaded.info['model_identity']}, not {identity}): train an SAE on this one")
    sae = SparseAutoencoder(SAEConfig(**loaded.info["sae"]))
    sae.load_state_dict(loaded.model_state)
    return SAEFile(sae.to(device).eval(), loaded.info, loaded)


def default_path(ckpt, site):
    """Beside the run: RUN/features_SITE.safetensors (RUN: the run directory, or the checkpoint file's)."""
    run = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    return os.path.join(run, f"features_{site}.safetensors")


# ---------------------------------------------------------------------------------------------
# Using features: which are active at each token, steering along them, ablating them

def parse_steering(specs, latents):
    """['F=SCALE', ...] -> [(feature, scale)] (sample.py --steer)."""
    steering = []
    for spec in specs:
        feature, _, scale = spec.partition("=")
        try:
            steering.append((int(feature), float(scale)))
        except ValueError:
            raise FeatureError(f"--steer '{spec}' is not FEATURE=SCALE, e.g. --steer 12=8") from None
        if not 0 <= steering[-1][0] < latents:
            raise FeatureError(f"--steer {spec}: this SAE has features 0..{latents - 1}")
    return steering


def steer(model, site, sae, steering):
    """Add sum(scale x the feature's decoder direction) to the site's output at every position while the returned
    hook handle lives (handle.remove() ends it). model may be an engine.Generator's decoder: its blocks are the
    model's own modules, so the hook reaches them without the engine knowing."""
    vector = sum(scale * sae.W_dec[f].detach() for f, scale in steering)  # (n_embd,)
    return site.module(model).register_forward_hook(lambda module, inputs, output: output + vector.to(output))


@torch.no_grad()
def token_features(model, sae, site, ids, top=5):
    """At each position of ids (a list), the `top` most active features: [[(feature, activation)]]; position 0,
    which the SAE was not trained on, is computed the same way."""
    device = next(model.parameters()).device
    acts = site_activations(model, torch.tensor([ids], device=device), site)[0].float()  # (T, n_embd)
    best = sae.encode(acts).topk(min(top, sae.cfg.latents), dim=-1)
    return [[(f, round(a, 4)) for f, a in zip(fs, vs) if a > 0]
            for fs, vs in zip(best.indices.tolist(), best.values.tolist())]


@torch.no_grad()
def ablate_feature(model, sae, site, idx, feature):
    """Logits (B, T, V) with one feature's part of the site's activation taken out (activation x its direction,
    the rest of the activation, the SAE's error included, kept as it was)."""
    def remove(acts):
        strength = sae.encode(acts.flatten(0, 1).float())[:, feature].view(*acts.shape[:2], 1)
        return acts - strength * sae.W_dec[feature]
    with hooked(site.module(model), lambda module, inputs, output: remove(output).to(output.dtype)):
        logits, _ = model(idx)
    return logits
