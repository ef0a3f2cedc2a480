"""
Prepare a corpus for training: read documents, tokenize them in parallel, write train.bin, val.bin, meta.json.

    python prepare.py SOURCE [--tokenizer char|byte|bpe|gpt2] [--vocab-size N] [--tokenizer-from CKPT] [--out DIR]
                      [--val-fraction F] [--seed S] [--workers N] [--text-field NAME] [--source PATH] [--shards N]
                      [--skip-bad] [--chunk-size N]

SOURCE is a built-in dataset name, or a local file, directory or glob pattern:
    pystdlib          the local Python installation's standard-library sources (offline, the quickstart
                      corpus; one document: the modules joined by blank lines)
    shakespeare_char  tinyshakespeare, character-level (downloaded and checksummed, or --source a local copy)
    shakespeare       tinyshakespeare, GPT-2 BPE (or --tokenizer bpe --vocab-size N: a BPE trained on it)
    fineweb_edu       FineWeb-Edu's 10BT sample: parquet shards from Hugging Face, resumable and
                      checksummed (--shards N takes the first N), GPT-2 BPE
    chat_tasks        chat data: generated conversations of small tasks (offline; the SFT demo)
    dolly             chat data: Databricks Dolly 15k at a pinned revision, resumable and checksummed
                      (or --source a local databricks-dolly-15k.jsonl), GPT-2 BPE
    FILE.jsonl        one document per line: the string under --text-field
    FILE.parquet      one document per row of the --text-field column (needs pyarrow: pip install 'nanoforge[parquet]')
    FILE              any other file is one UTF-8 text document
    DIR or 'GLOB'     every file below DIR (or matching GLOB, ** included), each read as above, in sorted order

A .jsonl or .parquet file is chat data when its first record (JSONL) or its columns (Parquet) hold
`messages` (a list of {"role", "content"}) or Alpaca's `instruction` (with optional `input`, and
`output`). Each conversation is rendered by chat.py with the chat tokens added to the tokenizer, and
written with its loss mask ({split}_mask.bin) and where it starts ({split}_starts.bin). A bad record
stops preparation with its file and line (or row) and the problem; --skip-bad leaves such records out
and counts them (meta.json's skipped_records).

--tokenizer-from CKPT takes the tokenizer of a run directory or checkpoint file (or a Hugging Face GPT-2
directory) instead of building one: to fine-tune that model, or continue training it on other text.

Documents are separated by the end-of-text token (char has none: by a blank line, "\\n\\n"). Each
document (or conversation) goes to val with probability val_fraction, drawn in order from
random.Random(seed). A source of one document (a single text file) keeps nanoGPT's split: its last
val_fraction is val.

The corpus is streamed: documents are read in pieces, tokenized by a pool of --workers processes in
chunks of about --chunk-size characters, and appended to the .bin files in order, so memory stays
bounded by chunk size x workers however large the corpus. Output files are written under temporary
names and renamed when complete; meta.json is written last, so a directory with a meta.json is
always a complete preparation.
"""

import argparse
import codecs
import collections
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import sys
import sysconfig
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

import chat
import records
from data import META_VERSION
from lock import DirectoryInUse, DirectoryLock
from tokenizer import (KINDS, TokenizerError, build_tokenizer, check_tokenizer_args, tokenizer_from_dict, utf8,
                       with_chat_tokens)


TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
# The Hugging Face API lists a folder's files with their sizes and sha256 (Git LFS object ids).
FINEWEB_EDU_API = "https://huggingface.co/api/datasets/HuggingFaceFW/fineweb-edu/tree/main/sample/10BT"
FINEWEB_EDU_URL = "https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"
# Databricks Dolly 15k (CC BY-SA 3.0): 15,011 human-written instruction/response pairs, one JSONL file.
# The revision is pinned: its sha256 is the Git LFS object id the API lists for the file at that commit,
# which no later push can change (we could not read the hash itself without network when writing this).
DOLLY_REVISION = "bdd27f4d94b9c1f951818a7da7fd7aeea5dbff1a"
DOLLY_FILE = "databricks-dolly-15k.jsonl"
DOLLY_API = f"https://huggingface.co/api/datasets/databricks/databricks-dolly-15k/tree/{DOLLY_REVISION}"
DOLLY_URL = f"https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/{DOLLY_REVISION}/{DOLLY_FILE}"

