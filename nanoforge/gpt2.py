"""
GPT-2 interoperability: load OpenAI's GPT-2 from a Hugging Face model directory, and export
our checkpoints back to one. `transformers` is never needed: a Hugging Face GPT-2 directory is
just config.json, the weights (model.safetensors, or pytorch_model.bin) and, usually, the
tokenizer files (vocab.json + merges.txt, or tokenizer.json).

Our module and parameter names are GPT-2's, so the mapping is short:
- Hugging Face prefixes the names with "transformer." (older files, like the hub's gpt2, do not);
- GPT-2's attention and MLP use a "Conv1D" that stores its weight as (in, out), the transpose
  of nn.Linear's (out, in);
- lm_head.weight is tied to the token embedding, so it is not stored separately;
- older files also hold each layer's causal mask as a buffer (attn.bias, attn.masked_bias): not weights.

    locate(name_or_path)        -> the model directory (a path, or a snapshot in the Hugging Face cache)
    from_pretrained(name, ...)  -> GPT with the weights loaded
    tokenizer_from_hf(dir)      -> BPETokenizer from vocab.json + merges.txt (or tokenizer.json), or None
    export(model, out_dir, tokenizer)  -> a directory transformers.GPT2LMHeadModel.from_pretrained loads
"""

import dataclasses
import glob
import json
import os
import sys

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model import ARCH_KEYS, GPT, GPTConfig, padded_vocab_size
from nanoforge.config import keys_from_weights
from nanoforge.errors import UserError
from nanoforge.tokenizer import EOT, BPETokenizer, gpt2_tokenizer

NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# Conv1D layers: Hugging Face stores their weights as (in, out), nn.Linear as (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GPT-2's pre-tokenization regex, written as tiktoken writes it for its "gpt2" encoding.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class GPT2Error(UserError):
    """A pretrained model that cannot be found, read or mapped onto ours."""


# ----------------------------------------------------------------------------- locating a model

def cache_dirs():
    """Where the Hugging Face hub may have cached models, in the order huggingface_hub looks."""
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        dirs.append(os.path.join(os.environ["HF_HOME"], "hub"))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(os.path.join(xdg, "huggingface", "hub"))
    return list(dict.fromkeys(dirs))


def snapshot(repo_dir):
    """The snapshot directory of a cached repo: the revision refs/main points at, else the newest."""
    ref = os.path.join(repo_dir, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            path = os.path.join(repo_dir, "snapshots", f.read().strip())
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    found = [p for p in glob.glob(os.path.join(repo_dir, "snapshots", "*"))
             if os.path.isfile(os.path.join(p, "config.json"))]
    return max(found, key=os.path.getmtime) if found else None


def locate(name_or_path):
    """The local directory of a GPT-2 model: an existing path, or a named model in the Hugging Face cache."""
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise GPT2Error(f"'{name_or_path}' has no config.json: pass a Hugging Face GPT-2 model directory")
        return name_or_path
    if name_or_path not in NAMES:
        raise GPT2Error(
            f"'{name_or_path}' is neither a GPT-2 model name ({', '.join(NAMES)}) nor an existing directory"
        )
    # The hub now files GPT-2 under openai-community/; `huggingface-cli download gpt2` caches it as models--gpt2.
    repos = [os.path.join(d, f"models--{owner}{name_or_path}")
             for d in cache_dirs() for owner in ("", "openai-community--")]
    for repo in repos:
        path = snapshot(repo)
        if path:
            return path
    raise GPT2Error(
        f"GPT-2 model '{name_or_path}' is not available locally (looked in {', '.join(repos)}): run "
        f"`huggingface-cli download {name_or_path}` on a machine with network access and copy the cache here "
        "(or set HF_HUB_CACHE to it), or pass the path of a Hugging Face GPT-2 directory"
    )


# ----------------------------------------------------------------------------- reading a model

def read_config(model_dir):
    """GPTConfig from a Hugging Face GPT-2 config.json; refuses variants our model does not compute."""
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise GPT2Error(f"cannot read '{path}' ({e}): the model directory is incomplete, download it again")
    if hf.get("model_type", "gpt2") != "gpt2":
        raise GPT2Error(f"'{path}' describes a {hf['model_type']!r} model, not GPT-2: only GPT-2 weights can be loaded")
    n_embd = hf.get("n_embd", 768)
    # (key, Hugging Face's default, values our model computes)
    supported = [
        ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh")),
        ("n_inner", None, (None, 4 * n_embd)),
        ("layer_norm_epsilon", 1e-5, (1e-5,)),
        ("scale_attn_weights", True, (True,)),
        ("scale_attn_by_inverse_layer_idx", False, (False,)),
        ("add_cross_attention", False, (False,)),
        ("tie_word_embeddings", True, (True,)),
    ]
    for key, default, allowed in supported:
        if hf.get(key, default) not in allowed:
            raise GPT2Error(f"'{path}' sets {key}={hf[key]!r}; this model supports only "
                            f"{' or '.join(map(repr, allowed))}")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd, dropout=0.0, bias=True)


