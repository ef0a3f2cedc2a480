import json
import os
import urllib.error

import numpy as np
import pytest

import prepare
from data import DataError, Dataset
from prepare import PrepareError
from tokenizer import ByteTokenizer, CharTokenizer, TokenizerError, tokenizer_from_dict


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


def test_directory_source_reads_text_files_in_sorted_order(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bbbb " * 20)
    (root / "sub" / "c.txt").write_text("cccc " * 20)
    (root / "a.txt").write_text("aaaa " * 20)
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    text, _ = prepare.load_source(str(root), None, str(tmp_path / "d"))
    assert text == "\n\n".join(["aaaa " * 20, "bbbb " * 20, "cccc " * 20])


def test_stdlib_corpus_is_deterministic_python_source():
    text = prepare.stdlib_corpus()
    assert text == prepare.stdlib_corpus()
    assert len(text) > 1_000_000 and "def " in text and "import " in text


def test_shakespeare_local_copy_must_match_checksum(tmp_path):
    fake = tmp_path / "input.txt"
    fake.write_text("not shakespeare")
    with pytest.raises(PrepareError, match="is not tinyshakespeare"):
        prepare.prepare("shakespeare_char", None, str(tmp_path / "d"), 0.1, str(fake))


def test_download_offline_fails_with_a_clear_message(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
    with pytest.raises(PrepareError, match="no network\\? pass --source PATH"):
        prepare.prepare("shakespeare_char", None, str(tmp_path / "d"), 0.1)
    assert not os.path.exists(tmp_path / "d" / "meta.json")


def test_download_verifies_checksum_and_keeps_nothing_bad(tmp_path, monkeypatch):
    import io

    class Response(io.BytesIO):
        headers = {}

        def __enter__(self):
            return self

    monkeypatch.setattr(prepare.urllib.request, "urlopen", lambda *a, **k: Response(b"tampered"))
    dest = tmp_path / "input.txt"
    with pytest.raises(PrepareError, match="has sha256"):
        prepare.download("https://example.invalid/x", "0" * 64, str(dest))
    assert not dest.exists() and not (tmp_path / "input.txt.part").exists()
    good = prepare.sha256_of(b"tampered")
    assert prepare.download("https://example.invalid/x", good, str(dest)) == str(dest)
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
    from tokenizer import BPETokenizer

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
