"""
Look inside a model: what it predicts after each token of a prompt, where its attention heads
look, and one forward pass told stage by stage. Nothing is trained or changed.

    python explain.py --ckpt out/quickstart --prompt "def main():" --html explain.html
    python explain.py --ckpt out/quickstart --prompt "x = max(a, b" --patch "x = max[a, b" --answer ")"

By default it prints the prompt's tokens; at each position the --top most likely next tokens,
and the probability and rank of the token that actually comes next; the prompt's loss; and for
every layer and head a line of what each position attends to most. --layer/--head print that
head's T x T attention pattern as a shaded text heatmap. --trace prints one forward pass, stage
by stage (token ids -> embeddings -> each block's norm, Q/K/V, scores, mask, softmax, MLP,
residual adds -> final norm -> logits -> softmax), with each tensor's shape and a few values.
--html writes one self-contained page (opens offline) with every attention pattern, a token
view, the predictions and the logit lens; --png writes one heatmap image per layer.
A prompt longer than --max-tokens or the model's block_size keeps its end.

What each part contributes (docs/causal.md): --ablate removes heads (L.H), attention layers (attnL)
or MLPs (mlpL) and shows the loss and each next-token probability before and after; --importance
ablates each head alone over validation batches of a prepared data directory (a layer x head table;
--png adds importance.png); --attribute splits one logit into the contributions of the embeddings,
each head and each MLP; --patch copies activations of the --prompt run into a run of a corrupted
prompt of the same length and shows how much of the answer's logit each restores. --json prints one
view's numbers as JSON instead of text (the predictions, without a causal view).

With --sae FILE (an SAE of this model, features.py train) it prints the features active at each token (the page
shows them too); --ablate-feature F takes feature F's part out of the SAE's site (its activation times its
direction) and shows each next-token probability before and after (docs/features.md).
"""

import json
import os
import sys

import torch

from nanoforge import causal_views, cli, features, inspect_html, interventions, loading
from nanoforge.config import ConfigError
from nanoforge.device import resolve_device
from nanoforge.inspect_model import explain, fit_prompt, trace

SHADES = ".:-=+*#%@"  # light to dark: weight 0 to 1 (blank: masked, above the diagonal)


def quoted(label, width=0):
    return f"'{label}'".ljust(width)


def print_predictions(e, top_k):
    width = max(len(s) for s in e.labels) + 2
    print(f"\nnext-token predictions (top {top_k}); 'next' is the token that actually follows:")
    for t, label in enumerate(e.labels):
        top = torch.topk(e.probs[t], min(top_k, e.probs.size(-1)))
        guesses = "  ".join(f"{quoted(e.label(i))} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
        if t + 1 < len(e.ids):
            nxt = e.ids[t + 1]
            actual = f"next {quoted(e.labels[t + 1], width)} p {e.probs[t, nxt].item():.3f} rank {e.rank(t, nxt):>5}"
        else:
            actual = " " * (width + 24)  # as wide as the 'next ...' column of the other rows
        print(f"{t:>4} {quoted(label, width)} {actual} | {guesses}")
    loss = e.loss()
    if loss is not None:
        print(f"loss over the prompt: {loss:.4f} (mean over {len(e.ids) - 1} predictions)")


def print_attention_summary(e):
    print("\nattention: for each position, the token it attends to most (query<-key)")
    n_layer, n_head = e.patterns.shape[:2]
    for layer in range(n_layer):
        for head in range(n_head):
            most = e.patterns[layer, head].argmax(dim=-1).tolist()
            pairs = " ".join(f"{quoted(e.labels[q])}<-{quoted(e.labels[k])}" for q, k in enumerate(most))
            print(f"L{layer} H{head}: {pairs}")


def print_heatmap(e, layer, head):
    """The T x T pattern of one head, one character per weight (darker = more attention)."""
    pattern = e.patterns[layer, head]
    width = max(len(s) for s in e.labels) + 3  # quotes and a space
    print(f"\nlayer {layer} head {head}: rows are queries, columns the keys (in order); weights 0..1 shaded '{SHADES}'")
    # Column headers: each key's label written downwards, one character per row.
    depth = min(6, max(len(s) for s in e.labels))
    for r in range(depth):
        print(" " * (width + 6) + "".join(s[r] if r < len(s) else " " for s in e.labels))
    for q, label in enumerate(e.labels):
        cells = "".join(SHADES[min(len(SHADES) - 1, int(w * len(SHADES)))] for w in pattern[q, : q + 1].tolist())
        print(f"{q:>4}  {quoted(label, width)}{cells}")


def format_values(stage):
    """A few values of a stage's output, from the place that shows the most: the last position
    (the first query's row for score tensors, where the mask shows)."""
    value = stage.value
    if value.dim() == 4:  # (B, n_head, T, T or head_dim): head 0
        row = value[0, 0, 0] if stage.scores else value[0, 0, -1]
    elif value.dim() == 3:
        row = value[0, -1]
    elif value.dim() == 2:
        row = value[-1] if value.dtype.is_floating_point else value[0]
    else:
        row = value
    shown = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row[:6].tolist())
    return f"[{shown}{', ...' if row.numel() > 6 else ''}]"


