"""
Preparing a corpus for training: split documents between train and val, tokenize them in chunks on a pool of
processes, and write train.bin, val.bin and meta.json (chat data: with its loss mask and conversation starts).
"""

import collections
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import signal
import sys

import numpy as np
from tqdm import tqdm

from nanoforge import chat_format, chat_tasks, records, tasks
from nanoforge.data import META_VERSION
from nanoforge.datasets import (
    BUILTINS,
    DOLLY_URL,
    download_dolly,
    open_source,
    sha256_of_file,
)
from nanoforge.lock import DirectoryLock
from nanoforge.sources import CHUNK_SIZE, TRAIN, VAL, PrepareError, as_text, pieces
from nanoforge.tokenizer import (
    TokenizerError,
    build_tokenizer,
    check_tokenizer_args,
    tokenizer_from_dict,
    utf8,
    with_chat_tokens,
)

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
    from nanoforge import (
        checkpoint,  # here, not at the top: they import torch, which every worker process would then load
        gpt2,
    )

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
            # "\n" too: a system message is joined to the first user message by "\n\n" (chat_format.check_conversation)
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
        raise chat_format.ChatError("a Dolly record needs 'instruction' and 'response' fields")
    return chat_format.conversation_from_record({"instruction": record["instruction"], "input": record.get("context"),
                                          "output": record["response"]})


def chat_conversations(name, source_path, out_dir, val_fraction, seed):
    """For a chat source (the built-in tasks, dolly, or a JSONL/Parquet file of chat records): its
    description and [(split, where, messages or BadRecord)], else None. Records are split by seed, as
    documents are; each record draws, bad ones too, so skipping bad records moves no good one."""
    if name == "chat_tasks":  # always from their own seed, so eval.py knows the val questions (no --seed)
        train, val = chat_tasks.chat_tasks(chat_tasks.CHAT_TASKS_TRAIN, chat_tasks.CHAT_TASKS_VAL, chat_tasks.CHAT_TASKS_SEED)
        return {"name": name, "seed": chat_tasks.CHAT_TASKS_SEED}, ([(TRAIN, f"train task {i + 1}", m) for i, m in enumerate(train)]
                                + [(VAL, f"val task {i + 1}", m) for i, m in enumerate(val)])
    if name == "arithmetic":  # from the tasks' own seed and train split: rl.py and eval.py hold the test split out
        train, val = tasks.arithmetic_conversations()
        return {"name": name, "seed": tasks.ARITHMETIC_SEED}, ([(TRAIN, f"train problem {i + 1}", m) for i, m in enumerate(train)]
                                + [(VAL, f"val problem {i + 1}", m) for i, m in enumerate(val)])
    if name == "dolly":
        path = source_path or download_dolly(os.path.join(out_dir, "download"))
        description, to_messages = {"name": "dolly", "url": DOLLY_URL}, dolly_messages
    elif os.path.isfile(name) and chat_format.is_chat_file(name):
        path, description, to_messages = name, {"name": os.path.abspath(name)}, chat_format.conversation_from_record
    else:
        return None
    rng = random.Random(seed)
    conversations = [(VAL if rng.random() < val_fraction else TRAIN, where, messages)
                     for where, messages in chat_format.read_conversations(path, to_messages)]
    return {**description, "sha256": sha256_of_file(path)}, conversations


def prepare_chat(description, conversations, make_tokenizer, out_dir, seed, skip_bad):
    """Render [(split, where, messages or BadRecord)] with make_tokenizer(the good conversations'
    texts), a tokenizer with the chat tokens, and write them. A bad record stops
    everything, or with skip_bad is counted, reported and left out."""
    bad = [record for _, _, record in conversations if isinstance(record, records.BadRecord)]
    if bad and not skip_bad:
        raise PrepareError(f"{bad[0]}; fix the record, or pass --skip-bad to leave such records out")
    good = [(split, where, messages) for split, where, messages in conversations if not isinstance(messages, records.BadRecord)]
    tokenizer = make_tokenizer(chat_format.content_text(m["content"]) for _, _, messages in good for m in messages)
    rendered = ([], [])
    for split, where, messages in good:
        try:
            rendered[split].append(chat_format.render_conversation(tokenizer, messages))
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