# name -> (default tokenizer, what it is)
BUILTINS = {
    "pystdlib": ("char", "this Python's standard-library sources (offline)"),
    "shakespeare_char": ("char", "tinyshakespeare, character-level"),
    "shakespeare": ("gpt2", "tinyshakespeare, GPT-2 BPE"),
    "fineweb_edu": ("gpt2", "FineWeb-Edu 10BT sample, GPT-2 BPE"),
    "chat_tasks": ("char", "small generated tasks for chat fine-tuning (offline)"),
    "dolly": ("gpt2", "Databricks Dolly 15k instructions and responses, for chat fine-tuning"),
}
CHUNK_SIZE = 1 << 20  # characters of text per task sent to a worker
TRAIN, VAL = 0, 1


class PrepareError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# Downloads: resumable (HTTP Range into a .part file) and checksummed


def sha256_of_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def offline_error(url, e):
    return PrepareError(
        f"could not download {url} ({getattr(e, 'reason', e)}): no network? "
        "pass --source PATH to a local copy of the file"
    )


def download(url, sha256, dest):
    """Fetch url into dest, verifying its sha256. An interrupted download resumes from dest.part
    with an HTTP Range request; a good copy already at dest is reused."""
    if os.path.isfile(dest) and sha256_of_file(dest) == sha256:
        return dest
    tmp = dest + ".part"
    have = os.path.getsize(tmp) if os.path.isfile(tmp) else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            if have and getattr(response, "status", 200) != 206:
                have = 0  # the server ignored the Range header: start again
            total = int(response.headers.get("Content-Length") or 0) + have or None
            with open(tmp, "ab" if have else "wb") as out, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest), leave=False
            ) as bar:
                while block := response.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        raise offline_error(url, e) from None
    got = sha256_of_file(tmp)
    if got != sha256:
        os.remove(tmp)
        raise PrepareError(f"download of {url} has sha256 {got}, expected {sha256}: the file changed or was corrupted")
    os.replace(tmp, dest)
    return dest


def hf_listing(api_url):
    """A Hugging Face API folder listing: [{"path", "size", "lfs": {"oid": sha256, ...}}, ...]."""
    try:
        with urllib.request.urlopen(api_url, timeout=30) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError) as e:
        raise offline_error(api_url, e) from None


def download_dolly(download_dir):
    """Download Dolly 15k at its pinned revision, checked against the sha256 the API lists for it."""
    listed = [f for f in hf_listing(DOLLY_API) if f.get("path") == DOLLY_FILE and "lfs" in f]
    if not listed:
        raise PrepareError(f"{DOLLY_API} does not list {DOLLY_FILE}: pass --source PATH to a local copy of it")
    os.makedirs(download_dir, exist_ok=True)
    return download(DOLLY_URL, listed[0]["lfs"]["oid"], os.path.join(download_dir, DOLLY_FILE))


def fineweb_edu_shards(download_dir, shards):
    """Download the first `shards` parquet files of FineWeb-Edu's 10BT sample (all when None)."""
    listing = hf_listing(FINEWEB_EDU_API)
    files = sorted((f for f in listing if f.get("path", "").endswith(".parquet")), key=lambda f: f["path"])
    if not files:
        raise PrepareError(f"{FINEWEB_EDU_API} lists no parquet files: the dataset layout changed")
    os.makedirs(download_dir, exist_ok=True)
    paths = []
    for f in tqdm(files[:shards], desc="shards", unit="shard", disable=len(files[:shards]) < 2):
        dest = os.path.join(download_dir, os.path.basename(f["path"]))
        paths.append(download(FINEWEB_EDU_URL + f["path"], f["lfs"]["oid"], dest))
    return paths


# ---------------------------------------------------------------------------------------------
# Sources: a source yields documents; a document is an iterator of text pieces


class Source:
    def __init__(self, description, documents, total_bytes=None, single_document=False):
        self.description = description  # JSON-able, recorded in meta.json
        self.documents = documents  # () -> iterator of documents; each call starts from the beginning
        self.total_bytes = total_bytes  # for progress; None when unknown
        self.single_document = single_document  # yields the train head and val tail of one document
        self.current_file = None  # of several files, the one being read (to name it in errors)


def is_text(path):
    """Whether the file starts like UTF-8 text (no NUL bytes, decodes)."""
    with open(path, "rb") as f:
        head = f.read(1 << 13)
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head)
    except UnicodeDecodeError:
        return False
    return b"\x00" not in head


