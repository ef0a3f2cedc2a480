"""
Tokenizers: text <-> token ids, described as plain JSON so that they travel inside
meta.json and every checkpoint (a checkpoint never needs the data directory to sample).

- char: one token per distinct character of the corpus, in sorted order.
- byte: the 256 byte values of UTF-8, plus an end-of-text token. Needs no training.
- bpe: byte-level BPE encoded by tiktoken from merge ranks stored in the description.
  Trained on the user's corpus with rustbpe (BPETokenizer.train), or OpenAI's GPT-2 BPE
  (50257 tokens, <|endoftext|> = 50256) taken from tiktoken.

Surrogates: a Python str may hold lone surrogate code points (from JSON "\\ud800" escapes or
"surrogateescape" decoding); they are not Unicode text and have no UTF-8 form. The byte and BPE
tokenizers treat them as tiktoken does: a high+low pair becomes the character it stands for, a
lone surrogate becomes U+FFFD. So decode(encode(s)) == s for every s without surrogates, and
== replace_surrogates(s) for every s. The char tokenizer keeps any character of its vocabulary.
"""

import base64
import binascii
import os
import tempfile

import numpy as np

from nanoforge.errors import UserError

# GPT-4's pre-split regex (cl100k_base, as rustbpe uses it): contractions, letter runs with one
# leading non-letter, digit groups of up to three, punctuation runs, newlines, other whitespace.
# Training and encoding split text with the same pattern, so every trained merge can apply.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
EOT = "<|endoftext|>"
# The chat format's tokens (chat_format places them): a conversation starts with <|bos|>, and each turn sits
# between its role's start and end tokens. System text is merged into the first user turn, as nanochat does.
# The calculator's tokens come after them (tools.py): the assistant writes an expression between
# <|python_start|> and <|python_end|>, the engine answers between <|output_start|> and <|output_end|> (nanochat's names).
# They were appended, so the first five ids are what they were: a checkpoint or prepared data that saved the
# earlier five-token list (CHAT_TOKENS_V1) still loads, as a chat tokenizer without the tool tokens.
CHAT_TOKENS_V1 = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
CHAT_TOKENS = CHAT_TOKENS_V1 + TOOL_TOKENS


def replace_surrogates(text):
    """text with surrogate code points made valid: pairs joined, lone ones -> U+FFFD (as tiktoken)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def utf8(text):
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return replace_surrogates(text).encode("utf-8")


def without_surrogates(text):
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return replace_surrogates(text)


class TokenizerError(UserError):
    """Text the tokenizer cannot encode, or a tokenizer that cannot be built."""


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)
        self.eot_id = None  # a character vocabulary has no end-of-text token

    @classmethod
    def train(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        try:
            return [self.index[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.index})
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in unknown[:5])
            raise TokenizerError(
                f"text contains {len(unknown)} character(s) not in this model's vocabulary: {shown}; "
                "remove them (a char-level model only knows the characters of its training text)"
            ) from None

    def encode_array(self, text, dtype=np.int64):
        """Fast vectorised encode of a large corpus: UTF-32 code points looked up in a table."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(max(map(ord, self.chars)) + 1, -1, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(self.vocab_size)
        ids = table[np.minimum(codes, len(table) - 1)]
        if (ids < 0).any() or (codes >= len(table)).any():
            self.encode(text)  # raises with the offending characters
        return ids.astype(dtype, copy=False)

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def to_dict(self):
        return {"type": "char", "chars": "".join(self.chars)}


class ByteTokenizer:
    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text):
        return list(utf8(text))

    def encode_array(self, text, dtype=np.int64):
        return np.frombuffer(utf8(text), dtype=np.uint8).astype(dtype)

    def decode(self, ids):
        # The end-of-text token has no bytes; bytes that are not valid UTF-8 become U+FFFD.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_dict(self):
        return {"type": "byte"}


