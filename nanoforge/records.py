"""
Records of dataset files, the two formats datasets ship in: JSONL (one JSON object per line) and
Parquet (one per row). Each record comes with its place, the file and its line or row, so that an
error about it can say where it is. prepare.py reads documents and conversations through here,
eval.py conversations.
"""

import json

from nanoforge.errors import UserError


class RecordError(UserError):
    """A file that cannot be read as records; str() is one line saying what to do."""


class BadRecord(Exception):
    """A record that cannot be used; str() is one line naming where it is and what is wrong."""


def parquet_file(path):
    """An open pyarrow ParquetFile. pyarrow is an optional dependency: only Parquet needs it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise RecordError(f"reading '{path}' needs pyarrow: pip install 'nanoforge[parquet]'") from None
    return pq.ParquetFile(path)


def first_jsonl_record(path):
    """The first record of a JSONL file, or None when there is none or it is not JSON."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    return json.loads(line)
                except json.JSONDecodeError:
                    return None
    return None


def field_names(path):
    """The fields of a JSONL file's first record or a Parquet file's columns (empty for other files):
    enough to tell what kind of records a file holds."""
    if path.endswith(".jsonl"):
        record = first_jsonl_record(path)
        return list(record) if isinstance(record, dict) else []
    if path.endswith(".parquet"):
        return parquet_file(path).schema_arrow.names
    return []


def read_records(path):
    """(where, record) for each record of a JSONL or Parquet file, where naming it for errors: the
    file and its line (JSONL; blank lines are skipped) or row (Parquet, counted from 1). A line that
    is not JSON in UTF-8 comes as a BadRecord in place of the record, so the caller decides whether
    it stops everything or is skipped."""
    if path.endswith(".parquet"):
        row = 0
        for batch in parquet_file(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield f"'{path}' row {row}", record
        return
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"'{path}' line {n}", json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    yield f"'{path}' line {n}", BadRecord(f"'{path}' line {n}: not JSON in UTF-8 ({e})")
