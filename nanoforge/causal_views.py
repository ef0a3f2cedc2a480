"""
explain.py's causal views (nanoforge.interventions): their flags, running the ones asked for, and showing them
to a reader in the terminal and the importance heatmap as a PNG. The --json output and the HTML page use each
result's to_json(), so the three agree.
"""

import os

import torch

from nanoforge import interventions
from nanoforge.config import ConfigError
from nanoforge.inspect_model import fit_prompt
from nanoforge.interventions import InterventionError

BATCHES = 8  # --importance's default batch count (of interventions.importance_batches' 8 sequences)


def add_arguments(parser):
    parser.add_argument("--ablate", metavar="SPEC", help="remove parts: heads L.H, attnL, mlpL, comma-separated")
    parser.add_argument("--ablation", choices=("zero", "mean"),
                        help="set the parts' output to zero (default) or to its mean at each position over a reference set")
    parser.add_argument("--data", metavar="DIR", help="with --ablation mean: the reference set, a prepared data "
                        "directory's validation split (default: the --importance directory)")
    parser.add_argument("--importance", metavar="DATA_DIR", help="each head's loss increase over validation batches")
    parser.add_argument("--batches", type=int, metavar="N", help="with --importance: batches of 8 sequences (default 8)")
    parser.add_argument("--attribute", metavar="TOKEN", nargs="?", const="",
                        help="direct logit attribution of TOKEN (default: the actual next token, or the top prediction)")
    parser.add_argument("--position", type=int, metavar="P", help="with --attribute: the position (default -1, the last)")
    parser.add_argument("--patch", metavar="CORRUPTED_PROMPT", help="activation patching from --prompt into this prompt")
    parser.add_argument("--answer", metavar="TOKEN", help="with --patch: the token whose logit is restored "
                        "(default: the top prediction after --prompt)")
    parser.add_argument("--json", action="store_true", help="print one view's numbers as JSON")


CAUSAL_VIEWS = ("ablate", "importance", "attribute", "patch")


def check_args(args):
    """What can be checked before the model loads."""
    views = [v for v in CAUSAL_VIEWS if getattr(args, v) is not None]
    if args.json and (args.html or args.png):
        raise InterventionError("--json prints only JSON: leave out --html and --png (or run explain.py twice)")
    if args.json and len(views) > 1:
        raise InterventionError("--json prints one view at a time: give only one of --ablate, --importance, --attribute, --patch")
    if args.ablation == "mean" and args.data is None and args.importance is None:
        raise InterventionError("--ablation mean replaces a part's output by its mean over a reference set: give "
                                "--data DIR, a prepared data directory (the model's training data, say)")
    if args.data is not None and args.ablation != "mean":
        raise InterventionError("--data goes with --ablation mean (it names the reference set of the means)")
    for flag, needs in (("ablation", ("ablate", "importance")), ("batches", ("importance",)),
                        ("position", ("attribute",)), ("answer", ("patch",))):
        if getattr(args, flag) is not None and not any(getattr(args, v) is not None for v in needs):
            raise InterventionError(f"--{flag} goes with --{' or --'.join(needs)}")
    if args.ablate is not None:
        interventions.parse_parts(args.ablate)
    if args.batches is not None and args.batches < 1:
        raise InterventionError("--batches must be at least 1")


def run(args, model, tokenizer, ids, e):
    """The causal views asked for: {view: its JSON}, each printed too unless --json."""
    device = next(model.parameters()).device
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    views = {}
    means = reference_means(args, model, tokenizer)
    if args.ablate is not None:
        views["ablate"] = run_ablation(args, model, idx, e, means)
    if args.importance is not None:
        views["importance"] = run_importance(args, model, tokenizer, means)
    if args.attribute is not None:
        views["attribute"] = run_attribution(args, model, tokenizer, idx, e)
    if args.patch is not None:
        views["patch"] = run_patching(args, model, tokenizer, idx, e)
    return views


def reference_means(args, model, tokenizer):
    """For --ablation mean: the mean activation of every part --ablate or --importance may remove, at each
    position, over the reference set (--data, else the --importance directory); None otherwise."""
    if args.ablation != "mean":
        return None
    cfg = model.config
    parts = interventions.all_heads(cfg) + [interventions.Part(kind, layer) for kind in ("attn", "mlp")
                                            for layer in range(cfg.n_layer)]
    windows = interventions.reference_windows(args.data or args.importance, tokenizer, cfg.block_size)
    return interventions.mean_activations(model, windows, parts)


def run_ablation(args, model, idx, e, means):
    if idx.size(1) < 2:
        raise InterventionError("--ablate needs a prompt of at least 2 tokens (it scores each next token)")
    parts = interventions.parse_parts(args.ablate)
    interventions.check_parts(parts, model.config)
    result = interventions.ablate(model, idx, parts, args.ablation or "zero", means)
    if not args.json:
        print_ablation(result, e.labels)
    return result.to_json(e.labels)


def run_importance(args, model, tokenizer, means):
    device, mode = next(model.parameters()).device, args.ablation or "zero"
    batches = [(x.to(device), y.to(device)) for x, y in interventions.importance_batches(
        args.importance, tokenizer, model.config.block_size, args.batches or BATCHES)]
    base, increase = interventions.head_importance(model, batches, mode, means)
    if not args.json:
        print_importance(base, increase, len(batches), mode)
    if args.png:
        print(f"wrote {write_importance_png(increase, mode, os.path.join(args.png, 'importance.png'))}")
    return {"loss": base, "ablation": mode, "batches": len(batches), "increase": increase.tolist()}


