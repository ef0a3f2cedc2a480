"""
Prepared data on disk, and random batches drawn from it.

A prepared data directory holds train.bin and val.bin (token ids as a flat array of
uint16 or uint32) and meta.json (the tokenizer, vocab size, dtype and token counts).
The .bin files are memory-mapped, never read whole into RAM.

Chat data (meta.json has "chat": true) holds conversations rendered by chat_format, one after another,
and beside each split's .bin two more files:
    {split}_mask.bin    uint8, one per token: 1 where the token is one the model learns to say
    {split}_starts.bin  int64, one per conversation: the index of its first token (<|bos|>)
A batch of chat data holds one conversation per row, from its start, so a conversation never attends
to another; rows are padded on the right to the longest in the batch (causal attention means no real
token ever sees the padding), and targets the loss must ignore are -1: padding and every token whose
mask is 0. A conversation longer than block_size + 1 tokens is cut to that length, and one left with
nothing to learn by the cut is never drawn; Dataset.notes counts both.
"""

import json
import os

import numpy as np

from nanoforge.errors import UserError
from nanoforge.tokenizer import tokenizer_from_dict

META_VERSION = 1  # bump when meta.json or the .bin layout changes


class DataError(UserError):
    """A prepared data directory that is missing, incomplete or inconsistent."""


def read_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    fix = f"run `python prepare.py SOURCE --out {data_dir}` to prepare it"
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory '{data_dir}' does not exist: {fix}")
    if not os.path.isfile(path):
        raise DataError(f"'{data_dir}' has no meta.json (not prepared, or preparation did not finish): {fix}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"'{path}' is not valid JSON ({e}): {fix}")
    if not isinstance(meta, dict):
        raise DataError(f"'{path}' holds {type(meta).__name__}, not a JSON object: {fix}")
    if meta.get("version") != META_VERSION:
        raise DataError(f"'{path}' has format version {meta.get('version')!r}, expected {META_VERSION}: {fix}")
    check_meta_fields(meta, path, fix)
    return meta


def check_meta_fields(meta, path, fix):
    """The fields every reader uses, of the types and ranges preparation writes (a hand-edited or damaged
    meta.json fails here, in one line, rather than deep inside numpy or the model)."""
    counts = ["vocab_size", "train_tokens", "val_tokens"]
    if meta.get("chat") is not None and not isinstance(meta["chat"], bool):
        raise DataError(f"'{path}' has chat = {meta['chat']!r}, expected true or false: {fix}")
    if meta.get("chat"):
        counts += ["train_conversations", "val_conversations"]
    for key in counts:
        value = meta.get(key)
        if type(value) is not int or value < 0 or (key == "vocab_size" and value == 0):
            least = "a positive" if key == "vocab_size" else "a non-negative"
            raise DataError(f"'{path}' has {key} = {value!r}, expected {least} whole number: {fix}")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"'{path}' has dtype = {meta.get('dtype')!r}, expected 'uint16' or 'uint32': {fix}")
    if meta["vocab_size"] > np.iinfo(meta["dtype"]).max + 1:
        raise DataError(f"'{path}' has vocab_size = {meta['vocab_size']}, more ids than {meta['dtype']} holds: {fix}")
    if not isinstance(meta.get("tokenizer"), dict):
        raise DataError(f"'{path}' has tokenizer = {meta.get('tokenizer')!r}, expected its JSON description: {fix}")


def open_array(data_dir, name, dtype, count):
    """Memory-map DIR/name, checking that it holds count items of dtype as meta.json says."""
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise DataError(f"'{path}' is missing: run `python prepare.py SOURCE --out {data_dir}` again")
    dtype = np.dtype(dtype)
    size = os.path.getsize(path)
    if size != count * dtype.itemsize:
        raise DataError(
            f"'{path}' holds {size} bytes but meta.json says {count} items of {dtype.name} "
            f"({count * dtype.itemsize} bytes): the file is truncated or from another preparation; prepare the data again"
        )
    return np.memmap(path, dtype=dtype, mode="r") if count else np.empty(0, dtype)


def open_split(data_dir, split, meta):
    """Memory-map train.bin or val.bin and check it against meta.json."""
    tokens = open_array(data_dir, f"{split}.bin", meta["dtype"], meta[f"{split}_tokens"])
    # A cheap look at the head of each file catches .bin files written with another dtype or tokenizer.
    largest = int(tokens[: 1 << 20].max()) if len(tokens) else 0
    if largest >= meta["vocab_size"]:
        raise DataError(
            f"{split}.bin in '{data_dir}' holds token id {largest} but meta.json's vocabulary has "
            f"{meta['vocab_size']} tokens: the .bin files do not match meta.json; prepare the data again"
        )
    return tokens


def open_chat_split(data_dir, split, meta, n_tokens):
    """(loss mask, conversation starts) of a chat split, checked: one mask byte per token, and starts that
    begin at 0 and rise strictly within the tokens (each conversation holds at least one token)."""
    mask = open_array(data_dir, f"{split}_mask.bin", np.uint8, n_tokens)
    starts = open_array(data_dir, f"{split}_starts.bin", np.int64, meta[f"{split}_conversations"])
    if len(starts) and (starts[0] != 0 or (np.diff(starts) <= 0).any() or starts[-1] >= n_tokens):
        raise DataError(f"{split}_starts.bin in '{data_dir}' does not hold rising conversation starts from 0 "
                        f"within {split}.bin's {n_tokens} tokens: the files are damaged; prepare the data again")
    if n_tokens and not len(starts):
        raise DataError(f"{split}.bin in '{data_dir}' holds {n_tokens} tokens but no conversation starts: "
                        "the files are damaged; prepare the data again")
    return mask, starts