def read_weights(model_dir):
    """The tensors of model.safetensors, else pytorch_model.bin (unpickled with weights_only=True:
    a .bin file can hold code, and only tensors are let through). Returns (tensors, path)."""
    path = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(path):
        try:
            return load_file(path), path
        except (SafetensorError, OSError) as e:
            raise GPT2Error(f"cannot read '{path}' ({e}): the file is truncated or corrupted, download it again")
    path = os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(path):
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
            raise GPT2Error(f"cannot read '{path}' as plain tensors ({type(e).__name__}): it is corrupted or holds "
                            "more than weights; use a model.safetensors instead")
    raise GPT2Error(f"'{model_dir}' holds neither model.safetensors nor pytorch_model.bin: download the model again")


def hf_to_ours(tensors, config, source):
    """Hugging Face GPT-2 tensors -> our state dict (lm_head left tied), every name and shape checked
    against a GPT of this config. `source` names the file in errors."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: v.shape for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    state = {}
    for hf_name, t in tensors.items():
        name = hf_name if hf_name.startswith(("transformer.", "lm_head.")) else "transformer." + hf_name
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask, stored as a buffer by older versions of transformers
        if name == "lm_head.weight":
            wte = tensors.get("transformer.wte.weight", tensors.get("wte.weight"))
            if wte is None or not torch.equal(t, wte):
                raise GPT2Error(f"'{source}' has an lm_head.weight that differs from the token embedding: "
                                "this model ties them, so it cannot load untied weights")
            continue
        if name not in expected:
            raise GPT2Error(f"'{source}' holds tensor '{hf_name}', which a GPT-2 of this config.json does not have")
        transposed = name.endswith(TRANSPOSED)
        want = tuple(expected[name])[::-1] if transposed else tuple(expected[name])  # in Hugging Face's layout
        if tuple(t.shape) != want:
            raise GPT2Error(f"tensor '{hf_name}' in '{source}' has shape {tuple(t.shape)}, but config.json implies "
                            f"{want}: the weights and config.json come from different models")
        state[name] = (t.t() if transposed else t).float().contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise GPT2Error(f"'{source}' lacks {len(missing)} tensor(s) of GPT-2, first '{missing[0]}': "
                        "download the model again")
    return state


def from_pretrained(name_or_path, block_size=None, dropout=0.0, vocab_size=None):
    """A GPT holding GPT-2's weights. block_size may crop the position embedding; vocab_size may pad
    the vocabulary (e.g. 50257 -> 50304 for speed) or cut it to a smaller tokenizer's; the rest of the
    shape comes from the weights."""
    model_dir = locate(name_or_path)
    config = read_config(model_dir)
    tensors, source = read_weights(model_dir)
    state = hf_to_ours(tensors, config, source)
    n_positions, n_vocab = config.block_size, config.vocab_size
    block_size, vocab_size = block_size or n_positions, vocab_size or n_vocab
    if block_size > n_positions:
        raise GPT2Error(f"block_size {block_size} is larger than this model's {n_positions} positions: "
                        f"use block_size <= {n_positions}")
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    wte = state["transformer.wte.weight"][:vocab_size]
    # Padding rows start at the mean embedding, so their logit is the mean of the real tokens' logits
    # (logits are linear in the embedding): far below the likely tokens'. A zero row would score a flat 0,
    # whatever the scale of the model's logits.
    padding = wte.mean(dim=0, keepdim=True).expand(vocab_size - len(wte), -1)
    state["transformer.wte.weight"] = torch.cat([wte, padding])
    config = dataclasses.replace(config, block_size=block_size, vocab_size=vocab_size, dropout=dropout)
    model = GPT(config)
    model.load_state_dict({**state, "lm_head.weight": state["transformer.wte.weight"]})
    return model


def model_and_tokenizer(name_or_path):
    """GPT-2 ready to sample from (eval mode, full context) with its tokenizer: the directory's own
    tokenizer files, else OpenAI's GPT-2 BPE from tiktoken."""
    model_dir = locate(name_or_path)
    tokenizer = tokenizer_from_hf(model_dir) or gpt2_tokenizer()
    n_vocab = read_config(model_dir).vocab_size
    if tokenizer.vocab_size > n_vocab:
        raise GPT2Error(f"the tokenizer of '{model_dir}' has {tokenizer.vocab_size} tokens, more than the model's "
                        f"{n_vocab}: add the model's own vocab.json and merges.txt to the directory")
    # As sample.py does for checkpoints: ids that no text maps to are cut, so they are never sampled.
    return from_pretrained(model_dir, vocab_size=tokenizer.vocab_size).eval(), tokenizer


