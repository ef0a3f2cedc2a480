"""
Training configuration: one typed dataclass, filled from a TOML file and `--key=value`
command-line overrides. Configs are data (TOML via the standard library), never code.

Every key has a type, a default and a one-line description; `python train.py --help`
prints them all. Unknown keys and ill-typed values are errors that name the fix.
"""

import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field

from nanoforge.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(UserError):
    """A problem with a config file or override, phrased for the user."""


def _key(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # data and run directory
    data_dir: str = _key("data/quickstart", "prepared data directory holding train.bin, val.bin and meta.json")
    out_dir: str = _key("out", "run directory: resolved config, log.jsonl and checkpoints go here")
    init_from: str = _key("scratch", "'scratch' builds a new model from the model keys below; a run directory or "
                          "checkpoint file of ours, gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 "
                          "directory starts from those weights")
    # model
    n_layer: int = _key(4, "number of transformer blocks")
    n_head: int = _key(4, "attention heads per block (must divide n_embd)")
    n_embd: int = _key(128, "width of the residual stream")
    block_size: int = _key(64, "context length in tokens")
    dropout: float = _key(0.0, "dropout probability (0 for pretraining, 0.1+ for small data)")
    bias: bool = _key(True, "biases in Linear layers and LayerNorms, as in GPT-2")
    vocab_multiple: int = _key(1, "pad the vocabulary up to a multiple of this (64 speeds up GPU matmuls)")
    # architecture options (the defaults are GPT-2's; model.py's docstring says what each does)
    pos_emb: str = _key("learned", "position information: 'learned' embeddings (GPT-2) or 'rope' (rotary, in attention)")
    norm: str = _key("layernorm", "'layernorm' (GPT-2) or 'rmsnorm'")
    mlp: str = _key("gelu", "MLP activation: 'gelu' (GPT-2), 'relu2' (ReLU squared) or 'swiglu'")
    qk_norm: bool = _key(False, "RMSNorm each head's queries and keys before attention")
    n_kv_head: int = _key(0, "key/value heads, for grouped-query attention (must divide n_head; 0 means n_head)")
    tie_embeddings: bool = _key(True, "the un-embedding (lm_head) shares the token embedding's weights, as in GPT-2")
    zero_init_proj: bool = _key(False, "start the residual output projections (c_proj) at zero")
    logit_softcap: float = _key(0.0, "squash the logits into (-cap, cap) by cap * tanh(logits / cap) (0 disables)")
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
    lr_schedule: str = _key("cosine", "'cosine' (decays to min_lr at lr_decay_iters) or 'wsd' (warmup, stable, "
                            "then linear decay to min_lr over the last decay_fraction of max_iters)")
    min_lr: float = _key(1e-4, "learning rate at the end of the decay (other groups: the same fraction of their peak)")
    warmup_iters: int = _key(100, "steps of linear learning-rate warmup from 0")
    lr_decay_iters: int = _key(2000, "step at which the cosine decay reaches min_lr")
    decay_fraction: float = _key(0.2, "share of max_iters the wsd schedule spends decaying to min_lr")
    decay_lr: bool = _key(True, "false keeps the learning rate at learning_rate after warmup")
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
    tensorboard_dir: str = _key("", "also write log.jsonl's records as TensorBoard scalars to this directory "
                                "('' is off; pip install -e '.[tensorboard]')")
    # system
    device: str = _key("auto", "'auto' (cuda, then mps, then cpu), or a torch device such as cpu, cuda, cuda:1, mps")
    dtype: str = _key("auto", "'auto' (bfloat16 on CUDA that has it, else float16; float32 elsewhere), float32, bfloat16, float16")
    compile: bool = _key(False, "torch.compile the model (faster on GPU after a warm-up)")
    seed: int = _key(1337, "random seed for initialisation, batches and dropout")

    def validate(self):
        positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                    "max_iters", "eval_interval", "eval_iters", "log_interval", "vocab_multiple",
                    "checkpoint_interval", "max_bad_steps"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"config key '{name}' must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                              f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be one of auto, float32, bfloat16, float16; got '{self.dtype}'")
        if not self.init_from:  # names and paths are checked when training starts: the weights may be elsewhere now
            raise ConfigError("init_from must be 'scratch', a run directory or checkpoint file, a GPT-2 name "
                              "(gpt2, gpt2-medium, gpt2-large, gpt2-xl) or the path of a Hugging Face GPT-2 directory")
        if self.hellaswag_interval < 0 or self.hellaswag_max < 0:
            raise ConfigError("hellaswag_interval and hellaswag_max must be 0 or more")
        if self.keep_last_n < 0:
            raise ConfigError(f"keep_last_n must be 0 or more, got {self.keep_last_n}")
        if self.warmup_iters < 0 or self.learning_rate <= 0 or self.min_lr < 0:
            raise ConfigError("learning_rate must be > 0, and min_lr and warmup_iters >= 0")
        choices = {"pos_emb": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"), "mlp": ("gelu", "relu2", "swiglu"),
                   "optimizer": ("adamw", "muon"), "lr_schedule": ("cosine", "wsd")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"config key '{name}' must be one of {', '.join(allowed)}; got '{getattr(self, name)}'")
        if self.n_kv_head < 0 or (self.n_kv_head and self.n_head % self.n_kv_head):
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}), or be 0 for n_head")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(f"pos_emb='rope' rotates pairs of channels: the head size n_embd / n_head "
                              f"({self.n_embd // self.n_head}) must be even")
        if min(self.matrix_lr, self.embedding_lr, self.unembedding_lr) <= 0 or self.logit_softcap < 0:
            raise ConfigError("matrix_lr, embedding_lr and unembedding_lr must be > 0, and logit_softcap >= 0")
        if not 0.0 <= self.decay_fraction <= 1.0 or not 0.0 <= self.muon_momentum < 1.0:
            raise ConfigError("decay_fraction must be in [0, 1] and muon_momentum in [0, 1)")
        if self.optimizer == "muon":
            import torch  # here only: reading a config should not pay torch's import

            if not hasattr(torch.optim, "Muon"):
                raise ConfigError(f"optimizer='muon' uses torch.optim.Muon, which PyTorch {torch.__version__} lacks "
                                  "(it arrived in 2.9): upgrade torch, or use optimizer='adamw'")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = {int: "int", float: "float", bool: "bool", str: "str"}