class ChatSplit:
    """One split of chat data: its tokens, loss mask and conversation starts, and which conversations
    batches may draw (those with something to learn within block_size + 1 tokens)."""

    def __init__(self, data_dir, split, meta, tokens, block_size):
        self.tokens = tokens
        self.mask, self.starts = open_chat_split(data_dir, split, meta, len(tokens))
        lengths = np.diff(np.append(self.starts, len(tokens)))
        position = np.arange(len(tokens)) - np.repeat(self.starts, lengths)  # of each token in its conversation
        # A token can be a target when it is masked in and within the first block_size + 1 of its conversation.
        target = (self.mask.astype(bool) & (position >= 1) & (position <= block_size)).astype(np.int64)
        learnable = np.add.reduceat(target, self.starts) > 0 if len(self.starts) else np.zeros(0, bool)
        self.drawable = np.flatnonzero(learnable)  # conversation indices batches draw from
        self.ends = self.starts + lengths
        self.truncated = int((lengths > block_size + 1).sum())
        self.skipped = int((~learnable).sum())

    def row(self, i, block_size):
        """Conversation i's tokens and mask, cut to block_size + 1."""
        start = self.starts[i]
        end = min(self.ends[i], start + block_size + 1)
        return self.tokens[start:end], self.mask[start:end]


class Dataset:
    """The train and val token streams of one prepared data directory, plus its tokenizer."""

    def __init__(self, data_dir, block_size):
        self.meta = read_meta(data_dir)
        self.tokenizer = tokenizer_from_dict(self.meta["tokenizer"])
        self.vocab_size = self.meta["vocab_size"]
        self.splits = {split: open_split(data_dir, split, self.meta) for split in ("train", "val")}
        if self.tokenizer.vocab_size != self.vocab_size:
            raise DataError(f"meta.json in '{data_dir}' says vocab_size {self.vocab_size} but its tokenizer has "
                            f"{self.tokenizer.vocab_size} tokens: prepare the data again")
        self.chat = {}  # split -> ChatSplit, for chat data
        self.notes = []  # what the reader should know about how the data is used
        if self.meta.get("chat"):
            for split, tokens in self.splits.items():
                self.chat[split] = ChatSplit(data_dir, split, self.meta, tokens, block_size)
                self.check_chat_split(data_dir, split, block_size)
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1 and not self.chat:
                raise DataError(
                    f"{split}.bin in '{data_dir}' has {len(tokens)} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}: use a smaller block_size or more text"
                )
        self.block_size = block_size

    def check_chat_split(self, data_dir, split, block_size):
        chat = self.chat[split]
        if not len(chat.drawable):
            raise DataError(f"no conversation in {split} of '{data_dir}' has an assistant token within block_size + 1 "
                            f"= {block_size + 1} tokens: use a larger block_size or shorter conversations")
        if chat.truncated:
            self.notes.append(f"{split}: {chat.truncated} of {len(chat.starts)} conversations are longer than "
                              f"block_size + 1 = {block_size + 1} tokens and are cut to it; {chat.skipped} of them "
                              "keep nothing to learn and are left out")

    def get_batch(self, split, batch_size, generator, share=(0, 1)):
        """Random contiguous windows: x (B, T) and y = x shifted by one (B, T), int64 on the CPU.
        For chat data: random whole conversations, x (B, L) and y (B, L) with L <= T (see the top).

        share = (rank, processes): the generator deals `processes` micro-batches in turn and this process
        keeps the rank-th (it reads only its own windows). Every process holds the same generator, so
        together they train on exactly the micro-batches one process would draw from it, whatever their
        number (docs/distributed.md); a single process draws just as before sharing existed."""
        # torch is imported here rather than at the top: prepare.py's worker processes import this module
        # for its format constants, and importing torch would add seconds to each worker's start.
        import torch

        rank, processes = share
        # Where each micro-batch starts (or which conversations it takes), drawn for every process in turn.
        drawable = len(self.chat[split].drawable) if self.chat else len(self.splits[split]) - self.block_size
        draws = [torch.randint(drawable, (batch_size,), generator=generator).tolist() for _ in range(processes)]
        if self.chat:
            return self.get_chat_batch(split, draws[rank])
        tokens = self.splits[split]
        T = self.block_size
        windows = np.stack([tokens[s : s + T + 1] for s in draws[rank]]).astype(np.int64)  # (B, T + 1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def get_chat_batch(self, split, picks):
        import torch

        chat = self.chat[split]
        batch_size = len(picks)
        rows = [chat.row(chat.drawable[p], self.block_size) for p in picks]
        L = max(len(ids) for ids, _ in rows) - 1
        x = np.zeros((batch_size, L), dtype=np.int64)  # padding: any id does, nothing real attends to it
        y = np.full((batch_size, L), -1, dtype=np.int64)
        for b, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[b, :n] = ids[:-1]
            y[b, :n] = np.where(mask[1:] == 1, ids[1:].astype(np.int64), -1)
        return torch.from_numpy(x), torch.from_numpy(y)