# ----------------------------------------------------------------------------- tokenizer

def bytes_to_unicode():
    """GPT-2's vocab.json spells token bytes as printable characters: bytes that are printable
    Latin-1 stand for themselves, the other 68 (space, control characters, ...) become chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def read_hf_tokenizer_files(model_dir):
    """(vocab {token string: id}, merges [(a, b)], special token names) from vocab.json + merges.txt,
    else tokenizer.json; None when the directory has neither."""
    vocab_path, merges_path = os.path.join(model_dir, "vocab.json"), os.path.join(model_dir, "merges.txt")
    if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        return vocab, [tuple(line.split(" ")) for line in lines], {EOT} & set(vocab)
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        if tok["model"].get("type") != "BPE":
            raise GPT2Error(f"'{path}' is a {tok['model'].get('type')} tokenizer, not GPT-2's byte-level BPE")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tok["model"]["merges"]]
        vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok.get("added_tokens", [])}}
        return vocab, merges, {t["content"] for t in tok.get("added_tokens", []) if t.get("special")}
    return None


def tokenizer_from_hf(model_dir, name="gpt2"):
    """GPT-2's BPE as our BPETokenizer, built offline from a model directory's tokenizer files
    (None when it has none). tiktoken merges by rank = token id, which is GPT-2's merge order."""
    files = read_hf_tokenizer_files(model_dir)
    if files is None:
        return None
    vocab, merges, specials = files
    decode = {c: b for b, c in bytes_to_unicode().items()}
    ranks = {}
    for token, i in vocab.items():
        if token in specials:
            continue
        if any(c not in decode for c in token):
            raise GPT2Error(f"token {token!r} in '{model_dir}' is not written in GPT-2's byte alphabet: "
                            "only byte-level BPE tokenizers (GPT-2's) can be converted")
        ranks[bytes(decode[c] for c in token)] = i
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise GPT2Error(f"the tokenizer in '{model_dir}' has no token for byte {missing[0]}: "
                        "GPT-2's BPE has one for each of the 256")
    merged = [vocab.get(a + b, -1) for a, b in merges]
    if any(i < 0 for i in merged) or merged != sorted(merged):
        raise GPT2Error(f"the merges of the tokenizer in '{model_dir}' are not in token-id order, "
                        "so they cannot be encoded by rank as GPT-2's are")
    return BPETokenizer(name, GPT2_PATTERN, ranks, {t: vocab[t] for t in sorted(specials)})


def is_gpt2_bpe(tokenizer):
    """GPT-2-style byte-level BPE: Hugging Face's GPT-2 tokenizer encodes it identically."""
    return tokenizer.kind == "bpe" and (tokenizer.name == "gpt2" or tokenizer.pattern == GPT2_PATTERN)


def merge_parts(token, ranks):
    """Byte-pair-encode `token` with only the merges ranked below its own: for a reachable token
    this leaves the two tokens whose merge made it."""
    rank, parts = ranks[token], [bytes([b]) for b in token]
    while True:
        pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best, i = min(pairs, default=(rank, 0))
        if best >= rank:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def write_tokenizer_files(tokenizer, out_dir, model_max_length):
    """vocab.json + merges.txt + tokenizer_config.json for a GPT-2-style BPETokenizer."""
    spell = bytes_to_unicode()
    text = lambda token: "".join(spell[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in sorted(tokenizer.ranks.items(), key=lambda kv: kv[1])}
    vocab.update(tokenizer.special_tokens)
    merges = []
    for token, rank in sorted(tokenizer.ranks.items(), key=lambda kv: kv[1]):
        parts = merge_parts(token, tokenizer.ranks) if len(token) > 1 else []
        if len(parts) == 2:  # a token BPE can never reach gets no merge line (tiktoken cannot reach it either)
            merges.append(f"{text(parts[0])} {text(parts[1])}")
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    eot = EOT if EOT in tokenizer.special_tokens else None
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length, "add_prefix_space": False,
              "bos_token": eot, "eos_token": eot, "unk_token": eot}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


