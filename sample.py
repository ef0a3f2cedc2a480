"""
Generate text from a checkpoint. The checkpoint carries the model's config and tokenizer,
so nothing else is needed.

    python sample.py (--ckpt out/quickstart | --init-from gpt2) [--prompt TEXT | --prompt-file F] [--num-samples N]
                     [--max-new-tokens N] [--temperature T] [--top-k K] [--seed S] [--device D]

--ckpt takes a run directory (best.safetensors is used when present, else latest.safetensors)
or a checkpoint file. --init-from samples straight from pretrained GPT-2 weights (a model name
found in the Hugging Face cache, or a Hugging Face GPT-2 directory).
"""

import argparse
import os
import sys

import torch

import checkpoint
import gpt2
from config import ConfigError
from model import GPT, GPTConfig
from tokenizer import TokenizerError, tokenizer_from_dict
from train import load_model_state, resolve_device


def checkpoint_path(ckpt):
    if os.path.isdir(ckpt):
        for name in ("best.safetensors", "latest.safetensors"):
            if os.path.isfile(os.path.join(ckpt, name)):
                return os.path.join(ckpt, name)
        raise checkpoint.CheckpointError(
            f"'{ckpt}' holds no checkpoint (best.safetensors or latest.safetensors): train one with train.py first"
        )
    if os.path.isfile(ckpt):
        return ckpt
    raise checkpoint.CheckpointError(f"checkpoint '{ckpt}' does not exist: pass a run directory or a .safetensors file")


def load_model(ckpt, device):
    """Model (in eval mode, on device) and tokenizer from a checkpoint directory or file.

    Training may pad the vocabulary (vocab_multiple) with ids no text maps to; the model is
    rebuilt with the tokenizer's true vocabulary so those ids can never be sampled."""
    loaded = checkpoint.load(checkpoint_path(ckpt), device="cpu")
    tokenizer = tokenizer_from_dict(loaded.info["tokenizer"])
    model_cfg = GPTConfig(**{**loaded.info["model"], "vocab_size": tokenizer.vocab_size, "dropout": 0.0})
    state = dict(loaded.model_state)
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: tokenizer.vocab_size]
    model = GPT(model_cfg)
    load_model_state(model, state)
    return model.to(device).eval(), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="run directory or checkpoint file")
    source.add_argument("--init-from", metavar="NAME|PATH",
                        help="pretrained GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face directory")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text to continue (default: a newline, or end-of-text for byte/BPE)")
    prompt.add_argument("--prompt-file", help="file whose text to continue")
    parser.add_argument("--num-samples", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 picks the most likely token (greedy)")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    try:
        for name in ("num_samples", "max_new_tokens"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        if args.temperature < 0 or args.top_k < 0:
            raise ConfigError("--temperature and --top-k must not be negative")
        device = resolve_device(args.device)
        if args.ckpt:
            model, tokenizer = load_model(args.ckpt, device)
        else:
            model, tokenizer = gpt2.model_and_tokenizer(args.init_from)
            model = model.to(device)
        if args.prompt_file:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        else:
            text = args.prompt
        if text:
            ids = tokenizer.encode(text)
        elif tokenizer.eot_id is not None:
            ids, text = [tokenizer.eot_id], ""
        else:
            text = "\n"
            ids = tokenizer.encode(text)
    except (ConfigError, checkpoint.CheckpointError, gpt2.GPT2Error, TokenizerError, OSError) as e:
        sys.exit(f"sample.py: error: {e}")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)  # (N, T)
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k or None, generator=generator)
    for row in out.tolist():
        print(text + tokenizer.decode(row[len(ids) :]))
        print("-" * 40)


if __name__ == "__main__":
    main()
