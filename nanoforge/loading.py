"""
Building a model from a checkpoint: for inference (sample.py, eval.py, export.py, the engine), and to start
a training run from one (train.py's init_from: fine-tuning, or pretraining further). A LoRA run's checkpoint
(nanoforge/lora.py) holds only its adapters: its base is rebuilt and the adapters merged in (full_weights), so
every command loads it like any checkpoint.
"""

import torch

from model import GPT, GPTConfig, padded_vocab_size
from nanoforge import checkpoint, gpt2, lora
from nanoforge.checkpoint import CheckpointError, check_model_info, checkpoint_path, load
from nanoforge.config import TrainConfig, keys_from_weights
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
    state = full_weights(loaded)
    check_model_info(path, loaded.info["model"], state)
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
    """tokenizer (the data's) must be base (the checkpoint's) itself, or base plus the chat tokens (a chat
    checkpoint with the five chat tokens of CHAT_TOKENS_V1 grows by the tool tokens): then every id the
    weights know keeps its meaning."""
    described = tokenizer.to_dict()
    if described == base.to_dict():
        return
    plain = {k: v for k, v in described.items() if k != "chat_tokens"}
    saved = base.to_dict()
    base_chat = saved.pop("chat_tokens", [])
    # base's chat tokens (none, or the five of CHAT_TOKENS_V1) must start the data's: the ids they had stay theirs
    if "chat_tokens" in described and plain == saved and described["chat_tokens"][: len(base_chat)] == base_chat:
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
    state = grow_vocabulary(full_weights(loaded), base.vocab_size, vocab_size)
    if "transformer.wpe.weight" in state:  # learned positions: keep the first block_size
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    model = GPT(GPTConfig(**{**saved, "block_size": block_size, "vocab_size": vocab_size, "dropout": dropout}))
    load_model_state(model, state)
    return model


def pretrained(cfg, data_tokenizer):
    """The weights cfg.init_from names (one of our checkpoints, or GPT-2), as a GPT on the CPU to train on data
    of data_tokenizer, and cfg with the keys the weights decide set to their values."""
    if checkpoint.is_checkpoint(cfg.init_from):
        model = init_for_training(cfg.init_from, data_tokenizer, cfg.block_size, cfg.dropout, cfg.vocab_multiple)
        return model, keys_from_weights(cfg, model.config)
    return gpt2.init_for_training(cfg, data_tokenizer)


# ---------------------------------------------------------------------------------------------
# LoRA checkpoints: the adapters of a run, and the base they adapt named by path and hash.

def full_weights(loaded):
    """A loaded checkpoint's whole state dict: its own, or for a LoRA checkpoint its base's weights (rebuilt
    as the run built them: the vocabulary grown, the context cropped) with the adapters merged in."""
    if "lora_base" not in loaded.info:
        return dict(loaded.model_state)
    recorded = loaded.info["lora_base"]
    lora.check_base(recorded, loaded.path)
    tokenizer = tokenizer_from_dict(loaded.info["tokenizer"])
    cfg = TrainConfig(**{**loaded.info["config"], "init_from": lora.base_location(recorded), "dropout": 0.0})
    model, _ = pretrained(cfg, tokenizer)
    lora.add_adapters(model, cfg, tokenizer)
    lora.load_adapter_state(model, loaded.model_state)
    return lora.merge(model).state_dict()


def save_merged(ckpt, out):
    """Write a LoRA checkpoint's adapters merged into its base as one self-contained checkpoint (no optimizer
    state: it is for inference or for fine-tuning further, not for resuming the LoRA run)."""
    path = checkpoint_path(ckpt)
    loaded = load(path)
    if "lora_base" not in loaded.info:
        raise CheckpointError(f"'{path}' is not a LoRA checkpoint (it holds all its weights already): --merge "
                              "takes the checkpoint of a run trained with lora_rank > 0")
    state = full_weights(loaded)
    info = {key: value for key, value in loaded.info.items() if key != "lora_base"}
    info.update(config={**info["config"], "lora_rank": 0}, merged_from={"adapters": path, **loaded.info["lora_base"]})
    checkpoint.save(out, state, info)