class BPETokenizer:
    """Byte-level BPE encoded by tiktoken from merge ranks that are stored as data.

    The description holds the pre-split regex, the ranks in tiktoken's text format (one
    "base64(token bytes) rank" per line) and the special tokens, so a checkpoint carries the
    whole tokenizer: no network or cache is needed to sample from it."""

    kind = "bpe"

    def __init__(self, name, pattern, ranks, special_tokens):
        import tiktoken

        self.name, self.pattern, self.ranks, self.special_tokens = name, pattern, ranks, dict(special_tokens)
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.vocab_size = self.enc.n_vocab
        self.eot_id = self.special_tokens.get("<|endoftext|>")

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn vocab_size - 1 byte-level tokens (256 bytes + merges) from an iterable of strings,
        plus <|endoftext|> as the last id. rustbpe counts the regex pieces in parallel and keeps only
        their counts, so memory follows the number of distinct pieces, not the corpus size."""
        import rustbpe

        if not 257 <= vocab_size <= 2**32:
            raise TokenizerError(f"--vocab-size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(map(without_surrogates, texts), vocab_size - 1, pattern=GPT4_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        if len(ranks) < vocab_size - 1:
            raise TokenizerError(
                f"the corpus only supports {len(ranks) + 1} tokens (every pair of pieces is merged already): "
                f"use --vocab-size {len(ranks) + 1} or less, or more text"
            )
        return cls(f"bpe-{vocab_size}", GPT4_PATTERN, ranks, {EOT: len(ranks)})

    @classmethod
    def from_dict(cls, d):
        ranks = {}
        for line in d["ranks"].splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        special = d["special_tokens"]
        # ids 0..n-1 for the n merges' tokens, then the special tokens: the vocabulary tiktoken builds from them
        if sorted(ranks.values()) != list(range(len(ranks))) or not all(len(token) for token in ranks):
            raise ValueError("the ranks must give distinct non-empty tokens the ids 0 to n - 1")
        if not all(bytes([b]) in ranks for b in range(256)):  # tiktoken panics on a byte it has no token for
            raise ValueError("the ranks must hold every single byte (a byte-level BPE)")
        if not (isinstance(special, dict) and all(isinstance(k, str) and type(v) is int for k, v in special.items())
                and sorted(special.values()) == list(range(len(ranks), len(ranks) + len(special)))):
            raise ValueError("'special_tokens' must map names to the ids right after the ranks'")
        if not isinstance(d["name"], str) or not isinstance(d["pattern"], str):
            raise ValueError("'name' and 'pattern' must be strings")
        return cls(d["name"], d["pattern"], ranks, special)

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # "<|endoftext|>" in user text is plain text, not the special token

    def encode_array(self, text, dtype=np.int64):
        """encode() as an array, without building a Python list (faster, for preparing corpora)."""
        try:
            ids = self.enc.encode_to_numpy(text, disallowed_special=())  # special-token text stays text
        except UnicodeEncodeError:
            ids = self.enc.encode_to_numpy(replace_surrogates(text), disallowed_special=())
        return ids.astype(dtype)

    def decode(self, ids):
        return self.enc.decode(list(ids), errors="replace")

    def to_dict(self):
        lines = (f"{base64.b64encode(token).decode()} {rank}" for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        return {"type": "bpe", "name": self.name, "pattern": self.pattern, "ranks": "\n".join(lines),
                "special_tokens": self.special_tokens}


class ChatTokenizer:
    """A tokenizer plus CHAT_TOKENS, as ids right after its own vocabulary, so a model trained with the
    base tokenizer keeps its ids and only grows by these rows. Text goes through the base tokenizer
    alone: a message holding the literal text "<|user_start|>" encodes as ordinary characters, and only
    the chat format (chat_format) ever places a chat token."""

    def __init__(self, base, names=CHAT_TOKENS):
        self.base, self.names = base, tuple(names)  # names: CHAT_TOKENS, or CHAT_TOKENS_V1 for older files
        self.kind = base.kind
        self.chat_ids = {name: base.vocab_size + i for i, name in enumerate(self.names)}
        self.vocab_size = base.vocab_size + len(self.names)
        self.eot_id = base.eot_id

    def encode(self, text):
        return self.base.encode(text)

    def encode_array(self, text, dtype=np.int64):
        return self.base.encode_array(text, dtype)

    def decode(self, ids):
        """Chat tokens decode to their names, so a transcript shows the conversation's structure."""
        pieces, run = [], []
        for i in ids:
            if i >= self.base.vocab_size:
                pieces += [self.base.decode(run), self.names[i - self.base.vocab_size]]
                run = []
            else:
                run.append(i)
        return "".join(pieces) + self.base.decode(run)

    def to_dict(self):
        return {**self.base.to_dict(), "chat_tokens": list(self.names)}


