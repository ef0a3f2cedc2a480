"""
Prepared data on disk, and random batches drawn from it.

A prepared data directory holds train.bin and val.bin (token ids as a flat array of
uint16 or uint32) and meta.json (the tokenizer, vocab size, dtype and token counts).
The .bin files are memory-mapped, never read whole into RAM.
"""

import json
import os

import numpy as np

from tokenizer import tokenizer_from_dict


META_VERSION = 1  # bump when meta.json or the .bin layout changes


class DataError(ValueError):
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
    if meta.get("version") != META_VERSION:
        raise DataError(f"'{path}' has format version {meta.get('version')!r}, expected {META_VERSION}: {fix}")
    return meta


def open_split(data_dir, split, meta):
    """Memory-map train.bin or val.bin and check it against meta.json."""
    path = os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(path):
        raise DataError(f"'{path}' is missing: run `python prepare.py SOURCE --out {data_dir}` again")
    dtype = np.dtype(meta["dtype"])
    size = os.path.getsize(path)
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if size != expected:
        raise DataError(
            f"'{path}' holds {size} bytes but meta.json says {meta[f'{split}_tokens']} tokens of {dtype.name} "
            f"({expected} bytes): the file is truncated or from another preparation; prepare the data again"
        )
    return np.memmap(path, dtype=dtype, mode="r")


class Dataset:
    """The train and val token streams of one prepared data directory, plus its tokenizer."""

    def __init__(self, data_dir, block_size):
        self.meta = read_meta(data_dir)
        self.tokenizer = tokenizer_from_dict(self.meta["tokenizer"])
        self.vocab_size = self.meta["vocab_size"]
        self.splits = {split: open_split(data_dir, split, self.meta) for split in ("train", "val")}
        for split, tokens in self.splits.items():
            if len(tokens) < block_size + 1:
                raise DataError(
                    f"{split}.bin in '{data_dir}' has {len(tokens)} tokens, fewer than block_size + 1 = "
                    f"{block_size + 1}: use a smaller block_size or more text"
                )
            # A cheap look at the head of each file catches .bin files written with another dtype or tokenizer.
            largest = int(tokens[: 1 << 20].max())
            if largest >= self.vocab_size:
                raise DataError(
                    f"{split}.bin in '{data_dir}' holds token id {largest} but meta.json's vocabulary has "
                    f"{self.vocab_size} tokens: the .bin files do not match meta.json; prepare the data again"
                )
        self.block_size = block_size

    def get_batch(self, split, batch_size, generator):
        """Random contiguous windows: x (B, T) and y = x shifted by one (B, T), int64 on the CPU."""
        # torch is imported here rather than at the top: prepare.py's worker processes import this module
        # for its format constants, and importing torch would add seconds to each worker's start.
        import torch

        tokens = self.splits[split]
        T = self.block_size
        starts = torch.randint(len(tokens) - T, (batch_size,), generator=generator).tolist()
        windows = np.stack([tokens[s : s + T + 1] for s in starts]).astype(np.int64)  # (B, T + 1)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]
