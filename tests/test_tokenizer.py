import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanoforge import sources
from conftest import TINY_TEXT
from nanoforge.tokenizer import (
    EOT, BPETokenizer, ByteTokenizer, TokenizerError, build_tokenizer, gpt2_tokenizer,
    replace_surrogates, tokenizer_from_dict,
)

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CORPUS = TINY_TEXT + "Ünïcødé, 日本語の文章, emoji 🙂🙃, numbers 12345 67.89, code: def f(x):\n    return x**2\n" * 20


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([CORPUS], 400)


def roundtrip(tok, text):
    return tok.decode(tok.encode(text))


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_byte_and_bpe_round_trip_any_unicode(bpe, text):
    assert roundtrip(ByteTokenizer(), text) == text
    assert roundtrip(bpe, text) == text
    assert roundtrip(tokenizer_from_dict(json.loads(json.dumps(bpe.to_dict()))), text) == text
    assert bpe.encode_array(text).tolist() == bpe.encode(text)


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(codec=None, categories=["Cs", "Ll", "Zs", "So"])))
def test_surrogates_become_what_they_stand_for_or_replacement_characters(bpe, text):
    expected = replace_surrogates(text)
    assert roundtrip(ByteTokenizer(), text) == expected
    assert roundtrip(bpe, text) == expected
    assert bpe.encode_array(text).tolist() == bpe.encode(text)


def test_surrogate_handling_is_documented_behaviour(bpe):
    for tok in (ByteTokenizer(), bpe):
        assert roundtrip(tok, "a\ud800b") == "a\ufffdb"  # a lone surrogate
        assert roundtrip(tok, "\ud83d\ude42") == "🙂"  # a pair: the character it encodes


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_char_round_trips_text_of_its_vocabulary(data):
    alphabet = data.draw(st.text(min_size=1))
    tok = build_tokenizer("char", [alphabet])
    text = data.draw(st.text(alphabet=sorted(set(alphabet))))
    assert roundtrip(tok, text) == text
    assert tok.encode_array(text).tolist() == tok.encode(text)
    assert tokenizer_from_dict(tok.to_dict()).chars == tok.chars


def test_char_vocabulary_is_sorted_and_independent_of_order():
    a = build_tokenizer("char", ["hello", "world"])
    b = build_tokenizer("char", ["dlrow", "olleh"])
    assert a.chars == b.chars == sorted(set("helloworld"))


def test_bpe_training_gives_the_requested_vocab_and_compresses_better_than_bytes(bpe):
    assert bpe.vocab_size == 400 and bpe.eot_id == 399 and bpe.name == "bpe-400"
    assert sorted(bpe.ranks.values()) == list(range(399)) and bpe.special_tokens == {EOT: 399}
    byte_tokens = len(ByteTokenizer().encode(CORPUS))
    assert len(bpe.encode(CORPUS)) < 0.5 * byte_tokens
    again = BPETokenizer.train([CORPUS], 400)
    assert again.ranks == bpe.ranks  # deterministic
    assert bpe.eot_id not in bpe.encode(EOT) + bpe.encode_array(EOT).tolist()  # user text is never special


def test_bpe_vocab_size_errors():
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer.train(["abc"], 256)
    with pytest.raises(TokenizerError, match="only supports .* tokens"):
        BPETokenizer.train(["abc abc"], 5000)
    with pytest.raises(TokenizerError, match="--vocab-size is required with --tokenizer bpe"):
        build_tokenizer("bpe", ["abc"])
    with pytest.raises(TokenizerError, match="only allowed there"):
        build_tokenizer("byte", vocab_size=300)


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_cutting_at_seams_keeps_the_tokens_of_the_whole_text(bpe, pattern):
    tok = bpe if pattern == "gpt4" else BPETokenizer("g2", GPT2_PATTERN, bpe.ranks, bpe.special_tokens)
    text = (CORPUS + "  \n\n x\r\ny \n  z\n") * 3
    pieces = list(sources.pieces([text], 300))
    assert len(pieces) > 10 and "".join(pieces) == text
    seamless = [p for p in pieces[:-1] if p[-1] == "\n" and not p[-2].isspace()]
    assert len(seamless) > len(pieces) // 2  # most cuts are at true seams
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text)


def test_gpt2_offline_error_says_how_to_provide_the_files(tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    def offline(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(TokenizerError, match=f"cache '{tmp_path}'.*TIKTOKEN_CACHE_DIR"):
        gpt2_tokenizer()