def print_trace(model, ids, device):
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    print("\none forward pass, stage by stage (values: the last position; scores: head 0's first query row)")
    block = None
    for s in trace(model, idx):
        if s.block != block and s.block is not None:
            print(f"block {s.block}:")
        block = s.block
        indent = "    " if s.block is not None else "  "
        print(f"{indent}{s.name:<52} {str(tuple(s.value.shape)):<20} {format_values(s)}")


def write_pngs(e, directory):
    """One image per layer: its heads' patterns side by side, with token labels."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("--png needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    n_layer, n_head, T, _ = e.patterns.shape
    step = max(1, T // 48)  # at most ~48 labelled ticks per axis
    ticks = list(range(0, T, step))
    labels = [e.labels[i][:12].replace(" ", "\u2423") for i in ticks]  # spaces made visible, as in the page
    size = min(6, 2 + T / 12)
    paths = []
    for layer in range(n_layer):
        fig, axes = plt.subplots(1, n_head, figsize=(size * n_head, size + 0.5), squeeze=False)
        for head, ax in enumerate(axes[0]):
            ax.imshow(e.patterns[layer, head].numpy(), cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}")
            ax.set_xticks(ticks, labels, rotation=90, fontsize=7, fontfamily="monospace")
            ax.set_yticks(ticks, labels if head == 0 else [], fontsize=7, fontfamily="monospace")
        fig.tight_layout()
        path = os.path.join(directory, f"layer_{layer}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def check_args(args):
    """What can be checked before the model loads (GPT-2 takes a while)."""
    if args.max_tokens < 1 or args.top < 1:
        raise ConfigError("--max-tokens and --top must be at least 1")
    if (args.layer is None) != (args.head is None):
        raise ConfigError("--layer and --head go together: give both, e.g. --layer 0 --head 0")
    if args.ablate_feature is not None and not args.sae:
        raise ConfigError("--ablate-feature needs --sae FILE: the SAE the feature belongs to")
    if args.prompt is None and (args.importance is None or any(
            getattr(args, v) is not None for v in ("ablate", "attribute", "patch", "layer", "html", "sae")) or args.trace):
        raise ConfigError("--prompt is required (only --importance DATA_DIR runs without one): give the text to "
                          "look at, e.g. --prompt 'def main():'")
    if args.prompt == "":
        raise ConfigError("--prompt is empty: give the text to look at, e.g. --prompt 'def main():'")
    causal_views.check_args(args)


def check_layer_and_head(args, n_layer, n_head):
    if args.layer is not None and not (0 <= args.layer < n_layer and 0 <= args.head < n_head):
        raise ConfigError(f"this model has layers 0..{n_layer - 1} and heads 0..{n_head - 1}; "
                          f"got --layer {args.layer} --head {args.head}")


@cli.command
def main(argv=None):
    parser = cli.parser(__doc__)
    cli.add_model_arguments(parser)
    parser.add_argument("--prompt", help="the text to look at (--importance alone needs none)")
    parser.add_argument("--top", type=int, default=5, metavar="N", help="predictions shown per position")
    parser.add_argument("--layer", type=int, help="with --head: print this layer's pattern as a text heatmap")
    parser.add_argument("--head", type=int, help="with --layer: the head whose pattern to print")
    parser.add_argument("--trace", action="store_true", help="print one forward pass stage by stage")
    parser.add_argument("--html", metavar="FILE", help="write a self-contained HTML page")
    parser.add_argument("--png", metavar="DIR", help="write a heatmap image per layer (needs matplotlib)")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N",
                        help="look at the last N tokens of the prompt at most")
    cli.add_device_arguments(parser, dtype=False)
    causal_views.add_arguments(parser)
    parser.add_argument("--sae", metavar="FILE", help="an SAE of this model (features.py train): show the features "
                        "active at each token")
    parser.add_argument("--ablate-feature", type=int, metavar="F", help="with --sae: take feature F out of its site "
                        "and show each next-token probability before and after")
    args = parser.parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    model, tokenizer = loading.load_model_from_args(args, device)
    cfg = model.config
    check_layer_and_head(args, cfg.n_layer, cfg.n_head)
    if args.prompt is None:  # --importance alone: scored over the data, no prompt to look at
        view = causal_views.run_importance(args, model, tokenizer, causal_views.reference_means(args, model, tokenizer))
        if args.json:
            print(json.dumps(view))
        return
    ids, dropped = fit_prompt(tokenizer.encode(args.prompt), args.max_tokens, cfg.block_size)
    if dropped:
        print(f"the prompt is {len(ids) + dropped} tokens: kept its last {len(ids)} (--max-tokens "
              f"{args.max_tokens}, block_size {cfg.block_size})", file=sys.stderr)
    e = explain(model, tokenizer, ids)
    if args.json:
        views = causal_views.run(args, model, tokenizer, ids, e)
        print(json.dumps(next(iter(views.values())) if views else inspect_html.predictions_json(e, args.top)))
        return
    show(args, model, tokenizer, ids, e, device)


def show(args, model, tokenizer, ids, e, device):
    """The terminal views, then the page and the images that args ask for."""
    print(f"{len(ids)} tokens ({tokenizer.kind} tokenizer): " + " ".join(quoted(s) for s in e.labels))
    print_predictions(e, args.top)
    print_attention_summary(e)
    if args.layer is not None:
        print_heatmap(e, args.layer, args.head)
    if args.trace:
        print_trace(model, ids, device)
    views = causal_views.run(args, model, tokenizer, ids, e)
    if args.sae:
        views["features"] = feature_view(args, model, ids, e)
    if args.html:
        page = inspect_html.render(e, f"explain.py: {args.ckpt or args.init_from}", args.top, views)
        with open(args.html + ".tmp", "w", encoding="utf-8") as f:
            f.write(page)
        os.replace(args.html + ".tmp", args.html)  # never a half-written page
        print(f"wrote {args.html} ({len(page.encode()) / 1e6:.2f} MB)")
    if args.png:
        paths = write_pngs(e, args.png)
        print(f"wrote {len(paths)} images to {args.png}")


def feature_view(args, model, ids, e):
    """The features active at each token (printed), and with --ablate-feature the ablation; the page's JSON."""
    saved = features.load(args.sae, model=model, device=next(model.parameters()).device)
    active = features.token_features(model, saved.sae, saved.site, ids)
    width = max(len(s) for s in e.labels) + 2
    print(f"\nSAE features of {saved.site} active at each token (the strongest first; activation):")
    for t, (label, row) in enumerate(zip(e.labels, active)):
        print(f"{t:>4} {quoted(label, width)} " + "  ".join(f"F{f} {a:.2f}" for f, a in row))
    view = {"site": str(saved.site), "sae": args.sae, "tokens": active}
    if args.ablate_feature is not None:
        view["ablated"] = ablate_feature(args.ablate_feature, saved, model, ids, e)
    return view


