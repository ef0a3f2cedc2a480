"""
What each SAE feature does, surveyed on a data set: how often it fires (density), the contexts where it fires most,
the distribution of its activations, and the tokens its decoder direction promotes and suppresses through the
un-embedding (what writing it into the residual stream does to the logits directly, through the final norm's gain;
for a site before the last block, later blocks can change that). features.py's show and page read a Survey.
"""

from dataclasses import dataclass

import torch

from nanoforge.features import site_activations
from nanoforge.inspect_model import token_label

CONTEXTS = 8  # top-activating contexts kept per feature
BEFORE, AFTER = 24, 4  # tokens of context shown around the activating one
BINS = 16  # histogram bins, 0 .. the feature's largest activation
LOGIT_TOKENS = 8  # promoted and suppressed tokens shown


@dataclass
class Survey:
    windows: torch.Tensor  # (W, T) token ids surveyed; position 0 of each is left out, as in training
    values: torch.Tensor  # (N, k) active latents' activations per surveyed token, N = W x (T - 1)
    indices: torch.Tensor  # (N, k) which latents (activation 0 where fewer than k fired)
    density: torch.Tensor  # (latents,) fraction of tokens on which each fires
    top: list  # per feature: [(activation, token index n)] best first, at most CONTEXTS
    histogram: torch.Tensor  # (latents, BINS) counts over 0 .. peak
    peak: torch.Tensor  # (latents,) largest activation
    promoted: torch.Tensor  # (latents, LOGIT_TOKENS) token ids with the largest direct logit effect
    suppressed: torch.Tensor  # (latents, LOGIT_TOKENS) the most negative
    labels: list  # token id -> label
    n_tokens: int

    def dead_count(self):
        return int((self.density == 0).sum())

    def by_density(self):
        return [f for f in self.density.argsort(descending=True).tolist() if self.density[f] > 0]

    def context(self, n, feature):
        """Token n's window around it: [(label, this feature's activation)], and the activating one's index."""
        T = self.windows.size(1) - 1
        w, p = divmod(n, T)
        start, end = max(0, p - BEFORE), min(T, p + AFTER + 1)
        acts = torch.where(self.indices[w * T + start : w * T + end] == feature,
                           self.values[w * T + start : w * T + end], 0).sum(dim=1)
        ids = self.windows[w, 1 + start : 1 + end].tolist()
        return [(self.labels[i], a) for i, a in zip(ids, acts.tolist())], p - start


