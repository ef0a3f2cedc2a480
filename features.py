"""
What did the model learn? Sparse-autoencoder features of one site of a model: train them, measure them, look at
them (docs/features.md).

    python features.py train --ckpt out/quickstart --data data/pystdlib --site block2 --steps 200 --lr 2e-3
    python features.py show --ckpt out/quickstart --sae out/quickstart/features_block2.safetensors --data data/pystdlib
    python features.py page --ckpt out/quickstart --sae out/quickstart/features_block2.safetensors --data data/pystdlib
    python features.py embedding --ckpt out/quickstart --token "(" --out embedding.html

train: a TopK sparse autoencoder (--batch-topk: BatchTopK) with expansion x n_embd latents, k active, on the
activations at --site (blockL: the residual stream after block L; mlpL: block L's MLP output) of random windows of
--data's train split, streamed through the model batch by batch. Every --eval-every steps it prints and logs (to
FILE.log.jsonl beside the SAE) L0, the fraction of variance unexplained, the fraction of dead latents, the loss
recovered with the SAE spliced in and the KL to the clean model, on --data's val split; at the end it plots them
(FILE.png, with matplotlib). The SAE is saved to --out (default RUN/features_SITE.safetensors) every --save-every
steps and at the end; --resume continues a saved one to --steps.

show: the features in the terminal, most often active first; --feature F shows one: its top-activating contexts
(the token in [brackets], its activation), a histogram of its activations, and the tokens its decoder direction
promotes and suppresses through the un-embedding. page: the same for every feature as one offline HTML page,
with a search box (by token or text), and the embedding space. embedding: a token's nearest neighbours by cosine
in the embedding and un-embedding matrices, and a 2-D PCA map of the vocabulary.
"""

import json
import os
import sys
import time

import torch

from nanoforge import cli, embedding_space, feature_survey, features, features_html, loading, plotting
from nanoforge.data import Dataset
from nanoforge.device import resolve_device
from nanoforge.features import FeatureError, SAEConfig, SparseAutoencoder


def arguments():
    parser = cli.parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,show,page,embedding}")
    train = commands.add_parser("train", help="train an SAE on one site")
    show = commands.add_parser("show", help="the features in the terminal")
    page = commands.add_parser("page", help="the features as one offline HTML page")
    embedding = commands.add_parser("embedding", help="nearest tokens and a 2-D map of the embeddings")
    for sub in (train, show, page, embedding):
        cli.add_model_arguments(sub)
        cli.add_device_arguments(sub, dtype=False)
    for sub in (train, show, page):
        sub.add_argument("--data", required=True, metavar="DIR", help="a prepared data directory (the model's "
                         "tokenizer)")
    train.add_argument("--site", required=True, help="blockL (residual stream after block L) or mlpL (its MLP)")
    train.add_argument("--expansion", type=int, default=8, help="latents = expansion x n_embd (default 8)")
    train.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    train.add_argument("--batch-topk", action="store_true", help="BatchTopK: k x N active over a batch of N")
    train.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    train.add_argument("--contexts", type=int, default=32, metavar="B", help="windows per step (default 32)")
    train.add_argument("--lr", type=float, help="Adam's learning rate (default 2e-4 x sqrt(2^14 / latents))")
    train.add_argument("--dead-after", type=int, default=200_000, metavar="TOKENS",
                       help="a latent silent for this many tokens is dead: AuxK trains it (default 200000)")
    train.add_argument("--eval-every", type=int, default=500, metavar="STEPS")
    train.add_argument("--eval-batches", type=int, default=8, metavar="N", help="val batches per evaluation")
    train.add_argument("--save-every", type=int, default=500, metavar="STEPS")
    train.add_argument("--seed", type=int, default=1337)
    train.add_argument("--out", metavar="FILE", help="the SAE file (default RUN/features_SITE.safetensors)")
    train.add_argument("--resume", action="store_true", help="continue the SAE saved at --out")
    for sub in (show, page):
        sub.add_argument("--sae", required=True, metavar="FILE", help="an SAE file of features.py train")
        sub.add_argument("--tokens", type=int, default=65536, help="val tokens to survey (default 65536)")
    show.add_argument("--feature", type=int, metavar="F", help="show this feature in full")
    show.add_argument("--top", type=int, default=30, metavar="N", help="features listed (default 30)")
    page.add_argument("--out", metavar="FILE", help="the page (default: the SAE file's name, .html)")
    embedding.add_argument("--token", action="append", default=[], metavar="TEXT",
                           help="a token whose neighbours to show (repeatable; its text must be one token)")
    embedding.add_argument("--neighbours", type=int, default=10, metavar="N")
    embedding.add_argument("--out", metavar="FILE", help="also write the map and neighbours as an HTML page")
    return parser