def ablate_feature(feature, saved, model, ids, e):
    if not 0 <= feature < saved.sae.cfg.latents:
        raise ConfigError(f"--ablate-feature {feature}: this SAE has features 0..{saved.sae.cfg.latents - 1}")
    if len(ids) < 2:
        raise ConfigError("--ablate-feature needs a prompt of at least 2 tokens (it scores each next token)")
    idx = torch.tensor([ids], device=next(model.parameters()).device)
    logits = features.ablate_feature(model, saved.sae, saved.site, idx, feature)
    p_after = torch.softmax(logits[0, :-1].float(), dim=-1).gather(1, idx[0, 1:, None])[:, 0].tolist()
    p_before = [e.probs[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    result = interventions.Ablation([f"F{feature}"], "feature", e.loss(), interventions.next_token_loss(logits, idx),
                                    p_before, p_after)
    print(f"\nfeature {feature} ablated at {saved.site}: loss over the prompt {result.loss:.4f} -> "
          f"{result.ablated_loss:.4f}")
    for t, (p, q) in enumerate(zip(p_before, p_after)):
        print(f"{t:>4} {quoted(e.labels[t])} -> {quoted(e.labels[t + 1])}  p {p:.3f} -> {q:.3f}")
    top = logits[0, -1].float().softmax(-1).topk(3)
    print("after the last token it now predicts: " + "  ".join(
        f"{quoted(e.label(i))} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))
    json = result.to_json(e.labels)
    json["feature"] = feature
    return json


if __name__ == "__main__":
    main()
