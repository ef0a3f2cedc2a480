"""
Sampling: which tokens may be picked (top-k, top-p, repetition penalty), picking one from per-row
random numbers, turning tokens into streamed text with stop strings, and prompt lookup drafts.
"""


import torch
from torch.nn import functional as F

from nanoforge.errors import UserError


def candidates(logits, top_k=None, top_p=1.0):
    """The tokens sampling may pick from. logits (B, V) -> (values, ids), each (B, K).

    values are logits, set to -inf outside the top_k most likely tokens and outside the top_p
    nucleus: the smallest set of most likely tokens whose probabilities sum to at least top_p
    (Holtzman et al. 2019, "The Curious Case of Neural Text Degeneration"). ids maps column j
    back to a token id; it is None when no filter applies and column j is token j."""
    ids = None
    if top_k:
        logits, ids = torch.topk(logits, min(top_k, logits.size(-1)))  # sorted, most likely first
    if top_p < 1.0:
        if ids is None:
            logits, ids = logits.sort(dim=-1, descending=True)
        probs = F.softmax(logits, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens; 0 for the most likely
        logits = logits.masked_fill(before >= top_p, float("-inf"))
    return logits, ids


def penalize_repetition(logits, seen, penalty):
    """Make tokens already in the sequence less likely: positive logits are divided by the
    penalty, negative ones multiplied (Keskar et al. 2019, CTRL). seen: (B, V) bool."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_from(values, ids, uniforms):
    """Pick one token per row by inverse transform: the first column whose cumulative
    probability exceeds u * total. Columns of probability 0 (-inf logits) can never be picked.
    values (B, K) logits, uniforms (B,) in [0, 1) -> token ids (B,)."""
    cdf = F.softmax(values.float(), dim=-1).double().cumsum(dim=-1)  # float64: no round-off past the end
    # u < 1 is a float32, so u * total stays below total: the search never runs off the end.
    choice = torch.searchsorted(cdf, (uniforms.double() * cdf[:, -1]).unsqueeze(1), right=True)  # (B, 1)
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)


class TextStream:
    """One sample's tokens turned into text as they arrive. Text is released only once it
    is final: never partway through a multi-byte character (a byte or BPE token can end inside
    one, and the tokenizer decodes an incomplete character as U+FFFD), and never while its end
    could be the start of a stop string. The stop string and anything after it are dropped."""

    MAX_PENDING = 16  # a character has at most 4 bytes; past this the bytes are just invalid

    def __init__(self, tokenizer, stop=()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.pending = []  # tokens not yet decoded into text
        self.text = ""
        self.released = 0  # characters of text already handed out
        self.stopped = False  # a stop string was found

    def push(self, token):
        """Add one token; returns the text that became final (often "")."""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < self.MAX_PENDING:
            return ""  # wait: the next token may complete the character
        self.pending = []
        self.add(piece)
        return self.release()

    def finish(self):
        """The sample ended: release everything that is left."""
        if self.pending and not self.stopped:
            self.add(self.tokenizer.decode(self.pending))
            self.pending = []
        self.stopped = True
        return self.release()

    def add(self, piece):
        search_from = max(0, len(self.text) - max((len(s) for s in self.stop), default=1) + 1)
        self.text += piece
        found = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def release(self):
        end = len(self.text)
        if not self.stopped:  # hold back a tail that may grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        out, self.released = self.text[self.released : end], max(self.released, end)
        return out


def lookup_draft(tokens, k, max_ngram=3):
    """Prompt lookup decoding (Saxena 2023): the up to k tokens that followed the latest earlier
    occurrence of the sequence's last n tokens, trying n = max_ngram first; [] when none. Free to
    compute and often right on text that repeats itself (code, quotes, lists, names)."""
    if k < 1:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + k]
    return []


class SettingError(UserError):
    """A generation setting out of its range; name is the keyword argument's name."""

    def __init__(self, name, expected, value):
        super().__init__(f"{name} must be {expected}, got {value!r}")
        self.name, self.expected, self.value = name, expected, value


def check_lookup(lookup, temperature, repetition_penalty, n_prompts):
    """Prompt lookup is exact for greedy decoding of one prompt only."""
    if lookup and not (lookup > 0 and temperature == 0 and repetition_penalty == 1.0 and n_prompts == 1):
        raise SettingError("lookup", "0 (off), or above 0 with one prompt (--num-samples 1), temperature 0 and "
                           "repetition_penalty 1", lookup)


def check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, slide, block_size):
    if max_new_tokens < 1:
        raise SettingError("max_new_tokens", "at least 1", max_new_tokens)
    if not temperature >= 0:
        raise SettingError("temperature", "at least 0 (0 picks the most likely token)", temperature)
    if top_k is not None and top_k < 0:
        raise SettingError("top_k", "at least 0 (0 keeps every token)", top_k)
    if not 0 < top_p <= 1:
        raise SettingError("top_p", "in (0, 1] (1 keeps every token)", top_p)
    if not repetition_penalty > 0:
        raise SettingError("repetition_penalty", "above 0 (1 leaves the logits alone)", repetition_penalty)
    if not 1 <= slide <= block_size:
        raise SettingError("slide", f"between 1 and the model's block_size {block_size}", slide)