def read_text(path, start=0, end=None, block=CHUNK_SIZE):
    """UTF-8 text of path's bytes [start, end) in blocks."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    end = os.path.getsize(path) if end is None else end
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        while pos < end:
            data = f.read(min(block, end - pos))
            try:
                text = decoder.decode(data, final=pos + len(data) >= end)
            except UnicodeDecodeError as e:
                raise PrepareError(
                    f"'{path}' is not UTF-8 text ({e.reason} at byte {pos + e.start}): convert it to UTF-8"
                ) from None
            pos += len(data)
            yield text


def seam(text, size):
    """Where to cut text near size so that encoding the two parts gives the same tokens as
    encoding the whole: after a newline between two non-space characters, which every GPT-2 and
    GPT-4 style pre-split regex cuts at. Else after the last newline, else at size (a document
    without such places may then tokenize differently at that one seam)."""
    last_newline = i = text.rfind("\n", size // 2, size)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", size // 2, i)
    return last_newline + 1 if last_newline > 0 else size


def pieces(blocks, size):
    """Re-cut a stream of text blocks into pieces of about size characters at seams."""
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) > size:
            cut = seam(buf, size)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def as_text(piece):
    """A piece's text. A JSONL document travels as (raw line, field, path, line number) and is parsed
    where it is encoded, in a worker, not in the process that reads (a plain tuple pickles fast)."""
    if isinstance(piece, str):
        return piece
    raw, field, path, n = piece
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"'{path}' line {n} is not JSON in UTF-8 ({e}): one JSON object per line expected") from None
    text = record.get(field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        if chat.is_chat_record(record):  # chat records reach here only from a directory or glob of files
            raise PrepareError(f"'{path}' line {n} is a chat record: chat data is read from one file at a time: "
                               "pass the file itself (or join the files into one)")
        fields = ", ".join(record) if isinstance(record, dict) else "none: not an object"
        raise PrepareError(f"'{path}' line {n} has no string field '{field}' (fields: {fields}): pass --text-field NAME")
    return text


def jsonl_documents(path, field):
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                yield [(line, field, path, n)]


def parquet_documents(path, field, chunk_size):
    f = records.parquet_file(path)
    if field not in f.schema_arrow.names:
        raise PrepareError(
            f"'{path}' has no column '{field}' (columns: {', '.join(f.schema_arrow.names)}): pass --text-field NAME"
        )
    for batch in f.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield pieces([text], chunk_size)


def file_documents(path, field, chunk_size):
    """The documents of one file of several, by its extension; binary files are skipped."""
    if path.endswith(".jsonl"):
        return jsonl_documents(path, field)
    if path.endswith(".parquet"):
        return parquet_documents(path, field, chunk_size)
    return iter([pieces(read_text(path), chunk_size)] if is_text(path) else [])


def files_source(paths, description, field, chunk_size):
    """Several files, each holding one or more documents."""

    def documents():
        for p in paths:
            source.current_file = p
            yield from file_documents(p, field, chunk_size)

    source = Source(description, documents, sum(map(os.path.getsize, paths)))
    return source


def text_file_source(path, description, val_fraction, chunk_size):
    """One text file as one document: its first 1 - val_fraction of bytes train, the rest val
    (moved forward to the start of a UTF-8 character)."""
    size = os.path.getsize(path)
    cut = int(size * (1 - val_fraction))
    with open(path, "rb") as f:
        f.seek(cut)
        cut += len(re.match(rb"[\x80-\xbf]*", f.read(4)).group())

    def documents():
        yield pieces(read_text(path, 0, cut), chunk_size)
        yield pieces(read_text(path, cut, size), chunk_size)

    return Source(description, documents, size, single_document=True)


def stdlib_source(val_fraction, chunk_size):
    """The top-level .py modules of this Python's standard library, sorted by name: real text on
    every machine, identical for a given Python version. Joined by blank lines into one document
    (9 MB) and split at its last val_fraction of characters, as before documents existed, so that
    the quickstart's data, and the numbers measured on it, stay the same."""
    root = sysconfig.get_paths()["stdlib"]
    paths = sorted(glob.glob(os.path.join(root, "*.py")))
    if not paths:
        raise PrepareError(f"no standard-library sources found in '{root}' (a Python without its .py files?)")
    text = "\n\n".join("".join(read_text(p)) for p in paths)
    cut = int(len(text) * (1 - val_fraction))
    description = {"name": "pystdlib", "python": sys.version.split()[0], "files": len(paths)}
    return Source(description, lambda: iter([pieces([text[:cut]], chunk_size), pieces([text[cut:]], chunk_size)]),
                  len(text), single_document=True)