def has_tools(tokenizer):
    """Whether a tokenizer has the tool tokens (a chat tokenizer of an earlier version has only five chat tokens)."""
    return TOOL_TOKENS[0] in getattr(tokenizer, "chat_ids", {})


def with_chat_tokens(tokenizer):
    """tokenizer extended by the chat tokens (itself when it has them already)."""
    return tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)


def gpt2_tokenizer():
    """OpenAI's GPT-2 BPE (50257 tokens, <|endoftext|> = 50256) from tiktoken's files."""
    import tiktoken

    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests' or its own errors when it cannot download
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        raise TokenizerError(
            f"GPT-2 tokenizer files are not in tiktoken's cache '{cache}' and could not be downloaded "
            f"({type(e).__name__}): run `python -c \"import tiktoken; tiktoken.get_encoding('gpt2')\"` once "
            "with network access, or copy that cache directory from a machine where it ran and point "
            "TIKTOKEN_CACHE_DIR at it"
        ) from None
    # tiktoken keeps the ranks and pattern on the Encoding; copy them so the tokenizer travels as data.
    return BPETokenizer("gpt2", enc._pat_str, enc._mergeable_ranks, enc._special_tokens)


KINDS = ("char", "byte", "bpe", "gpt2")


def check_tokenizer_args(kind, vocab_size):
    if kind not in KINDS:
        raise TokenizerError(f"unknown tokenizer '{kind}': choose one of {', '.join(KINDS)}")
    if (vocab_size is not None) != (kind == "bpe"):
        raise TokenizerError("--vocab-size is required with --tokenizer bpe (e.g. 4096) and only allowed there")


def build_tokenizer(kind, texts=None, vocab_size=None):
    """A new tokenizer of the given kind. char and bpe learn from texts (an iterable of strings);
    bpe needs vocab_size."""
    check_tokenizer_args(kind, vocab_size)
    if kind == "char":
        chars = set()
        for t in texts:
            chars.update(t)
        return CharTokenizer(sorted(chars))
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    return gpt2_tokenizer()


def tokenizer_from_dict(d):
    """Rebuild a tokenizer from its JSON description (meta.json or a checkpoint). The description comes from a
    file: one that is damaged or hand-edited gets a TokenizerError, whatever is wrong in it."""
    if not isinstance(d, dict):
        raise TokenizerError(f"a saved tokenizer description must be a JSON object, got {type(d).__name__}: "
                             "prepare the data again, or use an intact checkpoint")
    try:
        return build_from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as e:
        raise TokenizerError(f"the saved {d.get('type')!r} tokenizer description is damaged ({type(e).__name__}: "
                             f"{e}): prepare the data again, or use an intact checkpoint") from None


def build_from_dict(d):
    if "chat_tokens" in d:
        if d["chat_tokens"] not in (list(CHAT_TOKENS), list(CHAT_TOKENS_V1)):
            raise TokenizerError(f"saved chat tokens {d['chat_tokens']} are not this version's {list(CHAT_TOKENS)}: "
                                 "use the version of this project that wrote them")
        return ChatTokenizer(tokenizer_from_dict({k: v for k, v in d.items() if k != "chat_tokens"}), d["chat_tokens"])
    kind = d.get("type")
    if kind == "char":
        if not isinstance(d["chars"], str) or len(set(d["chars"])) != len(d["chars"]):
            raise ValueError("'chars' must be a string of distinct characters")
        return CharTokenizer(d["chars"])
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.from_dict(d)
    raise TokenizerError(f"unknown tokenizer type {kind!r} in saved description: expected char, byte or bpe")


def token_byte_counts(tokenizer):
    """How many UTF-8 bytes of text each token id stands for: an int64 array of vocab_size. End-of-text
    and chat tokens stand for no text (0). Byte-level tokens that split a character count the bytes
    they hold, so the counts of a token sequence add up to the bytes of its text (bits per byte)."""
    if isinstance(tokenizer, ChatTokenizer):
        return np.concatenate([token_byte_counts(tokenizer.base), np.zeros(len(tokenizer.names), np.int64)])
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    if tokenizer.kind == "char":
        counts[:] = [len(utf8(c)) for c in tokenizer.chars]
    elif tokenizer.kind == "byte":
        counts[:256] = 1
    else:
        for token, rank in tokenizer.ranks.items():  # the special tokens keep 0
            counts[rank] = len(token)
    return counts
