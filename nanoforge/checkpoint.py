"""
Checkpoints: one self-contained safetensors file per checkpoint.

Tensors (model weights, optimizer moments, RNG states) are stored by name; everything
else (config, tokenizer, step, optimizer hyperparameters) is JSON in the file's metadata.
Nothing is pickled, so loading a checkpoint can never run code from it.

Files are written to a temporary name in the same directory, flushed and fsynced, then
renamed over the old one: a crash at any instant leaves either the old or the new file,
never half of one. A sha256 over all tensor bytes is stored and verified on load.
"""

import dataclasses
import errno
import glob
import hashlib
import json
import os
import random
import re
import sys

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model import GPTConfig
from nanoforge.errors import UserError
from nanoforge.tokenizer import tokenizer_from_dict

FORMAT = "nanoforge-checkpoint"
VERSION = 1


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged or from an incompatible version."""


def tensor_checksum(tensors):
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def flatten_optimizer(state_dict):
    """AdamW's state_dict -> (tensors named 'optim.<param index>.<name>', JSON-able param groups)."""
    tensors = {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            tensors[f"optim.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state_dict["param_groups"]


def unflatten_optimizer(tensors, param_groups):
    state = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}


def fsync_directory(path):
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(path, model_state, info, optimizer_state=None, extra_tensors=None):
    """Write a checkpoint atomically.

    model_state: the model's state dict (tied weights are stored once).
    info: JSON-able dict (config, tokenizer, step, ...).
    optimizer_state: an optimizer's state_dict, or None.
    extra_tensors: more named tensors (RNG states), stored under 'extra.<name>'.
    """
    tensors = {}
    seen = set()
    for name, t in model_state.items():
        if t.data_ptr() in seen:  # lm_head.weight is wte.weight: safetensors refuses shared storage
            continue
        seen.add(t.data_ptr())
        tensors[f"model.{name}"] = t.detach().to("cpu").contiguous()
    meta = {"format": FORMAT, "version": str(VERSION), "info": json.dumps(info)}
    if optimizer_state is not None:
        optim_tensors, groups = flatten_optimizer(optimizer_state)
        tensors.update({k: v.detach().to("cpu").contiguous() for k, v in optim_tensors.items()})
        meta["optimizer_param_groups"] = json.dumps(groups)
    for name, t in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = t.detach().to("cpu").contiguous()
    meta["sha256"] = tensor_checksum(tensors)

    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        try:
            save_file(tensors, tmp, metadata=meta)
        except SafetensorError as e:  # safetensors reports I/O failures (disk full) as its own error type
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code.group(1)) if code else errno.EIO, str(e)) from None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Checkpoint:
    """A loaded checkpoint: model_state, info, optimizer_state (or None), extra tensors."""

    def __init__(self, path, model_state, info, optimizer_state, extra):
        self.path = path
        self.model_state = model_state
        self.info = info
        self.optimizer_state = optimizer_state
        self.extra = extra


