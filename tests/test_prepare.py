import hashlib
import json
import os
import urllib.error

import numpy as np
import pytest

from nanoforge import datasets
from nanoforge import preparation as prepare
from nanoforge.data import DataError, Dataset
from nanoforge.sources import PrepareError
from nanoforge.records import RecordError
from nanoforge.tokenizer import ByteTokenizer, CharTokenizer, TokenizerError, tokenizer_from_dict
from conftest import run_cli


def test_prepare_writes_bins_and_meta(tmp_path, corpus):
    meta = prepare.prepare(str(corpus), "char", str(tmp_path / "d"), 0.1)
    text = corpus.read_text()
    train = np.fromfile(tmp_path / "d" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "d" / "val.bin", dtype=np.uint16)
    tok = tokenizer_from_dict(json.loads((tmp_path / "d" / "meta.json").read_text())["tokenizer"])
    assert tok.decode(train.tolist()) + tok.decode(val.tolist()) == text
    assert len(val) == len(text) - int(len(text) * 0.9)
    assert meta["train_tokens"] == len(train) and meta["vocab_size"] == len(set(text))
    assert meta["dtype"] == "uint16"
    assert len(meta["source"]["sha256"]) == 64
    assert not [p for p in os.listdir(tmp_path / "d") if p.endswith(".tmp")]


