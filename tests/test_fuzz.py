"""The short fuzzing campaign, on every test run: each reader of outside input (bench/fuzz.py) gets a few dozen
inputs hypothesis builds (the same ones every run: derandomized) and must work or refuse with one line. The long
campaign is `python -m bench.fuzz --examples 10000` (docs/robustness.md). Below it, one test per failure the
campaign found, each a traceback before its fix."""

import json
import struct
from collections import Counter

import pytest

from bench import fuzz
from nanoforge.checkpoint import CheckpointError
from nanoforge.config import ConfigError, build_config
from nanoforge.errors import UserError
from nanoforge.tokenizer import ByteTokenizer, TokenizerError, tokenizer_from_dict

EXAMPLES = {"config": 60, "data_dir": 30, "checkpoint": 40, "tokenizer": 40, "corpus": 25, "hellaswag": 60}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_reader_works_or_refuses_in_one_line(name, tmp_path):
    """(The server's reader runs in tests/test_fuzz_server.py.) Both answers occur: the inputs are not all junk."""
    counts = Counter()
    fuzz.campaign(fuzz.READERS[name], EXAMPLES[name], str(tmp_path), counts, seed=0)
    assert counts["inputs"] == counts["worked"] + counts["refused"] == EXAMPLES[name]
    assert counts["worked"] > 0 and counts["refused"] > 0


def test_every_reader_but_the_servers_is_in_the_short_campaign():
    assert set(EXAMPLES) == set(fuzz.READERS) - {"server"}


def test_the_campaign_reports_a_traceback_as_a_failure():
    """What it looks for: an exception that is not the project's (and a message over two lines)."""
    with pytest.raises(fuzz.Failure, match="KeyError"):
        fuzz.answer(lambda value: {}[value], "missing", Counter())
    with pytest.raises(fuzz.Failure, match="without a one-line message"):
        fuzz.answer(lambda value: (_ for _ in ()).throw(UserError("two\nlines")), None, Counter())
    counts = Counter()
    fuzz.answer(lambda value: (_ for _ in ()).throw(UserError("one line")), None, counts)
    assert counts == {"inputs": 1, "refused": 1}


@pytest.mark.parametrize("description, message", [
    ([1], "must be a JSON object, got list"),
    ({"type": "char"}, "'char' tokenizer description is damaged \\(KeyError"),
    ({"type": "char", "chars": 5}, "'chars' must be a string"),
    ({"type": "bpe", "name": "x", "pattern": ".", "ranks": 7, "special_tokens": {}}, "is damaged \\(AttributeError"),
    ({"type": "bpe", "name": "x", "pattern": ".", "ranks": "YQ== 0", "special_tokens": {}}, "every single byte"),
])
def test_a_damaged_tokenizer_description_is_one_line(description, message):
    """Found by the campaign: KeyError, TypeError, AttributeError, ValueError, and a Rust panic in tiktoken
    (a BPE without a token for every byte)."""
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_dict(description)


def test_a_config_key_holding_a_newline_is_named_on_one_line(tmp_path):
    with pytest.raises(ConfigError) as caught:
        build_config(None, ["--\n=1"])
    assert "\n" not in str(caught.value) and "unknown config key '\\n'" in str(caught.value)


def test_a_hellaswag_file_that_is_not_utf8_is_one_line(tmp_path):
    from nanoforge import hellaswag
    from nanoforge.multiple_choice import TaskError

    path = tmp_path / "h.jsonl"
    path.write_bytes(b"\x80\n")
    with pytest.raises(TaskError, match="line 1 is not UTF-8"):
        hellaswag.load(str(path))


def checkpoint_with_info(tmp_path, edit):
    """A valid checkpoint file whose header's info (not under the checksum) is edited."""
    from model import GPT, GPTConfig
    from nanoforge import checkpoint

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=257))
    path = tmp_path / "model.safetensors"
    checkpoint.save(str(path), model.state_dict(), {"model": dict(vars(model.config)),
                                                    "tokenizer": ByteTokenizer().to_dict()})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["info"] = edit(json.loads(header["__metadata__"]["info"]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda info: "{not json", "no readable 'info'"),
    (lambda info: json.dumps({**info, "model": None}), "without its model and tokenizer"),
    (lambda info: json.dumps({**info, "model": {**info["model"], "n_layer": 10**9}}), "its weights do not match"),
    (lambda info: json.dumps({**info, "model": {**info["model"], "logit_softcap": None}}),
     "logit_softcap = None, not a float"),
    (lambda info: json.dumps({**info, "model": {**info["model"], "n_head": 3}}), "do not fit the model it describes"),
])
def test_a_checkpoint_whose_info_does_not_match_its_weights_is_one_line(tmp_path, edit, message):
    """Found by the campaign: the checksum covers the tensors, not the header's JSON, whose model description
    could raise JSONDecodeError, TypeError or AssertionError, or ask for a model of 10^9 layers (out of memory)."""
    from nanoforge.loading import load_model

    with pytest.raises(CheckpointError, match=message):
        load_model(str(checkpoint_with_info(tmp_path, edit)), "cpu")


def test_a_corpus_record_with_a_newline_in_a_field_name_is_one_line(tmp_path):
    from nanoforge.preparation import prepare
    from nanoforge.sources import PrepareError

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"\n": 1}) + "\n")
    with pytest.raises(PrepareError) as caught:
        prepare(str(corpus), "char", str(tmp_path / "out"), 0.2, workers=1)
    assert "(fields: '\\n')" in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_a_checkpoint_version_holding_a_newline_is_named_on_one_line(tmp_path):
    from safetensors.torch import save_file

    from nanoforge import checkpoint

    path = tmp_path / "v.safetensors"
    save_file({"model.w": __import__("torch").zeros(1)}, str(path), metadata={"format": checkpoint.FORMAT,
                                                                              "version": "\n", "info": "{}"})
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(str(path))
    assert "format version '\\n'" in str(caught.value) and "\n" not in str(caught.value)


def test_a_huge_depth_is_refused_before_the_dial_builds_the_model():
    """Found by the campaign: --depth=2**40 hung build_config (the dial counts parameters by building the
    model on the meta device, layer by layer)."""
    with pytest.raises(ConfigError, match="'depth' must be at most 256"):
        build_config(None, [f"--depth={2**40}"])
