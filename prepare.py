"""
Prepare a corpus for training: read text, tokenize it, write train.bin, val.bin, meta.json.

    python prepare.py SOURCE [--tokenizer char|byte|gpt2] [--out DIR] [--val-fraction F] [--source PATH]

SOURCE is a built-in dataset name or a local text file or directory of text files:
    pystdlib          the local Python installation's standard-library sources (offline, the quickstart corpus)
    shakespeare_char  tinyshakespeare, character-level (downloaded and checksummed, or --source a local copy)
    shakespeare       tinyshakespeare, GPT-2 BPE

The last val_fraction of the text becomes val.bin, as in nanoGPT. Output files are written
under temporary names and renamed when complete; meta.json is written last, so a directory
with a meta.json is always a complete preparation.
"""

import argparse
import glob
import hashlib
import json
import os
import sys
import sysconfig
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

from tokenizer import TokenizerError, build_tokenizer

META_VERSION = 1  # bump when meta.json or the .bin layout changes

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# name -> (default tokenizer, what it is)
BUILTINS = {
    "pystdlib": ("char", "this Python's standard-library sources (offline)"),
    "shakespeare_char": ("char", "tinyshakespeare, character-level"),
    "shakespeare": ("gpt2", "tinyshakespeare, GPT-2 BPE"),
}


class PrepareError(RuntimeError):
    pass


def sha256_of(data):
    return hashlib.sha256(data).hexdigest()


def download(url, sha256, dest):
    """Fetch url into dest (via a temporary file), verifying its sha256. Reuses a good cached copy."""
    if os.path.isfile(dest):
        with open(dest, "rb") as f:
            if sha256_of(f.read()) == sha256:
                return dest
    tmp = dest + ".part"
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="download", leave=False) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise PrepareError(
            f"could not download {url} ({getattr(e, 'reason', e)}): no network? "
            "pass --source PATH to a local copy of the file"
        ) from None
    with open(tmp, "rb") as f:
        got = sha256_of(f.read())
    if got != sha256:
        os.remove(tmp)
        raise PrepareError(f"download of {url} has sha256 {got}, expected {sha256}: the file changed or was corrupted")
    os.replace(tmp, dest)
    return dest


def read_text_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise PrepareError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8")


def read_directory(root):
    """All regular files below root in sorted order, joined by blank lines; binary files are skipped."""
    paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p))
    texts = []
    for p in tqdm(paths, desc="read", unit="file", disable=len(paths) < 200):
        try:
            with open(p, encoding="utf-8") as f:
                texts.append(f.read())
        except UnicodeDecodeError:
            continue
    if not texts:
        raise PrepareError(f"no UTF-8 text files found under '{root}'")
    return "\n\n".join(texts)


def stdlib_corpus():
    """The top-level .py modules of this Python's standard library, sorted by name: real text on
    every machine, and identical for a given Python version."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")))
    if not paths:
        raise PrepareError(f"no standard-library sources found in '{root}' (a Python without its .py files?)")
    return "\n\n".join(read_text_file(p) for p in paths)


def load_source(name, source_path, out_dir):
    """Returns (text, description) for a built-in name or a local path."""
    if name == "pystdlib":
        return stdlib_corpus(), {"name": "pystdlib", "python": sys.version.split()[0]}
    if name in ("shakespeare_char", "shakespeare"):
        if source_path:
            with open(source_path, "rb") as f:
                raw = f.read()
            if sha256_of(raw) != TINYSHAKESPEARE_SHA256:
                raise PrepareError(
                    f"'{source_path}' is not tinyshakespeare (sha256 {sha256_of(raw)}, "
                    f"expected {TINYSHAKESPEARE_SHA256}): pass the unmodified input.txt"
                )
        else:
            os.makedirs(out_dir, exist_ok=True)
            path = download(TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256, os.path.join(out_dir, "input.txt"))
            with open(path, "rb") as f:
                raw = f.read()
        return raw.decode("utf-8"), {"name": "tinyshakespeare", "url": TINYSHAKESPEARE_URL}
    if os.path.isdir(name):
        return read_directory(name), {"name": os.path.abspath(name)}
    if os.path.isfile(name):
        return read_text_file(name), {"name": os.path.abspath(name)}
    raise PrepareError(
        f"'{name}' is neither a built-in dataset ({', '.join(BUILTINS)}) nor an existing file or directory"
    )


def write_atomic(path, write):
    """Call write(file) on a temporary file and rename it to path once complete."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def default_out_dir(name):
    return os.path.join("data", name if name in BUILTINS else os.path.basename(os.path.normpath(name)))


def prepare(name, tokenizer_kind=None, out_dir=None, val_fraction=0.1, source_path=None):
    """Tokenize a corpus into out_dir. Returns the meta dict written to meta.json."""
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    tokenizer_kind = tokenizer_kind or BUILTINS.get(name, ("char",))[0]
    out_dir = out_dir or default_out_dir(name)
    text, source = load_source(name, source_path, out_dir)
    if not text:
        raise PrepareError(f"'{name}' holds no text")
    source["sha256"] = sha256_of(text.encode("utf-8"))
    source["characters"] = len(text)

    tokenizer = build_tokenizer(tokenizer_kind, text)
    split_at = int(len(text) * (1 - val_fraction))
    with tqdm(total=2, desc=f"tokenize ({tokenizer_kind})", unit="split", disable=len(text) < 1_000_000) as bar:
        ids = {}
        for split, part in (("train", text[:split_at]), ("val", text[split_at:])):
            ids[split] = tokenizer.encode_array(part)
            bar.update(1)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32

    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # the directory is incomplete until the new meta.json lands
    for split, arr in ids.items():
        write_atomic(os.path.join(out_dir, f"{split}.bin"), lambda f, a=arr: f.write(a.astype(dtype).tobytes()))
    meta = {
        "version": META_VERSION,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "train_tokens": len(ids["train"]),
        "val_tokens": len(ids["val"]),
        "source": source,
    }
    write_atomic(meta_path, lambda f: f.write(json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8")))
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="SOURCE", help="built-in dataset name, or a text file or directory")
    parser.add_argument("--tokenizer", choices=["char", "byte", "gpt2"], help="default: char (gpt2 for 'shakespeare')")
    parser.add_argument("--out", help="output directory (default: data/<name>)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out for val.bin")
    parser.add_argument("--source", help="local copy of a built-in dataset's download (skips the network)")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.name, args.tokenizer, args.out, args.val_fraction, args.source)
    except (PrepareError, TokenizerError, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
    out = args.out or default_out_dir(args.name)
    print(
        f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"vocab {meta['vocab_size']} ({meta['tokenizer']['type']}), {meta['dtype']}"
    )


if __name__ == "__main__":
    main()