def run_attribution(args, model, tokenizer, idx, e):
    """The token defaults to the one that actually comes next, or after the prompt's end to the top prediction."""
    ids = e.ids
    t = interventions.position_in(-1 if args.position is None else args.position, len(ids))
    token = (interventions.one_token(tokenizer, args.attribute, "--attribute") if args.attribute
             else ids[t + 1] if t + 1 < len(ids) else int(e.probs[t].argmax()))
    result = interventions.attribute(model, idx, t, token)
    if not args.json:
        print_attribution(result, e.label(token))
    return result.to_json(e.label(token))


def run_patching(args, model, tokenizer, idx, e):
    corrupted, _ = fit_prompt(tokenizer.encode(args.patch), args.max_tokens, model.config.block_size)
    if len(corrupted) != len(e.ids):
        raise InterventionError(f"--patch's prompt is {len(corrupted)} tokens and --prompt {len(e.ids)}: patching "
                                "needs two prompts of the same length in tokens")
    answer = (interventions.one_token(tokenizer, args.answer, "--answer") if args.answer
              else int(e.probs[-1].argmax()))
    result = interventions.patch(model, idx, torch.tensor([corrupted], device=idx.device), answer)
    labels = [e.label(i) for i in corrupted]
    if not args.json:
        print_patching(result, e.label(answer), e.labels, labels)
    return result.to_json(e.label(answer), e.labels, labels)


# ----------------------------------------------------------------------------- showing them

BAR = 30  # characters of the widest bar


def quoted(label):
    return f"'{label}'"


def print_ablation(result, labels):
    parts = ", ".join(map(str, result.parts))
    print(f"\nablation ({result.mode}) of {parts}: probability of the actual next token, before -> after")
    for t, (p, q) in enumerate(zip(result.p, result.ablated_p)):
        change = "" if abs(q - p) < 5e-4 else f"  {'+' if q > p else '-'}{abs(q - p):.3f}"
        print(f"{t:>4} {quoted(labels[t]):<12} next {quoted(labels[t + 1]):<12} {p:.3f} -> {q:.3f}{change}")
    print(f"loss over the prompt: {result.loss:.4f} -> {result.ablated_loss:.4f} "
          f"({result.ablated_loss - result.loss:+.4f})")


def print_importance(base_loss, increase, batches, mode):
    n_layer, n_head = increase.shape
    print(f"\nhead importance: rise in validation loss when one head is {mode}-ablated "
          f"(over {batches} batches; the model's own loss {base_loss:.4f})")
    print("        " + "".join(f"{'head ' + str(h):>10}" for h in range(n_head)))
    for layer in range(n_layer):
        print(f"layer {layer:<2}" + "".join(f"{v:>+10.4f}" for v in increase[layer].tolist()))
    layer, head = divmod(int(increase.argmax()), n_head)
    print(f"the head that matters most: {layer}.{head} (+{increase.max().item():.4f})")


def print_attribution(result, label, shown=12):
    print(f"\ndirect logit attribution of {quoted(label)} at position {result.position}: logit {result.logit:.4f}")
    print(f"  (final norm's scale frozen at 1/sigma = {result.norm_scale:.4g} from the real forward pass"
          + (f"; soft cap frozen at x{result.cap_scale:.4g}" if result.cap_scale != 1.0 else "")
          + "; the parts sum to the logit)")
    ranked = sorted(result.parts, key=lambda part: -abs(part[1]))
    widest = max(abs(v) for _, v in ranked) or 1.0
    for name, value in ranked[:shown]:
        bar = "#" * max(1, round(BAR * abs(value) / widest))
        print(f"  {name:<14} {value:>+10.4f} {'+' if value >= 0 else '-'}{bar}")
    if len(ranked) > shown:
        rest = sum(v for _, v in ranked[shown:])
        print(f"  {len(ranked) - shown} smaller parts together {rest:+.4f}")


def print_patching(result, label, labels, corrupted_labels):
    print(f"\nactivation patching of the logit of {quoted(label)} at the last position: clean "
          f"{result.clean_logit:.4f}, corrupted {result.corrupted_logit:.4f}")
    print("percent of the difference restored by the clean residual stream at (layer, position):")
    width = max(6, *(len(s) + 3 for s in labels))
    changed = ["*" if a != b else " " for a, b in zip(labels, corrupted_labels)]
    print(" " * 15 + "".join(f"{quoted(s) + c:>{width}}" for s, c in zip(labels, changed)) + "   (* differs)")
    names = ["embeddings"] + [f"after block {i}" for i in range(len(result.streams) - 1)]
    for name, row in zip(names, result.streams.tolist()):
        print(f"{name:<15}" + "".join(f"{100 * v:>{width}.0f}" for v in row))
    n_head = result.heads.size(1)
    print("percent restored by one head's clean output (every position):")
    print("        " + "".join(f"{'head ' + str(h):>9}" for h in range(n_head)))
    for layer, row in enumerate(result.heads.tolist()):
        print(f"layer {layer:<2}" + "".join(f"{100 * v:>9.0f}" for v in row))


def write_importance_png(increase, mode, path):
    """The layer x head table of loss increases as a heatmap, each cell labelled with its value."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ConfigError("--png needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layer, n_head = increase.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * n_head, 1.0 + 0.6 * n_layer))
    image = ax.imshow(increase.numpy(), cmap="Reds", vmin=min(0.0, increase.min().item()))
    dark = 0.6 * increase.max().item()  # cells this red get white text
    for layer in range(n_layer):
        for head in range(n_head):
            value = increase[layer, head].item()
            ax.text(head, layer, f"{value:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if value > dark else "black")
    ax.set_xticks(range(n_head), [str(h) for h in range(n_head)])
    ax.set_yticks(range(n_layer), [str(layer) for layer in range(n_layer)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"loss increase when one head is {mode}-ablated", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
