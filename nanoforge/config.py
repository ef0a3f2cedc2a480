"""
Training configuration: one typed dataclass, filled from a TOML file and `--key=value`
command-line overrides. Configs are data (TOML via the standard library), never code.

Every key has a type, a default and a one-line description; `python train.py --help`
prints them all. Unknown keys and ill-typed values are errors that name the fix.
"""

import dataclasses
import difflib
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from model import GPTConfig  # imports torch too: the model's keys are declared there
from nanoforge import sizing
from nanoforge.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(UserError):
    """A problem with a config file or override, phrased for the user."""


def _key(default, help):
    return field(default=default, metadata={"help": help})


def key_help(name):
    """The one-line description of a config key."""
    return MODEL_KEY_HELP.get(name) or KEYS[name].metadata["help"]


# The model's keys are GPTConfig's fields, declared once in model.py with GPT-2's values as their defaults;
# TrainConfig adds the run's keys after them. vocab_size is not a key: the data's tokenizer sets it.
MODEL_KEY_HELP = {
    "block_size": "context length in tokens",
    "n_layer": "number of transformer blocks",
    "n_head": "attention heads per block (must divide n_embd)",
    "n_embd": "width of the residual stream",
    "dropout": "dropout probability (0 for pretraining, 0.1+ for small data)",
    "bias": "biases in Linear layers and LayerNorms, as in GPT-2",
    "pos_emb": "position information: 'learned' embeddings (GPT-2) or 'rope' (rotary, in attention)",
    "norm": "'layernorm' (GPT-2) or 'rmsnorm'",
    "mlp": "MLP activation: 'gelu' (GPT-2), 'relu2' (ReLU squared) or 'swiglu'",
    "qk_norm": "RMSNorm each head's queries and keys before attention",
    "n_kv_head": "key/value heads, for grouped-query attention (must divide n_head; 0 means n_head)",
    "tie_embeddings": "the un-embedding (lm_head) shares the token embedding's weights, as in GPT-2",
    "zero_init_proj": "start the residual output projections (c_proj) at zero",
    "logit_softcap": "squash the logits into (-cap, cap) by cap * tanh(logits / cap) (0 disables)",
}
MODEL_KEYS = tuple(MODEL_KEY_HELP)