def tinyshakespeare(source_path, out_dir):
    if not source_path:
        os.makedirs(out_dir, exist_ok=True)
        return download(TINYSHAKESPEARE_URL, TINYSHAKESPEARE_SHA256, os.path.join(out_dir, "input.txt"))
    if sha256_of_file(source_path) != TINYSHAKESPEARE_SHA256:
        raise PrepareError(
            f"'{source_path}' is not tinyshakespeare (sha256 {sha256_of_file(source_path)}, "
            f"expected {TINYSHAKESPEARE_SHA256}): pass the unmodified input.txt"
        )
    return source_path


def open_source(name, source_path, out_dir, val_fraction, text_field="text", shards=None, chunk_size=CHUNK_SIZE):
    """The Source for a built-in name, a file, a directory or a glob pattern."""
    if name == "pystdlib":
        return stdlib_source(val_fraction, chunk_size)
    if name in ("shakespeare_char", "shakespeare"):
        path = tinyshakespeare(source_path, out_dir)
        return text_file_source(path, {"name": "tinyshakespeare", "url": TINYSHAKESPEARE_URL}, val_fraction, chunk_size)
    if name == "fineweb_edu":
        if source_path:
            paths = sorted(glob.glob(os.path.join(source_path, "*.parquet")))[:shards]
            if not paths:
                raise PrepareError(f"no .parquet files in '{source_path}': pass the directory of downloaded shards")
        else:
            paths = fineweb_edu_shards(os.path.join(out_dir, "download"), shards)
        return files_source(paths, {"name": "fineweb_edu", "url": FINEWEB_EDU_API, "shards": len(paths)}, "text", chunk_size)
    if os.path.isfile(name):
        description = {"name": os.path.abspath(name)}
        if name.endswith((".jsonl", ".parquet")):
            return files_source([name], description, text_field, chunk_size)
        return text_file_source(name, description, val_fraction, chunk_size)
    if os.path.isdir(name):
        paths = glob.glob(os.path.join(name, "**", "*"), recursive=True)
    else:
        paths = glob.glob(name, recursive=True) if glob.has_magic(name) else []
    paths = sorted(p for p in paths if os.path.isfile(p))
    if not paths:
        raise PrepareError(
            f"'{name}' is neither a built-in dataset ({', '.join(BUILTINS)}) nor an existing file, "
            "directory or glob pattern matching files"
        )
    return files_source(paths, {"name": os.path.abspath(name) if os.path.isdir(name) else name}, text_field, chunk_size)


# ---------------------------------------------------------------------------------------------
# The pipeline: split documents, cut them into chunks, encode the chunks in a pool, write in order


def split_pieces(source, val_fraction, seed):
    """(split, text, starts_document) for every piece of every document, in source order."""
    rng = random.Random(seed)
    for i, doc in enumerate(source.documents()):
        to_val = i == 1 if source.single_document else rng.random() < val_fraction
        first = True
        for text in doc:
            yield (VAL if to_val else TRAIN), text, first
            first = False


def chunks(items, size, documents):
    """Group pieces into lists of about size characters; a piece that starts a document other than
    the first of its split is marked to be preceded by the separator. Counts documents per split."""
    chunk, n = [], 0
    for split, text, first in items:
        chunk.append((split, text, first and documents[split] > 0))
        documents[split] += first
        n += len(text) if isinstance(text, str) else len(text[0])
        if n >= size:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def encode_chunk(chunk, tokenizer, dtype):
    """Token ids of one chunk: an array for each split."""
    separator = [tokenizer.eot_id] if tokenizer.eot_id is not None else tokenizer.encode("\n\n")
    parts = ([], [])
    for split, text, separate in chunk:
        if separate:
            parts[split].append(np.array(separator, dtype=dtype))
        parts[split].append(tokenizer.encode_array(as_text(text), dtype))
    return [np.concatenate(p) if p else np.empty(0, dtype) for p in parts]


_worker = {}  # the tokenizer and dtype of a pool worker process


def _init_worker(tokenizer_dict, dtype):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _worker["tokenizer"], _worker["dtype"] = tokenizer_from_dict(tokenizer_dict), dtype


def _encode_in_worker(chunk):
    return encode_chunk(chunk, _worker["tokenizer"], _worker["dtype"])