def test_byte_tokenizer_round_trips_any_text(tmp_path):
    src = tmp_path / "u.txt"
    text = "héllo wörld ✓ 日本語 🙂\n" * 30
    src.write_text(text, encoding="utf-8")
    prepare.prepare(str(src), "byte", str(tmp_path / "d"), 0.5)
    ids = np.concatenate([np.fromfile(tmp_path / "d" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert bytes(ids.tolist()) == text.encode()
    assert ByteTokenizer().decode(ByteTokenizer().encode(text)) == text


def documents_of(source):
    return ["".join(doc) for doc in source.documents()]


def test_directory_source_reads_text_files_in_sorted_order(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bbbb " * 20)
    (root / "sub" / "c.txt").write_text("cccc " * 20)
    (root / "a.txt").write_text("aaaa " * 20)
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    source = datasets.open_source(str(root), None, str(tmp_path / "d"), 0.1)
    assert documents_of(source) == ["aaaa " * 20, "bbbb " * 20, "cccc " * 20]
    glob_source = datasets.open_source(str(root / "**" / "*.txt"), None, str(tmp_path / "d"), 0.1)
    assert documents_of(glob_source) == documents_of(source)
    assert prepare.default_out_dir(str(root / "**" / "*.txt")) == os.path.join("data", "texts")


def test_stdlib_corpus_is_deterministic_python_source(tmp_path):
    docs = documents_of(datasets.open_source("pystdlib", None, str(tmp_path), 0.1))
    assert docs == documents_of(datasets.open_source("pystdlib", None, str(tmp_path), 0.1))
    assert len(docs) == 2 and len(docs[0]) > 8 * len(docs[1]) > 3_000_000  # train head, val tail
    assert "def " in docs[0] and "import " in docs[1]


def test_shakespeare_local_copy_must_match_checksum(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare")
    with pytest.raises(PrepareError, match="is not tinyshakespeare"):
        prepare.prepare("shakespeare_char", None, str(tmp_path / "d"), 0.1, str(fake))


def test_download_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(datasets.urllib.request, "urlopen", offline)
    with pytest.raises(PrepareError, match="no network\\?\\): pass --source PATH"):
        prepare.prepare("shakespeare_char", None, str(tmp_path / "d"), 0.1)
    assert not os.path.exists(tmp_path / "d" / "meta.json")


def test_download_verifies_checksum_and_keeps_nothing_bad(tmp_path, monkeypatch):
    import io

    class Response(io.BytesIO):
        headers = {}

        def __enter__(self):
            return self

    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda *a, **k: Response(b"tampered"))
    dest = tmp_path / "input.txt"
    with pytest.raises(PrepareError, match="has sha256"):
        datasets.download("https://example.invalid/x", "0" * 64, str(dest))
    assert not dest.exists() and not (tmp_path / "input.txt.part").exists()
    good = hashlib.sha256(b"tampered").hexdigest()
    assert datasets.download("https://example.invalid/x", good, str(dest)) == str(dest)
    assert dest.read_bytes() == b"tampered"


def test_char_tokenizer_refuses_unknown_characters():
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError, match="'é' \\(U\\+00E9\\)"):
        tok.encode("abé")
    with pytest.raises(TokenizerError, match="not in this model's vocabulary"):
        tok.encode_array("zzz")


def test_unknown_source_is_an_error(tmp_path):
    with pytest.raises(PrepareError, match="neither a built-in dataset"):
        prepare.prepare(str(tmp_path / "nope"), None, str(tmp_path / "d"))
    assert not (tmp_path / "d").exists()  # the lock made it; nothing went in: it is removed again


def test_dataset_errors_name_the_problem_and_fix(tmp_path, data_dir):
    with pytest.raises(DataError, match="does not exist: run `python prepare.py"):
        Dataset(str(tmp_path / "missing"), 16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no meta.json"):
        Dataset(str(empty), 16)
    with pytest.raises(DataError, match="fewer than block_size \\+ 1"):
        Dataset(str(data_dir), 100_000)
    with open(data_dir / "val.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(DataError, match="val.bin' holds .* bytes but meta.json says"):
        Dataset(str(data_dir), 16)


def test_batches_are_shifted_windows_of_the_stream(data_dir):
    import torch

    data = Dataset(str(data_dir), 16)
    x, y = data.get_batch("train", 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = torch.from_numpy(np.asarray(data.splits["train"]).astype(np.int64))
    for row in x:
        matches = (stream.unfold(0, 16, 1) == row).all(-1)
        assert matches.any()


def test_bpe_tokenizer_travels_as_data():
    from nanoforge.tokenizer import BPETokenizer

    # a toy byte-level BPE: all 256 bytes plus two merges
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"ab"] = 256
    ranks[b"abab"] = 257
    tok = BPETokenizer("toy", r"\S+|\s+", ranks, {"<|endoftext|>": 258})
    assert tok.encode("abab ab") == [257, 32, 256]
    assert tok.vocab_size == 259 and tok.eot_id == 258
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    text = "abab <|endoftext|> héllo"
    assert again.encode(text) == tok.encode(text) and again.decode(again.encode(text)) == text


def make_documents(n, seed=0):
    """n varied documents: words, numbers, punctuation, some non-ASCII, some long."""
    rng = np.random.default_rng(seed)
    words = ["the", "cat", "sat", "on", "a", "mat", "naïve", "café", "日本", "🙂", "42", "3.14", "(x)", "don't"]
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(rng.integers(1, 40))]
        docs.append(f"Document {i}.\n" + "\n".join(lines))
    return docs


def write_jsonl(path, docs, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, field: d}) + "\n")


def split_documents(out, eot=256):
    """The documents of train.bin and val.bin of a byte-level preparation."""
    result = []
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=np.uint16).tolist()
        result.append([bytes(part).decode() for part in split_on(ids, eot)])
    return result


def split_on(ids, sep):
    part = []
    for i in ids:
        if i == sep:
            yield part
            part = []
        else:
            part.append(i)
    yield part


def test_jsonl_and_parquet_split_by_document_deterministically(tmp_path):
    docs = make_documents(300)
    write_jsonl(tmp_path / "c.jsonl", docs)
    meta = prepare.prepare(str(tmp_path / "c.jsonl"), "byte", str(tmp_path / "a"), 0.2, seed=1)
    train, val = split_documents(tmp_path / "a")
    assert sorted(train + val) == sorted(docs) and len(val) == meta["val_documents"]
    assert train == [d for d in docs if d in set(train)]  # source order kept within a split
    assert 30 < len(val) < 90 and meta["train_documents"] + meta["val_documents"] == 300
    assert meta["split"] == "document" and meta["seed"] == 1

    prepare.prepare(str(tmp_path / "c.jsonl"), "byte", str(tmp_path / "b"), 0.2, seed=1)
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()
    prepare.prepare(str(tmp_path / "c.jsonl"), "byte", str(tmp_path / "c"), 0.2, seed=2)
    assert split_documents(tmp_path / "c")[1] != val

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=64)
    meta = prepare.prepare(str(tmp_path / "c.parquet"), "byte", str(tmp_path / "p"), 0.2, seed=1, text_field="body")
    for split in ("train", "val"):
        assert (tmp_path / "p" / f"{split}.bin").read_bytes() == (tmp_path / "a" / f"{split}.bin").read_bytes()
    with pytest.raises(PrepareError, match="no column 'text' \\(columns: body\\): pass --text-field NAME"):
        prepare.prepare(str(tmp_path / "c.parquet"), "byte", str(tmp_path / "q"))