@dataclass
class TrainConfig(GPTConfig):
    # data and run directory
    data_dir: str = _key("data/quickstart", "prepared data directory holding train.bin, val.bin and meta.json")
    out_dir: str = _key("out", "run directory: resolved config, log.jsonl and checkpoints go here")
    init_from: str = _key("scratch", "'scratch' builds a new model from the model keys; a run directory or "
                          "checkpoint file of ours, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 "
                          "directory starts from those weights")
    vocab_multiple: int = _key(1, "pad the vocabulary up to a multiple of this (64 speeds up GPU matmuls)")
    # the model's size by one dial (nanoforge/sizing.py has the rules)
    depth: int = _key(0, "one dial for the model's size: n_layer = depth, n_embd = aspect_ratio x depth, n_head = depth, "
                      "and the learning rates and max_iters follow (0: set them by hand); keys set explicitly win")
    aspect_ratio: int = _key(64, "with depth: n_embd = aspect_ratio x depth, so each head is aspect_ratio wide (64 is "
                             "GPT-2's head size)")
    tokens_per_param: float = _key(20.0, "with depth: train on this many tokens per parameter (Chinchilla's "
                                   "compute-optimal ~20), which sets max_iters")
    # optimisation
    batch_size: int = _key(12, "sequences per micro-batch")
    gradient_accumulation_steps: int = _key(1, "micro-batches summed into one optimizer step")
    max_iters: int = _key(2000, "number of optimizer steps to train for")
    optimizer: str = _key("adamw", "'adamw', or 'muon' (Muon for the blocks' weight matrices, AdamW for the rest)")
    learning_rate: float = _key(1e-3, "peak learning rate (AdamW; with muon, of the norms' gains and the biases)")
    matrix_lr: float = _key(0.02, "peak learning rate of the blocks' weight matrices under optimizer=muon")
    embedding_lr: float = _key(0.01, "peak learning rate of the embeddings under optimizer=muon (AdamW)")
    unembedding_lr: float = _key(0.004, "peak learning rate of an untied lm_head under optimizer=muon (AdamW)")
    muon_momentum: float = _key(0.95, "Muon's momentum (optimizer=muon)")
    lr_schedule: str = _key("cosine", "after warmup: 'constant', 'cosine' (decays to min_lr at lr_decay_iters) or "
                            "'wsd' (warmup-stable-decay: constant, then a straight line down to min_lr at "
                            "lr_decay_iters over its last decay_fraction)")
    warmup_iters: int = _key(100, "steps of linear learning-rate warmup from 0")
    lr_decay_iters: int = _key(0, "step at which the decay reaches min_lr, for every schedule (0: max_iters)")
    decay_fraction: float = _key(0.2, "wsd: the share of lr_decay_iters spent decaying")
    min_lr: float = _key(1e-4, "learning rate at the end of the decay (other groups: the same fraction of their peak)")
    weight_decay: float = _key(0.1, "weight decay, applied to matrices only (with muon: to the blocks' matrices)")
    beta1: float = _key(0.9, "AdamW beta1")
    beta2: float = _key(0.99, "AdamW beta2")
    grad_clip: float = _key(1.0, "clip the gradient norm to this (0 disables)")
    # evaluation, logging, checkpoints
    eval_interval: int = _key(250, "evaluate train/val loss every this many steps (and at the end)")
    eval_iters: int = _key(20, "batches averaged per evaluation")
    log_interval: int = _key(10, "write a log.jsonl record every this many steps")
    hellaswag_interval: int = _key(0, "also score HellaSwag (acc, acc_norm) into log.jsonl every this many steps "
                                   "and at the end (0 is off)")
    hellaswag_max: int = _key(500, "HellaSwag examples scored each time (the first ones; 0 is all 10,042)")
    hellaswag_data: str = _key("", "a local HellaSwag JSONL file ('' downloads the validation split into data/hellaswag)")
    checkpoint_interval: int = _key(250, "write latest.safetensors every this many steps (and at the end)")
    keep_last_n: int = _key(0, "also keep this many step-numbered checkpoints (step_NNNNNNN.safetensors)")
    max_bad_steps: int = _key(5, "stop after this many steps in a row with a non-finite loss or gradient")
    wandb_log: bool = _key(False, "also send log.jsonl's records to Weights & Biases (pip install -e '.[wandb]')")
    wandb_project: str = _key("nanoforge", "Weights & Biases project of the run")
    wandb_run_name: str = _key("", "Weights & Biases name of the run ('' uses the name of out_dir)")
    tensorboard_log: bool = _key(False, "also write log.jsonl's records as TensorBoard scalars to out_dir/tensorboard "
                                 "(pip install -e '.[tensorboard]')")
    # LoRA (nanoforge/lora.py, docs/lora.md): freeze the weights of init_from, train low-rank adapters
    lora_rank: int = _key(0, "LoRA: rank r of the adapters on the lora_targets layers, base weights frozen (0 is off: "
                          "every weight trains)")
    lora_alpha: float = _key(16.0, "LoRA: the adapters' update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = _key(0.0, "LoRA: dropout on the adapters' input")
    lora_targets: str = _key("attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", "LoRA: the linear layers that get "
                             "adapters, comma-separated (of attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)")
    # system
    device: str = _key("auto", "'auto' (cuda, then mps, then cpu), or a torch device such as cpu, cuda, cuda:1, mps")
    dtype: str = _key("auto", "'auto' (bfloat16 on CUDA that has it, else float16; float32 elsewhere), float32, bfloat16, float16")
    compile: bool = _key(False, "torch.compile the model (faster on GPU after a warm-up)")
    parallel: str = _key("ddp", "under torchrun: 'ddp' (each process holds the whole model) or 'fsdp' (FSDP2: "
                         "parameters, gradients and optimizer state sharded over the processes)")
    activation_checkpointing: bool = _key(False, "recompute each block's activations in the backward pass instead "
                                          "of keeping them (less memory, about a third more compute)")
    seed: int = _key(1337, "random seed for initialisation, batches and dropout")

    def model_config(self, vocab_size):
        """The GPTConfig this config describes, for a vocabulary of vocab_size tokens."""
        return GPTConfig(vocab_size=vocab_size, **{key: getattr(self, key) for key in MODEL_KEYS})

    def to_dict(self):
        """The config's keys and values, as config.json and checkpoints record them."""
        return {name: getattr(self, name) for name in KEYS}

    @property
    def decay_end(self):
        """The step at which the learning rate reaches min_lr."""
        return self.lr_decay_iters or self.max_iters

    def validate(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                     "max_iters", "eval_interval", "eval_iters", "log_interval", "vocab_multiple",
                     "checkpoint_interval", "max_bad_steps", "aspect_ratio"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_iters", "lr_decay_iters", "keep_last_n", "n_kv_head", "hellaswag_interval", "hellaswag_max",
                     "depth", "lora_rank"):
            if getattr(self, name) < 0:
                raise ConfigError(f"config key '{name}' must be 0 or more, got {getattr(self, name)}")
        for name, (low, high, text) in FLOAT_RANGES.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and low(value) and high(value)):
                raise ConfigError(f"config key '{name}' must be {text}, got {value}")
        if self.depth > MAX_DEPTH:  # the dial counts the model's parameters by building it (on the meta device)
            raise ConfigError(f"config key 'depth' must be at most {MAX_DEPTH} (GPT-3 175B has 96 layers), got "
                              f"{self.depth}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                              f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if not self.init_from:  # names and paths are checked when training starts: the weights may be elsewhere now
            raise ConfigError("init_from must be 'scratch', a run directory or checkpoint file, a GPT-2 name "
                              "(gpt2, gpt2-medium, gpt2-large, gpt2-xl) or the path of a Hugging Face GPT-2 directory")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config key '{name}' must be one of {', '.join(allowed)}; got '{getattr(self, name)}'")
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}), or be 0 for n_head")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"pos_emb='rope' rotates pairs of channels: the head size n_embd / n_head "
                              f"({self.n_embd // self.n_head}) must be even")
        if self.lora_rank:
            self.validate_lora()
        if self.optimizer == "muon" and not hasattr(torch.optim, "Muon"):
            raise ConfigError(f"optimizer='muon' uses torch.optim.Muon, which PyTorch {torch.__version__} lacks "
                              "(it arrived in 2.9): upgrade torch, or use optimizer='adamw'")


    def validate_lora(self):
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in LORA_TARGETS]
        if not targets or unknown:
            raise ConfigError(f"lora_targets must name some of {', '.join(LORA_TARGETS)} (comma-separated), got "
                              f"'{self.lora_targets}'")
        if self.init_from == "scratch":
            raise ConfigError("lora_rank adapts pretrained weights, but init_from is 'scratch': set init_from to a "
                              "checkpoint or GPT-2, or lora_rank = 0 to train every weight")
        if self.optimizer != "adamw":
            raise ConfigError("LoRA trains its adapters with AdamW: use optimizer = 'adamw' with lora_rank")