def unknown_key_error(name, where):
    close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'?" if close else "run `python train.py --help` for the list of keys"
    return ConfigError(f"unknown config key '{name}' {where}: {hint}")


def coerce(name, value):
    """Check a TOML value against the field's type (ints are accepted where floats are expected)."""
    want = FIELDS[name].type
    ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ConfigError(f"config key '{name}' expects {TYPES[want]}, got {value!r} ({type(value).__name__})")
    return value


def parse_override(name, text):
    """Turn the text of `--name=text` into the field's type."""
    want = FIELDS[name].type
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
    raise ConfigError(f"config key '{name}' expects {TYPES[want]}, got '{text}'")


def load_toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found: pass the path of a .toml file, e.g. configs/quickstart.toml")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}")


def build_config(path=None, overrides=(), base=None):
    """TrainConfig from a TOML file (or a saved config dict, `base`) plus `--key=value` strings, validated."""
    values = {}
    source = load_toml(path) if path is not None else (base or {})
    for name, value in source.items():
        if name not in FIELDS:
            raise unknown_key_error(name, f"in {path or 'the saved config'}")
        values[name] = coerce(name, value)
    for item in overrides:
        name, sep, text = item[2:].partition("=")
        name = name.replace("-", "_")
        if name not in FIELDS:
            raise unknown_key_error(name, "on the command line")
        if not sep:
            raise ConfigError(f"override '{item}' has no value: write --{name}=VALUE")
        values[name] = parse_override(name, text)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def load_saved(overrides):
    """The config.json of the run directory named by --out_dir (or the default out_dir), or None
    when there is none (a run killed before writing it has no checkpoint either: resuming then
    says so)."""
    out_dir = next((o.split("=", 1)[1] for o in overrides if o.startswith("--out_dir=")), TrainConfig.out_dir)
    path = f"{out_dir}/config.json"
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
    ours = {f.name for f in dataclasses.fields(TrainConfig)} - {"block_size", "dropout", "vocab_size"}
    weights = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config) if f.name in ours}
    replaced = [f"{k}={v!r} (config had {getattr(cfg, k)!r})" for k, v in weights.items() if getattr(cfg, k) != v]
    if replaced:
        print(f"init_from {cfg.init_from}: the weights set {', '.join(replaced)}", file=sys.stderr)
    return dataclasses.replace(cfg, **weights)


def help_text():
    lines = ["Config keys (set in a .toml file or as --key=value):", ""]
    for f in dataclasses.fields(TrainConfig):
        default = json.dumps(f.default)
        lines.append(f"  --{f.name:<28} {TYPES[f.type]:<5} default {default:<18} {f.metadata['help']}")
    return "\n".join(lines)