def test_chat_records_in_a_directory_say_to_pass_the_file(tmp_path):
    (tmp_path / "chats").mkdir()
    (tmp_path / "chats" / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(PrepareError, match="line 1 is a chat record: chat data is read from one file at a time"):
        prepare.prepare(str(tmp_path / "chats"), "byte", str(tmp_path / "d"))


def test_source_format_errors_name_the_fix(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "c.jsonl", ["a", "b"], field="content")
    with pytest.raises(PrepareError, match="line 1 has no string field 'text' \\(fields: 'id', 'content'\\)"):
        prepare.prepare(str(tmp_path / "c.jsonl"), "byte", str(tmp_path / "d"))
    (tmp_path / "c.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(__import__("sys").modules, "pyarrow.parquet", None)
    with pytest.raises(RecordError, match="needs pyarrow: pip install 'nanoforge\\[parquet\\]'"):
        prepare.prepare(str(tmp_path / "c.parquet"), "byte", str(tmp_path / "d"))
    write_jsonl(tmp_path / "big.jsonl", make_documents(300))
    with open(tmp_path / "big.jsonl", "a") as f:
        f.write('{"text": 42}\n')  # found by a worker process, reported by the parent
    with pytest.raises(PrepareError, match="big.jsonl' line 301 has no string field 'text' \\(fields: 'text'\\)"):
        prepare.prepare(str(tmp_path / "big.jsonl"), "byte", str(tmp_path / "d"), workers=2, chunk_size=2000)
    assert not (tmp_path / "d").exists() or os.listdir(tmp_path / "d") == []
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1") * 10)
    with pytest.raises(PrepareError, match="is not UTF-8 text .* convert it to UTF-8"):
        prepare.prepare(str(tmp_path / "latin1.txt"), "byte", str(tmp_path / "d"))


def test_multiprocess_output_equals_single_process_token_for_token(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    docs = make_documents(200)
    write_jsonl(root / "a.jsonl", docs[:150])
    (root / "b.txt").write_text("\n".join(docs[150:]) * 5, encoding="utf-8")  # one long document, cut in pieces
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        meta = prepare.prepare(str(root), "bpe", str(out), 0.1, vocab_size=400, workers=workers, chunk_size=2000)
        outs.append((meta, *((out / f"{s}.bin").read_bytes() for s in ("train", "val"))))
    assert outs[0] == outs[1]
    meta, train, val = outs[0]
    assert meta["vocab_size"] == 400 and meta["tokenizer"]["name"] == "bpe-400"
    # the same tokens as encoding each document whole and joining them with <|endoftext|>
    tok = tokenizer_from_dict(meta["tokenizer"])
    decoded = [tok.decode(np.frombuffer(b, dtype=np.uint16).tolist()).split("<|endoftext|>") for b in (train, val)]
    assert sorted(decoded[0] + decoded[1]) == sorted(docs[:150] + ["\n".join(docs[150:]) * 5])
    expected = []
    for d in decoded[0]:
        expected += tok.encode(d) + [tok.eot_id]
    assert np.frombuffer(train, dtype=np.uint16).tolist() == expected[:-1]


# Peak resident memory of a preparation: its own (VmHWM: ru_maxrss would include the pytest process
# it was forked from) and its pool workers'.
PEAK_RSS = """
import re, resource, sys
import prepare
prepare.main(sys.argv[1:])
own = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print("PEAK_KB", own, workers)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak memory from Linux's /proc")
def test_memory_stays_bounded_on_a_corpus_much_larger_than_the_chunk(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    line = "The quick brown fox jumps over the lazy dog, naïvely. 0123456789\n"
    peaks = {}
    for mb in (1, 24):
        path = tmp_path / f"c{mb}.txt"
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(mb):
                f.write(line * (2**20 // len(line)))
        result = subprocess.run(
            [sys.executable, "-c", PEAK_RSS, str(path), "--tokenizer", "byte", "--out", str(tmp_path / f"d{mb}"),
             "--workers", "2", "--chunk-size", "16384"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr
        peaks[mb] = [int(kb) / 1024 for kb in result.stdout.split("PEAK_KB")[1].split()]
        assert json.loads((tmp_path / f"d{mb}" / "meta.json").read_text())["train_tokens"] > mb * 900_000
    # 23 MB more text (1400 more chunks) may not cost more than a few MB of peak memory anywhere
    assert peaks[24][0] - peaks[1][0] < 8 and peaks[24][1] - peaks[1][1] < 8, peaks
    assert max(peaks[24]) < 200, peaks


def test_failed_preparation_leaves_no_complete_looking_output(tmp_path, monkeypatch, corpus):
    out = tmp_path / "d"
    prepare.prepare(str(corpus), "char", str(out), 0.1)  # an earlier, complete preparation
    calls = []

    def failing(chunk, tokenizer, dtype):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode_chunk(chunk, tokenizer, dtype)

    encode_chunk = prepare.encode_chunk
    monkeypatch.setattr(prepare, "encode_chunk", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(str(corpus), "char", str(out), 0.1, workers=1, chunk_size=100)
    assert len(calls) == 3 and os.listdir(out) == []


def test_interrupted_cli_leaves_no_complete_looking_output(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO, sigint_reaches_children

    docs = make_documents(4000)
    write_jsonl(tmp_path / "big.jsonl", docs * 5)
    out = tmp_path / "d"
    with sigint_reaches_children():  # else, under `pytest &` in a script, prepare.py ignores it and exits 0
        proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "prepare.py"), str(tmp_path / "big.jsonl"), "--tokenizer", "byte",
             "--out", str(out), "--workers", "2", "--chunk-size", "2000"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
    deadline = time.time() + 60
    while not (out / "train.bin.tmp").exists() or (out / "train.bin.tmp").stat().st_size == 0:
        assert proc.poll() is None and time.time() < deadline, "preparation ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "interrupted" in stderr.splitlines()[-1]
    assert not out.exists()  # nothing left: not even the directory the lock made


def test_cli_argument_errors_are_one_line(tmp_path, corpus):
    from conftest import run_cli

    for args, message in [
        (["--tokenizer", "char", "--vocab-size", "300"], "--vocab-size is required with --tokenizer bpe"),
        (["--tokenizer", "bpe"], "--vocab-size is required with --tokenizer bpe"),
        (["--tokenizer", "bpe", "--vocab-size", "100"], "--vocab-size must be at least 257"),
        (["--workers", "0"], "--workers must be at least 1"),
    ]:
        result = run_cli("prepare.py", corpus, "--out", tmp_path / "d", *args)
        assert result.returncode != 0 and result.stderr.startswith("prepare.py: error:"), result.stderr
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = run_cli("prepare.py", corpus, "--out", tmp_path / "d", "--tokenizer", "bpe", "--vocab-size", "300")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["split"] == "tail"


@pytest.fixture
def shard_server(monkeypatch, http_server):
    """A local stand-in for Hugging Face: /api lists the shards, /files/... serves them with HTTP Range."""
    files, corrupt, requests = {}, {}, []  # corrupt: bytes served instead of those the listing describes

    def respond(path, start):
        requests.append((path, f"bytes={start}-" if start is not None else None))
        if path == "/api":
            listing = [{"type": "file", "path": "sample/10BT/README.md", "size": 1}] + [
                {"type": "file", "path": p, "size": len(d), "lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d)}}
                for p, d in files.items()
            ]
            return 200, json.dumps(listing).encode()
        path = path.removeprefix("/files/")
        data = corrupt.get(path, files.get(path))
        if data is None:
            return 404, b""
        return (206, data[start:]) if start is not None else (200, data)

    url = http_server(respond)
    monkeypatch.setattr(datasets, "FINEWEB_EDU_API", url + "/api")
    monkeypatch.setattr(datasets, "FINEWEB_EDU_URL", url + "/files/")
    return files, corrupt, requests


def test_fineweb_edu_downloads_resume_and_verify_checksums(tmp_path, shard_server):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    files, corrupt, requests = shard_server
    docs = make_documents(120)
    for i in range(2):
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": list(range(60)), "text": docs[60 * i: 60 * (i + 1)]}), buf)
        files[f"sample/10BT/00{i}_00000.parquet"] = buf.getvalue()
    out = tmp_path / "fw"
    (out / "download").mkdir(parents=True)
    first = files["sample/10BT/000_00000.parquet"]
    (out / "download" / "000_00000.parquet.part").write_bytes(first[:100])  # an interrupted download

    meta = prepare.prepare("fineweb_edu", "byte", str(out), 0.2)
    assert ("/files/sample/10BT/000_00000.parquet", "bytes=100-") in requests  # resumed, not restarted
    assert (out / "download" / "000_00000.parquet").read_bytes() == first
    train, val = split_documents(out)
    assert sorted(train + val) == sorted(docs) and meta["source"]["shards"] == 2

    requests.clear()  # a second run reuses the verified shards
    assert prepare.prepare("fineweb_edu", "byte", str(out), 0.2, shards=1)["source"]["shards"] == 1
    assert requests == [("/api", None)]
    meta = prepare.prepare("fineweb_edu", "byte", str(tmp_path / "local"), 0.2, source_path=str(out / "download"))
    assert meta["train_documents"] + meta["val_documents"] == 120

    (out / "download" / "001_00000.parquet").unlink()
    corrupt["sample/10BT/001_00000.parquet"] = b"x" + files["sample/10BT/001_00000.parquet"][1:]
    with pytest.raises(PrepareError, match="001_00000.parquet has sha256 .*, expected .*: the file changed"):
        prepare.prepare("fineweb_edu", "byte", str(out), 0.2)
    assert sorted(os.listdir(out / "download")) == ["000_00000.parquet"]  # nothing bad kept


def test_download_failures_say_whose_fault_they_are(tmp_path, monkeypatch, http_server):
    """A server's refusal, a dead network and a disk that cannot take the file are three different messages."""
    payload = b"some text\n" * 100
    url = http_server(lambda path, start: (200, payload) if path == "/file" else (404, b""))
    with pytest.raises(datasets.DownloadError, match=r"the server answered 404 Not Found: pass --source PATH"):
        datasets.download(url + "/missing", "0" * 64, str(tmp_path / "f"))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets, "open", disk_full, raising=False)  # the module's open, before the builtin
    with pytest.raises(PrepareError, match=r"could not write .*f.part' \(No space left on device\): free some space") as e:
        datasets.download(url + "/file", hashlib.sha256(payload).hexdigest(), str(tmp_path / "f"))
    assert not isinstance(e.value, datasets.DownloadError)  # not "no network?"
    monkeypatch.undo()
    assert datasets.download(url + "/file", hashlib.sha256(payload).hexdigest(), str(tmp_path / "f")) == str(tmp_path / "f")


def test_fineweb_edu_offline_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FINEWEB_EDU_API", "http://127.0.0.1:9/api")  # nothing listens on port 9
    with pytest.raises(PrepareError, match="could not download http://127.0.0.1:9/api .*no network\\?"):
        prepare.prepare("fineweb_edu", "byte", str(tmp_path / "fw"))


def test_a_split_left_empty_is_an_error_naming_the_fix(tmp_path):
    root = tmp_path / "three"
    root.mkdir()
    for name in "abc":
        (root / f"{name}.txt").write_text(name * 100)
    # random.Random(0) draws 0.84, 0.76, 0.42: no document falls under 0.1
    with pytest.raises(PrepareError, match="val split is empty: .* has 3 documents .* --val-fraction or --seed"):
        prepare.prepare(str(root), "char", str(tmp_path / "d"), 0.1, seed=0)
    assert not (tmp_path / "d").exists()  # nothing left: not even the directory the lock made


def test_a_binary_file_is_refused_in_one_line(tmp_path):
    binary = tmp_path / "image.bin"
    binary.write_bytes(bytes(range(256)) * 40)  # NUL bytes and bytes that are not UTF-8
    result = run_cli("prepare.py", str(binary), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stdout
    assert "is not UTF-8 text" in result.stderr and result.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out" / "meta.json").exists()