@torch.no_grad()
def survey(model, sae, site, dataset, n_tokens, tokenizer, batch=16):
    """Run consecutive val windows (about n_tokens tokens) through the model and the SAE."""
    T = dataset.block_size
    tokens = dataset.splits["val"]
    count = max(1, min(n_tokens // (T - 1), (len(tokens) - 1) // T))
    windows = torch.from_numpy(tokens[: count * T].astype("int64")).view(count, T)  # (W, T)
    device = next(model.parameters()).device
    values, indices = [], []
    for i in range(0, count, batch):
        acts = site_activations(model, windows[i : i + batch].to(device), site)[:, 1:].flatten(0, 1).float()
        latents = sae.encode(acts)  # (n, latents)
        top = latents.topk(sae.cfg.k, dim=-1)  # BatchTopK's eval threshold may keep more or fewer than k
        values.append(top.values.cpu())
        indices.append(top.indices.cpu())
    values, indices = torch.cat(values), torch.cat(indices)  # (N, k)
    return summarise(sae, model, windows, values, indices, [token_label(tokenizer, i) for i in range(
        tokenizer.vocab_size)])


def summarise(sae, model, windows, values, indices, labels):
    latents = sae.cfg.latents
    N = values.size(0)
    fired = values > 0
    flat_idx, flat_val = indices[fired], values[fired]
    token_of = torch.arange(N).unsqueeze(1).expand_as(values)[fired]
    density = torch.bincount(flat_idx, minlength=latents).float() / N
    peak = torch.zeros(latents).scatter_reduce(0, flat_idx, flat_val, "amax")
    bins = (flat_val / peak[flat_idx].clamp_min(1e-9) * BINS).long().clamp(max=BINS - 1)
    histogram = torch.bincount(flat_idx * BINS + bins, minlength=latents * BINS).view(latents, BINS)
    order = torch.argsort(flat_val, descending=True, stable=True)
    order = order[torch.argsort(flat_idx[order], stable=True)]  # by feature, each largest first
    starts = torch.searchsorted(flat_idx[order], torch.arange(latents))
    ends = torch.searchsorted(flat_idx[order], torch.arange(latents), right=True)
    top = [[(flat_val[j].item(), token_of[j].item()) for j in order[s : min(e, s + CONTEXTS)].tolist()]
           for s, e in zip(starts.tolist(), ends.tolist())]
    effect = logit_effects(model, sae)
    return Survey(windows, values, indices, density, top, histogram, peak,
                  effect.topk(LOGIT_TOKENS, dim=1).indices, (-effect).topk(LOGIT_TOKENS, dim=1).indices, labels, N)


def logit_effects(model, sae):
    """(latents, vocab): each feature's decoder direction through the final norm's gain and the un-embedding."""
    gain = model.transformer.ln_f.weight.detach().float()
    return (sae.W_dec.detach().float() * gain) @ model.lm_head.weight.detach().float().T


def quoted(label):
    return "'" + label + "'"


def summary_line(survey, f):
    peak = max(survey.top[f], default=(0, 0))[0]
    fires = " ".join(quoted(survey.context(n, f)[0][survey.context(n, f)[1]][0]) for _, n in survey.top[f][:5])
    promotes = " ".join(quoted(survey.labels[i]) for i in survey.promoted[f][:5].tolist())
    return (f"F{f:<5} density {100 * survey.density[f]:6.2f}%  peak {peak:6.2f}  fires on {fires}  "
            f"| promotes {promotes}")


def describe(survey, f):
    """One feature in full, for the terminal."""
    lines = [f"feature {f}: active on {100 * survey.density[f]:.2f}% of {survey.n_tokens:,} tokens, "
             f"largest activation {survey.peak[f]:.3f}"]
    lines.append("top-activating contexts (the token in [brackets]; activation):")
    for value, n in survey.top[f]:
        tokens, at = survey.context(n, f)
        text = "".join(f"[{label}]" if i == at else label for i, (label, _) in enumerate(tokens))
        lines.append(f"  {value:7.3f}  {text}")
    lines.append("activations (histogram, 0 .. largest):")
    counts = survey.histogram[f].tolist()
    for b, c in enumerate(counts):
        edge = survey.peak[f].item() * b / len(counts)
        lines.append(f"  {edge:7.3f} {'#' * round(40 * c / max(max(counts), 1))} {c}")
    lines.append("promotes: " + " ".join(quoted(survey.labels[i]) for i in survey.promoted[f].tolist()))
    lines.append("suppresses: " + " ".join(quoted(survey.labels[i]) for i in survey.suppressed[f].tolist()))
    return "\n".join(lines)


def page_data(survey, saved):
    """The page's JSON: the live features by density, each with its contexts, histogram and logit tokens."""
    rows = []
    for f in survey.by_density():
        contexts = []
        for value, n in survey.top[f]:
            tokens, at = survey.context(n, f)
            contexts.append({"tokens": [label for label, _ in tokens],
                             "acts": [round(a, 3) for _, a in tokens], "at": at, "value": round(value, 3)})
        rows.append({"id": f, "density": round(survey.density[f].item(), 6), "peak": round(survey.peak[f].item(), 3),
                     "histogram": survey.histogram[f].tolist(), "contexts": contexts,
                     "promoted": [survey.labels[i] for i in survey.promoted[f].tolist()],
                     "suppressed": [survey.labels[i] for i in survey.suppressed[f].tolist()]})
    info = saved.info
    return {"site": str(saved.site), "latents": saved.sae.cfg.latents, "k": saved.sae.cfg.k,
            "tokens": info["tokens"], "step": info["step"], "surveyed": survey.n_tokens,
            "dead": survey.dead_count(), "features": rows}