# The linear layers of a block LoRA can adapt, as their names end (model.py's, and GPT-2's on the Hub).
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
MAX_DEPTH = 256
DTYPES = ("auto", "float32", "bfloat16", "float16")
CHOICES = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2", "swiglu"),
           "optimizer": ("adamw", "muon"), "lr_schedule": ("constant", "cosine", "wsd"), "dtype": DTYPES, "parallel": ("ddp", "fsdp")}
# Every float key: finite (nan and inf are refused) and in its range.
_positive = (lambda v: v > 0, lambda v: True, "a finite number > 0")
_non_negative = (lambda v: v >= 0, lambda v: True, "a finite number >= 0")
_unit = (lambda v: v >= 0, lambda v: v < 1, "in [0, 1)")
FLOAT_RANGES = {
    "learning_rate": _positive, "matrix_lr": _positive, "embedding_lr": _positive, "unembedding_lr": _positive,
    "min_lr": _non_negative, "weight_decay": _non_negative, "grad_clip": _non_negative,
    "logit_softcap": _non_negative, "dropout": _unit, "beta1": _unit, "beta2": _unit, "muon_momentum": _unit,
    "decay_fraction": (lambda v: v >= 0, lambda v: v <= 1, "in [0, 1]"), "tokens_per_param": _positive,
    "lora_alpha": _positive, "lora_dropout": _unit,
}
# Keys of earlier versions, each with what replaced it: an old config file gets one line naming the new key.
REPLACED_KEYS = {
    "decay_lr": "lr_schedule (decay_lr = false is lr_schedule = \"constant\")",
    "tensorboard_dir": "tensorboard_log = true (it writes to out_dir/tensorboard)",
}
KEYS = {f.name: f for f in dataclasses.fields(TrainConfig) if f.name != "vocab_size"}
TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