def load(path, device="cpu", objects=("model", "tokenizer")):
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at '{path}'")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        # Pickles (nanoGPT's ckpt.pt, torch.save files) land here too: they are never unpickled,
        # because unpickling runs whatever code the file names.
        raise CheckpointError(
            f"'{path}' is not a readable safetensors checkpoint ({e}): it is truncated or corrupted, or a pickle "
            "such as a torch.save/nanoGPT ckpt.pt file (refused: loading a pickle can run code)"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a {FORMAT} file (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CheckpointError(
            f"'{path}' is checkpoint format version {meta.get('version')!r}, this code reads version {VERSION}: "
            "use the version of this project that wrote it"
        )
    if tensor_checksum(tensors) != meta.get("sha256"):
        raise CheckpointError(f"'{path}' failed its checksum: the file is corrupted")
    model_state = {k[len("model."):]: v.to(device) for k, v in tensors.items() if k.startswith("model.")}
    extra = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    optimizer_state = None
    if "optimizer_param_groups" in meta:
        optim = {k: v for k, v in tensors.items() if k.startswith("optim.")}
        optimizer_state = unflatten_optimizer(optim, header_json(path, meta, "optimizer_param_groups"))
    return Checkpoint(path, model_state, parse_info(path, meta, objects), optimizer_state, extra)


def header_json(path, meta, key):
    """A JSON field of the header. The checksum covers the tensors only: the header is checked here."""
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"'{path}' has no readable '{key}' in its header: the file is damaged") from None


def parse_info(path, meta, objects=("model", "tokenizer")):
    """The header's info, an object holding each of `objects` as an object (a model checkpoint's model and
    tokenizer descriptions; a file of another kind, such as an SAE's, checks its own)."""
    info = header_json(path, meta, "info")
    if not (isinstance(info, dict) and all(isinstance(info.get(key), dict) for key in objects)):
        raise CheckpointError(f"'{path}' has an info header without its {' and '.join(objects)}: the file is damaged")
    return info


MAX_BLOCK_SIZE = 1 << 20  # a context no model here has: rope's tables for more would not fit in memory


def check_model_info(path, model, state):
    """The info's model description against the weights, before a model is built from it: a damaged or
    edited description could otherwise ask for a model that does not fit in memory."""
    def whole(key):
        value = model.get(key)
        if type(value) is not int or value < 1:
            raise CheckpointError(f"'{path}' describes its model with {key} = {value!r}: the file is damaged")
        return value

    for field in dataclasses.fields(GPTConfig):  # each value of its field's type (a float may be written as int)
        value, want = model.get(field.name, field.default), type(field.default)
        if not (type(value) is want or (want is float and type(value) is int)):
            raise CheckpointError(f"'{path}' describes its model with {field.name} = {value!r}, not a "
                                  f"{want.__name__}: the file is damaged")
    blocks = {k.split(".")[2] for k in state if k.startswith("transformer.h.")}
    wte = state.get("transformer.wte.weight")
    if whole("n_layer") != len(blocks) or wte is None or wte.dim() != 2 or whole("n_embd") != wte.shape[1] \
            or whole("n_head") > whole("n_embd") or whole("block_size") > MAX_BLOCK_SIZE:
        raise CheckpointError(f"'{path}' describes a model (n_layer {model['n_layer']}, n_embd {model['n_embd']}, "
                              f"block_size {model['block_size']}) that its weights do not match: the file is damaged")


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint and reading its header

def checkpoint_path(ckpt):
    """A run directory (best.safetensors when present, else latest.safetensors) or a file -> the file's path."""
    if os.path.isdir(ckpt):
        for name in ("best.safetensors", "latest.safetensors"):
            if os.path.isfile(os.path.join(ckpt, name)):
                return os.path.join(ckpt, name)
        raise CheckpointError(
            f"'{ckpt}' holds no checkpoint (best.safetensors or latest.safetensors): train one with train.py first"
        )
    if os.path.isfile(ckpt):
        return ckpt
    raise CheckpointError(f"checkpoint '{ckpt}' does not exist: pass a run directory or a .safetensors file")


def is_checkpoint(path):
    """Whether path names one of our checkpoints: a file, or a run directory holding best or latest."""
    return os.path.isfile(path) or any(os.path.isfile(os.path.join(path, name))
                                       for name in ("best.safetensors", "latest.safetensors"))


def read_info(path):
    """A checkpoint file's JSON info (config, model, tokenizer, step, ...) from its header alone: no
    tensor is read, so this is cheap whatever the model's size."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"'{path}' is not a readable safetensors checkpoint ({e})") from None
    if meta.get("format") != FORMAT or "info" not in meta:
        raise CheckpointError(f"'{path}' is not a {FORMAT} file (format {meta.get('format')!r})")
    return parse_info(path, meta)


def load_tokenizer(ckpt):
    """The tokenizer of a checkpoint (a run directory or file), read from the file's header only."""
    return tokenizer_from_dict(read_info(checkpoint_path(ckpt))["tokenizer"])


# ---------------------------------------------------------------------------------------------
# Training checkpoints in a run directory: latest (with the one before it kept as previous),
# best, and optionally step_NNNNNNN copies.

def run_files(out_dir):
    return {
        "latest": os.path.join(out_dir, "latest.safetensors"),
        "previous": os.path.join(out_dir, "previous.safetensors"),
        "best": os.path.join(out_dir, "best.safetensors"),
    }


def save_latest(out_dir, keep_last_n, step, *args):
    """Write latest.safetensors, keeping the checkpoint it replaces as previous.safetensors (a hard
    link, so no extra copy is written) and, with keep_last_n > 0, a step_NNNNNNN.safetensors copy."""
    files = run_files(out_dir)
    if os.path.exists(files["latest"]):
        link_atomic(files["latest"], files["previous"])
    save(files["latest"], *args)
    if keep_last_n > 0:
        link_atomic(files["latest"], os.path.join(out_dir, f"step_{step:07d}.safetensors"))
        for old in sorted(glob.glob(os.path.join(out_dir, "step_*.safetensors")))[:-keep_last_n]:
            os.remove(old)


def link_atomic(src, dst):
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        os.link(src, tmp)
    except OSError:  # a filesystem without hard links: go without the extra copy
        return
    os.replace(tmp, dst)


def remove_stale_temporaries(out_dir):
    """A save killed mid-write leaves its temporary file behind; it is never a checkpoint."""
    for path in glob.glob(os.path.join(out_dir, ".*.tmp-*")) + glob.glob(os.path.join(out_dir, "*.tmp-*")):
        os.remove(path)


def load_for_resume(out_dir, device="cpu"):
    """The newest checkpoint in out_dir (latest, previous, best, step_* copies) that loads and
    passes its checksum, warning about any damaged one passed over."""
    latest = run_files(out_dir)["latest"]
    paths = [p for p in run_files(out_dir).values() if os.path.isfile(p)]
    paths += glob.glob(os.path.join(out_dir, "step_*.safetensors"))
    if not paths:
        raise CheckpointError(
            f"no checkpoint in '{out_dir}' to resume from (the run stopped before its first checkpoint): "
            "start it again without --resume"
        )
    by_step = []
    for path in paths:
        try:  # reading the header is cheap; the full load below verifies the checksum
            with safe_open(path, framework="pt") as f:
                by_step.append((json.loads(f.metadata()["info"])["step"], path))
        except Exception as e:
            print(f"warning: skipping damaged checkpoint '{path}': {e}", file=sys.stderr)
    for step, path in sorted(by_step, key=lambda sp: (-sp[0], sp[1] != latest)):  # newest first, latest wins ties
        try:
            ckpt = load(path, device)
        except CheckpointError as e:
            print(f"warning: skipping damaged checkpoint: {e}", file=sys.stderr)
            continue
        if path != latest:
            print(f"warning: resuming from {path} (step {step}), the newest intact checkpoint",
                  file=sys.stderr)
        return ckpt
    raise CheckpointError(f"every checkpoint in '{out_dir}' is damaged ({len(paths)} tried): cannot resume")


def rng_state(device):
    """Every random-number state the next training step depends on: (tensors, JSON-able info)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng_torch": torch.get_rng_state(), "rng_numpy": torch.from_numpy(np_keys.astype(np.int64))}
    if device.type == "cuda":
        tensors["rng_cuda"] = torch.cuda.get_rng_state(device)
    info = {"python": random.getstate(), "numpy": [np_kind, np_pos, np_has_gauss, np_gauss]}
    return tensors, info


def set_rng_state(tensors, info, device):
    torch.set_rng_state(tensors["rng_torch"])
    np_kind, np_pos, np_has_gauss, np_gauss = info["numpy"]
    np.random.set_state((np_kind, tensors["rng_numpy"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "rng_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng_cuda"], device)
