"""
Export a checkpoint as a Hugging Face GPT-2 model directory.

    python export.py --ckpt out/finetune_shakespeare --out hf/finetune_shakespeare

--ckpt takes a run directory or a checkpoint file, as sample.py does. The output holds
config.json and model.safetensors, and when the checkpoint's tokenizer is GPT-2's BPE also
vocab.json, merges.txt and tokenizer_config.json, so that

    transformers.GPT2LMHeadModel.from_pretrained(out)   # and GPT2TokenizerFast.from_pretrained(out)

load it. The vocabulary is cut to the tokenizer's: vocab_multiple padding is not exported.

A LoRA run's checkpoint (adapters only, docs/lora.md) exports the same way, its adapters merged into its base.
--merge instead writes them merged as one self-contained checkpoint of ours, which needs the base no more:

    python export.py --ckpt out/finetune_shakespeare_lora --merge --out out/shakespeare_merged.safetensors
"""

import os
import sys

from nanoforge import cli, gpt2
from nanoforge.loading import load_model, save_merged


@cli.command
def main(argv=None):
    parser = cli.parser(__doc__)
    parser.add_argument("--ckpt", required=True, metavar="RUN", help="run directory or checkpoint file")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write the Hugging Face model to "
                        "(with --merge: the checkpoint file to write)")
    parser.add_argument("--merge", action="store_true", help="write a LoRA checkpoint's adapters merged into its "
                        "base as one checkpoint file (.safetensors) instead")
    args = parser.parse_args(argv)
    if args.merge:
        save_merged(args.ckpt, args.out)
        print(f"wrote {args.out}: sample, evaluate or fine-tune it like any checkpoint (--ckpt {args.out})")
        return
    model, tokenizer = load_model(args.ckpt, "cpu")
    gpt2.export(model, args.out, tokenizer)
    files = ", ".join(sorted(os.listdir(args.out)))
    print(f"wrote {args.out} ({files}): load it with transformers.GPT2LMHeadModel.from_pretrained")
    if not gpt2.is_gpt2_bpe(tokenizer):
        print(f"note: the checkpoint's tokenizer ({tokenizer.kind}) is not GPT-2's BPE, so no tokenizer files "
              "were written: encode text with this project's tokenizer", file=sys.stderr)


if __name__ == "__main__":
    main()