def open_data(data_dir, tokenizer, block_size, source):
    dataset = Dataset(data_dir, block_size)
    if dataset.tokenizer.to_dict() != tokenizer.to_dict():
        raise FeatureError(
            f"'{data_dir}' is tokenized with another tokenizer ({dataset.tokenizer.kind}, {dataset.tokenizer.vocab_size} "
            f"tokens) than the model's ({tokenizer.kind}, {tokenizer.vocab_size}): prepare it with `python prepare.py "
            f"SOURCE --tokenizer-from {source}`")
    return dataset


def val_batches(dataset, n, contexts, device, seed=0):
    """The same n val batches every evaluation, so the figures are comparable from one to the next."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(t.to(device) for t in dataset.get_batch("val", contexts, g)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# train

class Log:
    """FILE.log.jsonl beside the SAE: one JSON record per line, read back for the plot."""

    def __init__(self, sae_path, resume):
        self.path = os.path.splitext(sae_path)[0] + ".log.jsonl"
        if not resume and os.path.exists(self.path):
            os.remove(self.path)

    def write(self, record):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def records(self):
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def start_or_resume(args, model, cfg, identity, dataset, site, generator, device):
    """A new SAE (b_dec at the mean of a first batch) and optimizer, or those saved at args.out."""
    if args.resume:
        saved = features.load(args.out, identity=identity)
        if saved.info["sae"] != {**vars(cfg)} or saved.site != site:
            raise FeatureError(f"--resume: '{args.out}' holds an SAE of {saved.site} with {saved.info['sae']}, not "
                               f"{site} with {vars(cfg)}: give its settings, or another --out")
        sae = saved.sae.to(device).train()
        optimizer = features.make_optimizer(sae, args.lr or features.default_lr(cfg.latents))
        optimizer.load_state_dict(saved.loaded.optimizer_state)
        tracker = features.FiringTracker(cfg.latents, args.dead_after)
        tracker.since = saved.loaded.extra["since_fired"].clone()
        generator.set_state(saved.loaded.extra["generator"])
        return sae, optimizer, tracker, saved.info["step"], saved.info["tokens"]
    if os.path.exists(args.out):
        raise FeatureError(f"'{args.out}' exists: pass --resume to continue it, or another --out")
    sae = SparseAutoencoder(cfg, generator=torch.Generator().manual_seed(args.seed)).to(device).train()
    with torch.no_grad():
        first_batch = torch.Generator().manual_seed(args.seed + 1)
        first = features.training_activations(model, dataset, site, args.contexts, first_batch)
        sae.b_dec.copy_(first.mean(dim=0))
    optimizer = features.make_optimizer(sae, args.lr or features.default_lr(cfg.latents))
    return sae, optimizer, features.FiringTracker(cfg.latents, args.dead_after), 0, 0


def run_train(args, device):
    model, tokenizer = loading.load_model_from_args(args, device)
    config = model.config
    site = features.parse_site(args.site, config.n_layer)
    cfg = SAEConfig(config.n_embd, args.expansion * config.n_embd, args.k, args.batch_topk)
    features.check_config(cfg)
    source = args.ckpt or args.init_from
    dataset = open_data(args.data, tokenizer, config.block_size, source)
    args.out = args.out or features.default_path(args.ckpt or ".", site)
    identity = features.model_identity(model)
    generator = torch.Generator().manual_seed(args.seed)
    sae, optimizer, tracker, step, tokens = start_or_resume(args, model, cfg, identity, dataset, site, generator,
                                                                 device)
    batches = val_batches(dataset, args.eval_batches, args.contexts, device)
    log = Log(args.out, args.resume)
    info = dict(site={"kind": site.kind, "layer": site.layer}, model=source, model_identity=identity,
                data=os.path.abspath(args.data), contexts=args.contexts, lr=optimizer.param_groups[0]["lr"],
                dead_after=args.dead_after, seed=args.seed)
    print(f"training {cfg.latents} latents (k {cfg.k}{', BatchTopK' if cfg.batch_topk else ''}) on {site} of "
          f"{source} from step {step}, {args.contexts} x {config.block_size - 1} tokens a step")
    started = time.time()
    while step < args.steps:
        acts = features.training_activations(model, dataset, site, args.contexts, generator)
        out = features.train_step(sae, optimizer, acts, tracker.dead().to(device))
        tracker.update(out.acts)
        step, tokens = step + 1, tokens + acts.size(0)
        if step % args.eval_every == 0 or step == args.steps:
            metrics = features.evaluate(model, sae, site, batches)
            print(f"step {step} | {tokens:,} tokens | {time.time() - started:.0f}s | {metrics.line()}")
            log.write(dict(step=step, tokens=tokens, seconds=round(time.time() - started, 1), **vars(metrics)))
        if step % args.save_every == 0 or step == args.steps:
            features.save(args.out, sae, {**info, "step": step, "tokens": tokens}, optimizer, tracker, generator)
    print(f"saved {args.out}")
    plot(log, os.path.splitext(args.out)[0] + ".png")


def plot(log, out):
    """FVU, L0, dead fraction and loss recovered against training tokens (skipped, said so, without matplotlib)."""
    try:
        plt = plotting.pyplot("the plot")
    except plotting.PlotError as e:
        print(f"no plot: {e}", file=sys.stderr)
        return
    records = log.records()
    tokens = [r["tokens"] for r in records]
    panels = [("fvu", "fraction of variance unexplained"), ("l0", "L0 (active latents per token)"),
              ("dead", "dead fraction"), ("loss_recovered", "loss recovered")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(tokens, [r[key] for r in records], marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training tokens")
    plotting.save(fig, axes, out)
    print(f"wrote {out}")


# ---------------------------------------------------------------------------------------------
# show, page, embedding

def load_for_survey(args, device):
    model, tokenizer = loading.load_model_from_args(args, device)
    saved = features.load(args.sae, model=model, device=device)
    dataset = open_data(args.data, tokenizer, model.config.block_size, args.ckpt or args.init_from)
    survey = feature_survey.survey(model, saved.sae, saved.site, dataset, args.tokens, tokenizer)
    return model, tokenizer, saved, survey


def run_show(args, device):
    model, tokenizer, saved, survey = load_for_survey(args, device)
    if args.feature is not None:
        if not 0 <= args.feature < saved.sae.cfg.latents:
            raise FeatureError(f"--feature {args.feature}: this SAE has features 0..{saved.sae.cfg.latents - 1}")
        print(feature_survey.describe(survey, args.feature))
        return
    print(f"{saved.sae.cfg.latents} features of {saved.site} ({saved.info['tokens']:,} training tokens), surveyed on "
          f"{survey.n_tokens:,} val tokens; {survey.dead_count()} never fired. Most often active first:")
    for f in survey.by_density()[: args.top]:
        print(feature_survey.summary_line(survey, f))


def run_page(args, device):
    model, tokenizer, saved, survey = load_for_survey(args, device)
    space = embedding_space.page_data(model, tokenizer)
    title = f"features.py: {saved.site} of {args.ckpt or args.init_from}"
    page = features_html.render(title, feature_survey.page_data(survey, saved), space)
    out = args.out or os.path.splitext(args.sae)[0] + ".html"
    write_atomic(out, page)


def write_atomic(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # never a half-written page
    print(f"wrote {path} ({len(text.encode()) / 1e6:.2f} MB)")


def run_embedding(args, device):
    model, tokenizer = loading.load_model_from_args(args, device)
    for text in args.token:
        token = embedding_space.one_token(tokenizer, text)
        for name, matrix in embedding_space.matrices(model).items():
            near = embedding_space.neighbours(matrix, token, args.neighbours)
            shown = "  ".join(f"{embedding_space.label(tokenizer, i)} {c:.2f}" for i, c in near)
            print(f"{name:<12} {embedding_space.label(tokenizer, token)}: {shown}")
    print(embedding_space.terminal_map(model, tokenizer))
    if args.out:
        write_atomic(args.out, features_html.render(f"features.py embedding: {args.ckpt or args.init_from}", None,
                                                    embedding_space.page_data(model, tokenizer)))


@cli.command
def main(argv=None):
    args = arguments().parse_args(argv)
    device = resolve_device(args.device)
    {"train": run_train, "show": run_show, "page": run_page, "embedding": run_embedding}[args.command](args, device)


if __name__ == "__main__":
    main()
