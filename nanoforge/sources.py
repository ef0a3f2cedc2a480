"""
Reading a corpus: a Source yields documents, a document is an iterator of text pieces, read in blocks from
text, JSONL and Parquet files so that memory stays bounded however large the corpus.
"""

import codecs
import glob
import json
import os
import re
import sys
import sysconfig

from nanoforge import chat_format, records
from nanoforge.errors import UserError

CHUNK_SIZE = 1 << 20  # characters of text per task sent to a worker
TRAIN, VAL = 0, 1


class PrepareError(UserError):
    pass


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
        if chat_format.is_chat_record(record):  # chat records reach here only from a directory or glob of files
            raise PrepareError(f"'{path}' line {n} is a chat record: chat data is read from one file at a time: "
                               "pass the file itself (or join the files into one)")
        fields = ", ".join(map(repr, record)) if isinstance(record, dict) else "none: not an object"
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
    (moved forward to the start of a UTF-8 character). A file that does not start like text (NUL bytes, or
    bytes that are not UTF-8) is refused: it is most likely binary, and would make a vocabulary of noise."""
    if not is_text(path):
        raise PrepareError(f"'{path}' is not UTF-8 text (NUL bytes, or bytes that are not UTF-8, near its start): "
                           "convert it to UTF-8, or leave it out if it is binary")
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