def unknown_key_error(name, where):
    if name in REPLACED_KEYS:
        return ConfigError(f"config key '{name}' {where} was replaced: use {REPLACED_KEYS[name]}")
    if name == "vocab_size":
        return ConfigError(f"config key 'vocab_size' {where}: the data's tokenizer sets the vocabulary; "
                           "vocab_multiple pads it")
    close = difflib.get_close_matches(name, KEYS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "run `python train.py --help` for the list of keys"
    return ConfigError(f"unknown config key {name!r} {where}: {hint}")  # !r: a name may hold a newline


def coerce(name, value, keys=KEYS):
    """Check a TOML (or saved) value against the field's type in `keys` (ints are accepted where floats are
    expected)."""
    want = keys[name].type
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"config key '{name}' expects {TYPES[want]}, got {value!r} ({type(value).__name__})")
    return value


def parse_override(name, text, keys=KEYS):
    """Turn the text of `--name=text` into the field's type in `keys`."""
    want = keys[name].type
    if want is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
    else:
        try:
            return want(text)
        except ValueError:
            pass
    raise ConfigError(f"config key '{name}' expects {TYPES[want]}, got {text!r}")


def load_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found: pass the path of a .toml file, e.g. configs/quickstart.toml")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}")


def parse_overrides(items, keys=KEYS, unknown_key=unknown_key_error):
    """`--key=value` strings -> {key: value text}. A key may be spelled with dashes or underscores
    (--out-dir=x is --out_dir=x): both spellings mean the same key everywhere."""
    parsed = {}
    for item in items:
        name, sep, text = item[2:].partition("=")
        name = name.replace("-", "_")
        if name not in keys:
            raise unknown_key(name, "on the command line")
        if not sep:
            raise ConfigError(f"override '{item}' has no value: write --{name}=VALUE")
        parsed[name] = text
    return parsed


def build_config(path=None, overrides=(), base=None):
    """TrainConfig from a TOML file (or a saved config dict, `base`) plus `--key=value` strings, validated."""
    values = {}
    source = load_toml(path) if path is not None else (base or {})
    for name, value in source.items():
        if name not in KEYS:
            raise unknown_key_error(name, f"in {path or 'the saved config'}")
        values[name] = coerce(name, value)
    for name, text in parse_overrides(overrides).items():
        values[name] = parse_override(name, text)
    cfg = TrainConfig(**values)
    cfg.validate()
    if cfg.depth:
        if cfg.init_from != "scratch":
            raise ConfigError(f"depth sizes a new model, but init_from '{cfg.init_from}' brings its own shape: "
                              "remove depth, or use init_from = 'scratch'")
        cfg, summary = sizing.size_by_depth(cfg, explicit=set(values))
        print(summary, file=sys.stderr)
        cfg.validate()
    return cfg


def split_arguments(argv, flags):
    """A training command's arguments -> (the config file or None, the --key=value overrides, the flags of
    `flags` present, as a set)."""
    present = {a for a in argv if a in flags}
    args = [a for a in argv if a not in flags]
    path = None
    if args and not args[0].startswith("--"):
        path, args = args[0], args[1:]
    stray = [a for a in args if not a.startswith("--")]
    if stray:
        raise ConfigError(f"unexpected argument '{stray[0]}': overrides are written --key=value")
    return path, args, present


def load_saved(overrides, out_dir=TrainConfig.out_dir):
    """The config.json of the run directory named by --out_dir (or out_dir, the command's default), or None
    when there is none (a run killed before writing it has no checkpoint either: resuming then
    says so). Only --out_dir is read here: the overrides are checked when the config is built."""
    for item in overrides:
        if item[2:].replace("-", "_").startswith("out_dir="):
            out_dir = item.partition("=")[2]
    path = os.path.join(out_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot read the saved config '{path}' ({e}): pass the run's config file before --resume")


def keys_from_weights(cfg, model_config):
    """cfg with every key that is also a field of the model's config (n_layer, n_head, n_embd, bias, and
    any architecture field the two share) set to the pretrained model's value, said on stderr, so the
    run's config.json describes the model it trains. block_size (cfg may crop it), dropout and
    vocab_size stay cfg's."""
    ours = set(MODEL_KEYS) - {"block_size", "dropout"}
    weights = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config) if f.name in ours}
    replaced = [f"{k}={v!r} (config had {getattr(cfg, k)!r})" for k, v in weights.items() if getattr(cfg, k) != v]
    if replaced:
        print(f"init_from {cfg.init_from}: the weights set {', '.join(replaced)}", file=sys.stderr)
    return dataclasses.replace(cfg, **weights)


def help_text():
    lines = ["Config keys (set in a .toml file or as --key=value):", ""]
    for f in KEYS.values():
        default = json.dumps(f.default)
        lines.append(f"  --{f.name:<28} {TYPES[f.type]:<5} default {default:<18} {key_help(f.name)}")
    return "\n".join(lines)
