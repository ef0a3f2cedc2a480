"""
Building a model from a checkpoint: for inference (sample.py, eval.py, export.py, the engine), and to start
a training run from one (train.py's init_from: fine-tuning, or pretraining further).
"""


import torch

from model import GPT, GPTConfig, padded_vocab_size
from nanoforge import gpt2
from nanoforge.checkpoint import CheckpointError, check_model_info, checkpoint_path, load
from nanoforge.tokenizer import tokenizer_from_dict

# ---------------------------------------------------------------------------------------------
# Loading a model for inference (sample.py, eval.py, export.py, the engine).

def load_model_state(model, state):
    """Load a checkpoint's weights; a tied lm_head is stored once, as the token embedding."""
    state = dict(state)
    if model.config.tie_embeddings:
        state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model.load_state_dict(state)


def load_model(ckpt, device):
    """Model (in eval mode, on device) and tokenizer from a checkpoint directory or file.

    Training may pad the vocabulary (vocab_multiple) with ids no text maps to; the model is
    rebuilt with the tokenizer's true vocabulary so those ids can never be sampled."""
    path = checkpoint_path(ckpt)
    loaded = load(path, device="cpu")
    tokenizer = tokenizer_from_dict(loaded.info["tokenizer"])
    check_model_info(path, loaded.info["model"], loaded.model_state)
    state = dict(loaded.model_state)
    state["transformer.wte.weight"] = state["transformer.wte.weight"][: tokenizer.vocab_size]
    if "lm_head.weight" in state:  # an untied un-embedding: its padding rows go too
        state["lm_head.weight"] = state["lm_head.weight"][: tokenizer.vocab_size]
    try:
        model = GPT(GPTConfig(**{**loaded.info["model"], "vocab_size": tokenizer.vocab_size, "dropout": 0.0}))
        load_model_state(model, state)
    except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:  # description vs weights
        raise CheckpointError(f"'{path}' holds weights that do not fit the model it describes "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200]}): the file is damaged") from None
    return model.to(device).eval(), tokenizer


def load_model_from_args(args, device):
    """Model (eval mode, on device) and tokenizer from cli.add_model_arguments' --ckpt or --init-from."""
    if args.ckpt:
        return load_model(args.ckpt, device)
    model, tokenizer = gpt2.model_and_tokenizer(args.init_from)
    return model.to(device), tokenizer


# ---------------------------------------------------------------------------------------------
# Starting a training run from a checkpoint (train.py's init_from): fine-tuning, or pretraining further.

def check_extends(base, tokenizer, ckpt):
    """tokenizer (the data's) must be base (the checkpoint's) itself, or base plus the chat tokens:
    then every id the weights know keeps its meaning."""
    described = tokenizer.to_dict()
    if described == base.to_dict():
        return
    plain = {k: v for k, v in described.items() if k != "chat_tokens"}
    if "chat_tokens" in described and plain == base.to_dict():
        return
    raise CheckpointError(
        f"the data's tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} tokens) is not the one of '{ckpt}' "
        f"({base.kind}, {base.vocab_size} tokens) nor it plus the chat tokens, so its ids mean other things to "
        f"the weights: prepare the data with `python prepare.py SOURCE --tokenizer-from {ckpt}`")


def grow_vocabulary(state, n_old, vocab_size):
    """The token embedding, and the lm_head when it is stored apart (untied), cut to the n_old rows the
    checkpoint's tokenizer uses and grown to vocab_size rows. The new rows (chat tokens, padding) start at
    the mean of the old ones: logits are linear in these rows, so a new token's logit starts at the mean of
    the old tokens' logits, far below the likely ones, and every old token's logit is unchanged."""
    state = dict(state)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        if name in state:
            old = state[name][:n_old]  # (n_old, n_embd)
            state[name] = torch.cat([old, old.mean(dim=0, keepdim=True).expand(vocab_size - n_old, -1)])
    return state


def init_for_training(ckpt, data_tokenizer, block_size, dropout, vocab_multiple):
    """A GPT holding a checkpoint's weights, to train on data tokenized with data_tokenizer (the
    checkpoint's tokenizer, or it plus the chat tokens). The shape comes from the checkpoint's saved
    model config, so every architecture field it records carries over; block_size may crop the context,
    and the vocabulary grows to the data's (padded to vocab_multiple). Returns the model on the CPU."""
    path = checkpoint_path(ckpt)
    loaded = load(path)
    base = tokenizer_from_dict(loaded.info["tokenizer"])
    check_extends(base, data_tokenizer, ckpt)
    saved = loaded.info["model"]
    if block_size > saved["block_size"]:
        raise CheckpointError(f"block_size {block_size} is larger than the {saved['block_size']} positions of "
                              f"'{ckpt}': use block_size <= {saved['block_size']}")
    vocab_size = padded_vocab_size(data_tokenizer.vocab_size, vocab_multiple)
    state = grow_vocabulary(loaded.model_state, base.vocab_size, vocab_size)
    if "transformer.wpe.weight" in state:  # learned positions: keep the first block_size
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    model = GPT(GPTConfig(**{**saved, "block_size": block_size, "vocab_size": vocab_size, "dropout": dropout}))
    load_model_state(model, state)
    return model