def encoded_chunks(chunk_iter, tokenizer, dtype, workers):
    """encode_chunk over chunk_iter in order. With workers > 1, a spawned process pool works on at
    most 2 x workers chunks at a time, so reading never runs ahead of encoding unboundedly."""
    if workers == 1:
        for chunk in chunk_iter:
            yield chunk, encode_chunk(chunk, tokenizer, dtype)
        return
    context = multiprocessing.get_context("spawn")  # fork is unsafe beside rustbpe's and tqdm's threads
    with context.Pool(workers, _init_worker, (tokenizer.to_dict(), dtype)) as pool:
        pending = collections.deque()
        for chunk in chunk_iter:
            pending.append((chunk, pool.apply_async(_encode_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                chunk, result = pending.popleft()
                yield chunk, result.get()
        while pending:
            chunk, result = pending.popleft()
            yield chunk, result.get()


def training_texts(source, val_fraction, seed):
    """Train-split text in pieces of at most 64K characters, for tokenizer training."""
    for split, text, _ in split_pieces(source, val_fraction, seed):
        if split == TRAIN:
            yield from pieces([as_text(text)], 1 << 16)


def default_out_dir(name):
    if name in BUILTINS:
        return os.path.join("data", name)
    base = os.path.basename(os.path.normpath(re.split(r"[*?[]", name)[0] or "."))  # a glob: its fixed part
    return os.path.join("data", base if base not in ("", ".", "..") else "corpus")


def prepare(name, tokenizer_kind=None, out_dir=None, val_fraction=0.1, source_path=None, vocab_size=None,
            workers=None, seed=1337, text_field="text", shards=None, chunk_size=CHUNK_SIZE, tokenizer_from=None,
            skip_bad=False):
    """Tokenize a corpus into out_dir. Returns the meta dict written to meta.json."""
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}")
    if tokenizer_from is not None and (tokenizer_kind is not None or vocab_size is not None):
        raise PrepareError("--tokenizer-from takes the checkpoint's tokenizer: drop --tokenizer and --vocab-size")
    if tokenizer_from is None:
        tokenizer_kind = tokenizer_kind or BUILTINS.get(name, ("char",))[0]
        check_tokenizer_args(tokenizer_kind, vocab_size)
    out_dir = out_dir or default_out_dir(name)
    with DirectoryLock(out_dir, "prepare.py", "wait for it to finish or stop it, or choose another --out"):
        return prepare_locked(name, tokenizer_kind, out_dir, val_fraction, source_path, vocab_size, workers, seed,
                              text_field, shards, chunk_size, tokenizer_from, skip_bad)


def checkpoint_tokenizer(ckpt):
    """The tokenizer of one of our checkpoints (a run directory or file, read from the file's header
    alone), or of a Hugging Face GPT-2 directory (its vocab.json and merges.txt, or tokenizer.json)."""
    import checkpoint  # here, not at the top: they import torch, which every worker process would then load
    import gpt2

    try:
        if not checkpoint.is_checkpoint(ckpt) and os.path.isfile(os.path.join(ckpt, "config.json")):
            tokenizer = gpt2.tokenizer_from_hf(ckpt)
            if tokenizer is None:
                raise PrepareError(f"--tokenizer-from: '{ckpt}' holds no tokenizer files (vocab.json and merges.txt, "
                                   "or tokenizer.json): use --tokenizer gpt2 for OpenAI's GPT-2")
            return tokenizer
        return checkpoint.load_tokenizer(ckpt)
    except (checkpoint.CheckpointError, gpt2.GPT2Error) as e:
        raise PrepareError(f"--tokenizer-from: {e}") from None


def prepare_locked(name, tokenizer_kind, out_dir, val_fraction, source_path, vocab_size, workers, seed, text_field,
                   shards, chunk_size, tokenizer_from, skip_bad):
    """prepare(), in an output directory this process has locked."""
    base = checkpoint_tokenizer(tokenizer_from) if tokenizer_from is not None else None
    found = chat_conversations(name, source_path, out_dir, val_fraction, seed)
    if found is not None:
        if base is not None:
            make_tokenizer = lambda texts: with_chat_tokens(base)  # noqa: E731
        else:
            # "\n" too: a system message is joined to the first user message by "\n\n" (chat.check_conversation)
            make_tokenizer = lambda texts: with_chat_tokens(  # noqa: E731
                build_tokenizer(tokenizer_kind, itertools.chain(texts, ["\n"]), vocab_size))
        return prepare_chat(*found, make_tokenizer, out_dir, seed, skip_bad)
    if skip_bad:
        raise PrepareError(f"--skip-bad applies to chat records, and '{name}' holds none: drop --skip-bad")
    source = open_source(name, source_path, out_dir, val_fraction, text_field, shards, chunk_size)

    if base is not None:  # continued pretraining: the checkpoint's tokenizer, chat tokens and all
        tokenizer = base
        if tokenizer.kind == "char":
            check_characters(source, tokenizer, val_fraction, seed, tokenizer_from)
    elif tokenizer_kind == "char":  # the vocabulary covers the whole corpus (and the "\n\n" separator)
        texts = (as_text(text) for _, text, _ in split_pieces(source, val_fraction, seed))
        tokenizer = build_tokenizer("char", itertools.chain(texts_with_progress(texts, source, "chars"), ["\n"]))
    elif tokenizer_kind == "bpe":
        os.environ.setdefault("RAYON_NUM_THREADS", str(workers))  # rustbpe's threads
        texts = training_texts(source, val_fraction, seed)
        tokenizer = build_tokenizer("bpe", texts_with_progress(texts, source, "train bpe"), vocab_size)
    else:
        tokenizer = build_tokenizer(tokenizer_kind, vocab_size=vocab_size)
    return write_splits(source, tokenizer, out_dir, val_fraction, seed, workers, chunk_size)


def check_characters(source, tokenizer, val_fraction, seed, ckpt):
    """A char vocabulary taken from a checkpoint may lack characters of the new corpus: find the first
    one before anything is written, and name where it is (the file and line, or the JSONL line)."""
    known = set(tokenizer.base.chars if hasattr(tokenizer, "base") else tokenizer.chars) | {"\n"}
    file, row, line = None, 0, 1
    for _, piece, first in split_pieces(source, val_fraction, seed):
        if first and not source.single_document:
            row, line = (row + 1, 1) if source.current_file == file else (1, 1)
            file = source.current_file
        text = as_text(piece)
        unknown = set(text) - known
        if unknown:
            at = min(text.index(c) for c in unknown)
            if isinstance(piece, tuple):  # a JSONL record: (raw line, field, path, line number)
                where = f"'{piece[2]}' line {piece[3]}"
            elif file is not None and file.endswith(".parquet"):
                where = f"'{file}' row {row}"
            else:  # a text file: the one being read, or the single document's
                where = f"'{file or source.description['name']}' line {line + text.count(chr(10), 0, at)}"
            raise PrepareError(f"{where} has character {text[at]!r} (U+{ord(text[at]):04X}), which the char "
                               f"vocabulary of '{ckpt}' lacks: remove such characters from the corpus")
        line += text.count("\n")


def write_splits(source, tokenizer, out_dir, val_fraction, seed, workers, chunk_size=CHUNK_SIZE):
    """Encode every document of source into out_dir's train.bin and val.bin, then write meta.json."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    if source.total_bytes is not None and source.total_bytes < 2 * chunk_size:
        workers = 1  # starting processes costs more than a pool saves on a corpus this small

    os.makedirs(out_dir, exist_ok=True)
    paths = {split: os.path.join(out_dir, f"{split}.bin") for split in ("train", "val")}
    meta_path = os.path.join(out_dir, "meta.json")
    for path in (meta_path, *paths.values()):  # nothing complete-looking stays while we work
        if os.path.exists(path):
            os.remove(path)
    tmp = [paths["train"] + ".tmp", paths["val"] + ".tmp"]
    tokens, documents, nbytes, digest = [0, 0], [0, 0], 0, hashlib.sha256()
    try:
        with open(tmp[TRAIN], "wb") as train_file, open(tmp[VAL], "wb") as val_file, tqdm(
            total=source.total_bytes, unit="B", unit_scale=True, desc=f"tokenize ({tokenizer.kind})",
            disable=is_small(source),
        ) as bar:
            files = (train_file, val_file)
            for chunk, arrays in encoded_chunks(
                chunks(split_pieces(source, val_fraction, seed), chunk_size, documents), tokenizer, dtype, workers
            ):
                for split, arr in enumerate(arrays):
                    files[split].write(arr.tobytes())
                    tokens[split] += len(arr)
                chunk_bytes = 0
                for split, text, _ in chunk:
                    data = utf8(text) if isinstance(text, str) else text[0]
                    digest.update(data)
                    chunk_bytes += len(data)
                nbytes += chunk_bytes
                bar.update(chunk_bytes)
                bar.set_postfix_str(f"{sum(tokens) / 1e6:.1f}M tokens, "
                                    f"{sum(tokens) / max(bar.format_dict['elapsed'], 1e-9) / 1e6:.2f}M tok/s")
            for f in files:
                f.flush()
                os.fsync(f.fileno())
        if not nbytes:
            raise PrepareError(f"'{source.description['name']}' holds no text")
        for split, label in ((TRAIN, "train"), (VAL, "val")):
            if not tokens[split]:
                raise PrepareError(
                    f"{label} split is empty: '{source.description['name']}' has {sum(documents)} documents "
                    f"and none went to {label}; "
                    "choose another --val-fraction or --seed, or use more documents"
                )
        os.replace(tmp[TRAIN], paths["train"])
        os.replace(tmp[VAL], paths["val"])
    finally:
        for path in tmp:
            if os.path.exists(path):
                os.remove(path)
    meta = {
        "version": META_VERSION,
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": np.dtype(dtype).name,
        "train_tokens": tokens[TRAIN],
        "val_tokens": tokens[VAL],
        "train_documents": documents[TRAIN],
        "val_documents": documents[VAL],
        "split": "tail" if source.single_document else "document",
        "seed": seed,
        "source": {**source.description, "bytes": nbytes, "sha256": digest.hexdigest()},
    }
    write_meta(meta_path, meta)
    return meta


# ---------------------------------------------------------------------------------------------
# Chat data: conversations rendered in the chat format, with a loss mask and conversation starts

def dolly_messages(record):
    """A Databricks Dolly record (instruction, context, response, category) -> messages."""
    if not isinstance(record, dict) or not {"instruction", "response"} <= set(record):
        raise chat.ChatError("a Dolly record needs 'instruction' and 'response' fields")
    return chat.conversation_from_record({"instruction": record["instruction"], "input": record.get("context"),
                                          "output": record["response"]})


def chat_conversations(name, source_path, out_dir, val_fraction, seed):
    """For a chat source (the built-in tasks, dolly, or a JSONL/Parquet file of chat records): its
    description and [(split, where, messages or BadRecord)], else None. Records are split by seed, as
    documents are; each record draws, bad ones too, so skipping bad records moves no good one."""
    if name == "chat_tasks":  # always from their own seed, so eval.py knows the val questions (no --seed)
        train, val = chat.chat_tasks(chat.CHAT_TASKS_TRAIN, chat.CHAT_TASKS_VAL, chat.CHAT_TASKS_SEED)
        return {"name": name, "seed": chat.CHAT_TASKS_SEED}, ([(TRAIN, f"train task {i + 1}", m) for i, m in enumerate(train)]
                                + [(VAL, f"val task {i + 1}", m) for i, m in enumerate(val)])
    if name == "dolly":
        path = source_path or download_dolly(os.path.join(out_dir, "download"))
        description, to_messages = {"name": "dolly", "url": DOLLY_URL}, dolly_messages
    elif os.path.isfile(name) and chat.is_chat_file(name):
        path, description, to_messages = name, {"name": os.path.abspath(name)}, chat.conversation_from_record
    else:
        return None
    rng = random.Random(seed)
    conversations = [(VAL if rng.random() < val_fraction else TRAIN, where, messages)
                     for where, messages in chat.read_conversations(path, to_messages)]
    return {**description, "sha256": sha256_of_file(path)}, conversations


def prepare_chat(description, conversations, make_tokenizer, out_dir, seed, skip_bad):
    """Render [(split, where, messages or BadRecord)] with make_tokenizer(the good conversations'
    texts), a tokenizer with the chat tokens, and write them. A bad record stops
    everything, or with skip_bad is counted, reported and left out."""
    bad = [record for _, _, record in conversations if isinstance(record, records.BadRecord)]
    if bad and not skip_bad:
        raise PrepareError(f"{bad[0]}; fix the record, or pass --skip-bad to leave such records out")
    good = [(split, where, messages) for split, where, messages in conversations if not isinstance(messages, records.BadRecord)]
    tokenizer = make_tokenizer(m["content"] for _, _, messages in good for m in messages)
    rendered = ([], [])
    for split, where, messages in good:
        try:
            rendered[split].append(chat.render_conversation(tokenizer, messages))
        except TokenizerError as e:  # a checkpoint's char vocabulary lacks a character of this record
            if not skip_bad:
                raise PrepareError(f"{where}: {e}; or pass --skip-bad to leave such records out") from None
            bad.append(records.BadRecord(f"{where}: {e}"))
    if bad:
        print(f"prepare.py: skipped {len(bad)} bad record(s) (--skip-bad); the first: {bad[0]}", file=sys.stderr)
    return write_chat_splits(rendered, tokenizer, out_dir, description, seed, len(bad))


def write_chat_splits(rendered, tokenizer, out_dir, description, seed, skipped=0):
    """rendered: (train, val), each a list of (ids, mask). Writes {split}.bin, {split}_mask.bin and
    {split}_starts.bin for each split (temporary names, renamed when complete), then meta.json last."""
    for split, label in ((TRAIN, "train"), (VAL, "val")):
        if not rendered[split]:
            raise PrepareError(f"{label} split is empty: '{description['name']}' has {sum(map(len, rendered))} "
                               f"conversations and none went to {label}; choose another --val-fraction or --seed")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        os.remove(meta_path)  # nothing complete-looking stays while we work
    meta = {"version": META_VERSION, "tokenizer": tokenizer.to_dict(), "vocab_size": tokenizer.vocab_size,
            "dtype": np.dtype(dtype).name, "chat": True, "seed": seed, "source": description,
            "skipped_records": skipped}
    files = []
    for split, label in ((TRAIN, "train"), (VAL, "val")):
        pairs = rendered[split]
        lengths = np.array([len(ids) for ids, _ in pairs], dtype=np.int64)
        arrays = {f"{label}.bin": np.concatenate([np.asarray(ids, dtype) for ids, _ in pairs]),
                  f"{label}_mask.bin": np.concatenate([np.asarray(mask, np.uint8) for _, mask in pairs]),
                  f"{label}_starts.bin": np.cumsum(lengths) - lengths}
        files += arrays.items()
        meta.update({f"{label}_tokens": int(lengths.sum()), f"{label}_conversations": len(pairs),
                     f"{label}_documents": len(pairs)})
    try:
        for filename, array in files:
            with open(os.path.join(out_dir, filename + ".tmp"), "wb") as f:
                f.write(array.tobytes())
                f.flush()
                os.fsync(f.fileno())
        for filename, _ in files:
            os.replace(os.path.join(out_dir, filename + ".tmp"), os.path.join(out_dir, filename))
    finally:
        for filename, _ in files:
            if os.path.exists(os.path.join(out_dir, filename + ".tmp")):
                os.remove(os.path.join(out_dir, filename + ".tmp"))
    write_meta(meta_path, meta)
    return meta


def write_meta(meta_path, meta):
    """meta.json, written last and atomically: a directory with a meta.json is a complete preparation."""
    with open(meta_path + ".tmp", "wb") as f:
        f.write(json.dumps(meta, indent=2, ensure_ascii=False).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(meta_path + ".tmp", meta_path)


def is_small(source):
    """Known to be under 8 MB: done in seconds, so no progress bar (a source of unknown size gets one)."""
    return source.total_bytes is not None and source.total_bytes < 1 << 23


def texts_with_progress(texts, source, desc):
    """Pass texts through, showing a byte progress bar for large sources."""
    with tqdm(total=source.total_bytes, unit="B", unit_scale=True, desc=desc,
              disable=is_small(source)) as bar:
        for text in texts:
            yield text
            bar.update(len(text))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="SOURCE", help="built-in dataset name, or a file, directory or glob pattern")
    parser.add_argument("--tokenizer", choices=KINDS, help="default: char (gpt2 for shakespeare, fineweb_edu, dolly)")
    parser.add_argument("--tokenizer-from", metavar="CKPT",
                        help="the tokenizer of this run directory, checkpoint file or Hugging Face GPT-2 directory "
                             "(to fine-tune or continue training it)")
    parser.add_argument("--vocab-size", type=int, help="with --tokenizer bpe: tokens to learn, end-of-text included")
    parser.add_argument("--out", help="output directory (default: data/<name>)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of documents held out for val.bin")
    parser.add_argument("--seed", type=int, default=1337, help="seed of the document split (chat_tasks has its own)")
    parser.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    parser.add_argument("--text-field", default="text", help="JSONL field or Parquet column holding the text")
    parser.add_argument("--source", help="local copy of a built-in dataset's download (skips the network)")
    parser.add_argument("--shards", type=int, help="fineweb_edu: download and use only the first N shards")
    parser.add_argument("--skip-bad", action="store_true",
                        help="chat data: leave out bad records (counted and reported) instead of stopping")
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                        help="characters per task sent to a worker; memory grows with chunk size x workers")
    args = parser.parse_args(argv)
    try:
        meta = prepare(args.name, args.tokenizer, args.out, args.val_fraction, args.source, args.vocab_size,
                       args.workers, args.seed, args.text_field, args.shards, args.chunk_size, args.tokenizer_from,
                       args.skip_bad)
    except (PrepareError, records.RecordError, TokenizerError, DirectoryInUse, OSError) as e:
        sys.exit(f"prepare.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("prepare.py: interrupted: nothing was written (no meta.json); run the command again")
    out = args.out or default_out_dir(args.name)
    print(
        f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['train_documents']:,} + {meta['val_documents']:,} {'conversations' if meta.get('chat') else 'documents'}), "
        f"vocab {meta['vocab_size']} ({meta['tokenizer']['type']}), {meta['dtype']}"
    )


if __name__ == "__main__":
    main()