# ----------------------------------------------------------------------------- export

def ours_to_hf(state):
    """Our state dict -> Hugging Face GPT-2 tensors (Conv1D weights transposed, lm_head left tied)."""
    return {name: (t.t() if name.endswith(TRANSPOSED) else t).detach().to("cpu", torch.float32).contiguous()
            for name, t in state.items() if name != "lm_head.weight"}


def export(model, out_dir, tokenizer=None):
    """Write a Hugging Face GPT-2 directory: config.json, model.safetensors and, for a GPT-2-style BPE
    tokenizer, its files. The vocabulary is cut to the tokenizer's (dropping vocab_multiple padding)."""
    config = model.config
    if os.path.isdir(out_dir) and os.listdir(out_dir):  # stale files (a tokenizer) would be read with the new model
        raise GPT2Error(f"'{out_dir}' is not empty: export into a new directory (or empty this one)")
    if not config.bias:
        raise GPT2Error("this model has no biases (bias=false), which Hugging Face's GPT-2 cannot express")
    for key, value in config.gpt2_differences():
        raise GPT2Error(f"this model sets {key}={value!r}, which Hugging Face's GPT-2 cannot express: "
                        "only models of GPT-2's architecture (that key at its default) can be exported")
    state = dict(model.state_dict())
    vocab_size = tokenizer.vocab_size if tokenizer is not None else config.vocab_size
    state["transformer.wte.weight"] = state["transformer.wte.weight"][:vocab_size]
    eot = tokenizer.eot_id if tokenizer is not None else None
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
        "n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
        "bos_token_id": eot, "eos_token_id": eot, "dtype": "float32",
    }
    os.makedirs(out_dir, exist_ok=True)
    save_file(ours_to_hf(state), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None and is_gpt2_bpe(tokenizer):
        write_tokenizer_files(tokenizer, out_dir, config.block_size)


# ----------------------------------------------------------------------------- training

def init_for_training(cfg, data_tokenizer):
    """The pretrained model train.py starts from, and cfg with the keys the weights decide set to
    their values. block_size crops, dropout and vocab_multiple apply; the data must fit the vocabulary,
    or be a tokenizer that fits it plus the chat tokens: the embedding then grows by their rows, which
    from_pretrained starts at the mean embedding, as it does padding."""
    architecture = GPTConfig(n_head=cfg.n_head, **{key: getattr(cfg, key) for key in ARCH_KEYS})
    for key, _ in architecture.gpt2_differences():
        if key != "bias":  # the weights decide bias
            raise GPT2Error(f"init_from {cfg.init_from} loads GPT-2's architecture, which cannot hold "
                            f"{key}={getattr(cfg, key)!r}: leave {key} at its default ({getattr(GPTConfig, key)!r})")
    model_dir = locate(cfg.init_from)
    pretrained = read_config(model_dir)
    base = getattr(data_tokenizer, "base", data_tokenizer)  # without the chat tokens
    if base.vocab_size > pretrained.vocab_size:
        raise GPT2Error(f"the data's tokenizer has {base.vocab_size} tokens, more than {cfg.init_from}'s "
                        f"vocabulary of {pretrained.vocab_size}: prepare the data with the model's tokenizer "
                        "(--tokenizer gpt2 for OpenAI's GPT-2)")
    model_tokenizer = tokenizer_from_hf(model_dir)
    if model_tokenizer is not None and model_tokenizer.to_dict()["ranks"] != data_tokenizer.to_dict().get("ranks"):
        print(f"init_from: warning: the data was not tokenized with {cfg.init_from}'s tokenizer, "
              "so its token ids mean other things to the pretrained weights", file=sys.stderr)
    vocab_size = padded_vocab_size(max(pretrained.vocab_size, data_tokenizer.vocab_size), cfg.vocab_multiple)
    model = from_pretrained(model_dir, cfg.block_size, cfg.dropout, vocab_size)
    return model, keys_from_weights(cfg, model.config)
