"""
HellaSwag (Zellers et al., 2019): 10,042 validation examples, each a context from ActivityNet or WikiHow
and four endings, one of them the real one. The task is scored as build-nanogpt and llm.c score it
(completion style): the context is the example's "ctx", each ending follows it after a space, and
acc / acc_norm are multiple_choice's (summed / per-token log-likelihood).

The validation file is downloaded once from the authors' repository at a pinned commit, resumably, into
data/hellaswag/ (the data directory), and checked before use. We could not read its sha256 without
network, so it is checked against its Git blob id at that commit (the SHA-1 of "blob <size>\\0" + the
bytes), which the repository's tree records and no later push can change.
"""

import hashlib
import json
import os

from nanoforge import datasets, multiple_choice
from nanoforge.multiple_choice import Example, TaskError
from nanoforge.sources import PrepareError

HELLASWAG_COMMIT = "a29ff8e9a04bba4bd6588223785ce105328adc57"  # rowanz/hellaswag, 2020-05-28
HELLASWAG_FILE = "hellaswag_val.jsonl"
HELLASWAG_URL = f"https://raw.githubusercontent.com/rowanz/hellaswag/{HELLASWAG_COMMIT}/data/{HELLASWAG_FILE}"
HELLASWAG_BLOB = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"  # git ls-tree of that commit: data/hellaswag_val.jsonl
CACHE_DIR = os.path.join("data", "hellaswag")

# GPT-2 124M's published scores, shown beside ours.
REFERENCE = ("GPT-2 124M: acc_norm 29.55 % as build-nanogpt and llm.c score it (this task); "
             "31.14 % in lm-evaluation-harness (--harness hellaswag)")


def git_blob_id(path):
    """The id Git gives a file's contents: SHA-1 of the header "blob <size>\\0" and the bytes."""
    h = hashlib.sha1(f"blob {os.path.getsize(path)}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def download(cache_dir=CACHE_DIR):
    """The validation file, downloaded (resuming a partial download) and verified, or the cached copy."""
    os.makedirs(cache_dir, exist_ok=True)
    dest = os.path.join(cache_dir, HELLASWAG_FILE)
    try:
        return datasets.download(HELLASWAG_URL, HELLASWAG_BLOB, dest, digest=git_blob_id)
    except datasets.DownloadError as e:
        raise TaskError(f"{e.problem}: pass a local copy with --data FILE.jsonl (the file {HELLASWAG_FILE} in "
                        "HellaSwag's own format)") from None
    except PrepareError as e:
        raise TaskError(str(e)) from None


def parse_line(text, where):
    """One line of HellaSwag's JSONL -> Example; a line not in the format names itself and the field."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where} is not JSON ({e.msg}): HellaSwag files hold one JSON object per line") from None
    if not isinstance(record, dict):
        raise TaskError(f"{where} is not a JSON object: HellaSwag files hold one per line")
    for field in ("ctx", "endings", "label"):
        if field not in record:
            raise TaskError(f"{where} has no '{field}' field: HellaSwag records have ctx, endings (a list of "
                            "strings) and label (the index of the right one)")
    endings, label = record["endings"], record["label"]
    if not isinstance(record["ctx"], str):
        raise TaskError(f"{where}: 'ctx' must be a string")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise TaskError(f"{where}: 'endings' must be a list of at least two non-empty strings")
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy stores labels as strings
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise TaskError(f"{where}: 'label' must be the index of the right ending, 0 to {len(endings) - 1}; "
                        f"got {record['label']!r}")
    return Example(record["ctx"], [" " + e for e in endings], label)


def read_examples(path, limit=None):
    """The first `limit` examples (all when None) of a HellaSwag JSONL file."""
    examples = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if limit is not None and len(examples) == limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(f"{path} line {n} is not UTF-8 ({e.reason} at byte {e.start}): HellaSwag files are "
                                "UTF-8 JSON lines") from None
            if line.strip():
                examples.append(parse_line(line, f"{path} line {n}"))
    if not examples:
        raise TaskError(f"'{path}' holds no HellaSwag example")
    return examples


def load(path=None, limit=None):
    """Examples of a local copy (path), or of the downloaded validation split."""
    if path and not os.path.isfile(path):
        raise TaskError(f"the HellaSwag file '{path}' does not exist: pass the path of {HELLASWAG_FILE} or of a "
                        "file in its format")
    return read_examples(path or download(), limit)


def during_training(cfg, say):
    """The examples a training run scores (cfg.hellaswag_interval > 0), read before the first step so a
    missing or malformed file stops the run before it trains; None when the key is off."""
    if not cfg.hellaswag_interval:
        return None
    examples = load(cfg.hellaswag_data or None, cfg.hellaswag_max or None)
    say(f"hellaswag: scoring {len(examples)} examples every {cfg.hellaswag_interval} steps")
    return examples


def log_fields(model, tokenizer, examples, ddp, autocast):
    """{hellaswag_acc, hellaswag_acc_norm, hellaswag_n} for a log.jsonl record; the processes share the examples."""
    with autocast:
        report = multiple_choice.evaluate(model, tokenizer, examples, ddp=ddp)
    return {"hellaswag_acc": round(report["acc"], 6), "hellaswag_acc_norm": round(report["acc_norm"], 6),
            "hellaswag_n": report["n"]}
