"""
The calculator a chat model can call, and the per-row state machine that the engine runs it with.

In a reply the model writes an expression between tool tokens, and the engine writes the result back:

    <|assistant_start|> <|python_start|> 347+85 <|python_end|> <|output_start|> 432 <|output_end|> 432 <|assistant_end|>
                        '--------- sampled by the model --------' '---- forced by the engine ----' sampled

The output tokens are fed to the model, not sampled (like a prompt that is still being read), so no loss ever
counts them: chat_format's SFT mask is 0 there, and rl.py's policy gradient leaves them out (Sample.forced).

calculate() is a small evaluator of arithmetic written with Python's ast module (never eval or exec): numbers and
+ - * / // % ** and parentheses, with bounded sizes. Whatever the model writes, it returns a string: the result,
or "error: ..." saying what was wrong (a bad expression, a division by zero, a number too large). A call that the
model never closes (another chat token inside it, or more than MAX_CALL_TOKENS tokens) gets an error output too,
and the reply goes on.
"""

import ast
import math
import operator

from nanoforge.errors import UserError
from nanoforge.sampling import TextStream

MAX_EXPRESSION_CHARS = 200
MAX_CALL_TOKENS = 64  # a call longer than this is closed as unclosed: a model looping inside a call stops paying
MAX_DIGITS = 100  # no number (operand or result) may have more digits: 10**10**10 is refused, not computed
MAX_EXPONENT = 1000

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
SIGNS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class CalculatorError(Exception):
    """What is wrong with an expression; calculate() turns it into the tool's output."""


def calculate(expression):
    """The value of an arithmetic expression as text, or "error: ..." (never an exception)."""
    try:
        if len(expression) > MAX_EXPRESSION_CHARS:
            raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except (SyntaxError, ValueError):
            raise CalculatorError("not an arithmetic expression") from None
        return format_number(evaluate(tree.body))
    except CalculatorError as e:
        return f"error: {e}"
    except ZeroDivisionError:
        return "error: division by zero"
    except (OverflowError, RecursionError, MemoryError):
        return "error: number too large"


def evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool and complex are not numbers here
        return check_size(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in SIGNS:
        return SIGNS[type(node.op)](evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left), evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            check_power(left, right)
        return check_size(OPERATORS[type(node.op)](left, right))
    raise CalculatorError("only numbers, + - * / // % ** and parentheses are allowed")


def check_power(base, exponent):
    """Refuse a power before computing it when its result would be too large (10**10**10 would take forever)."""
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent above {MAX_EXPONENT}")
    if abs(base) > 1 and exponent > 0 and exponent * math.log10(abs(base)) > MAX_DIGITS:
        raise CalculatorError("number too large")
    if base == 0 and exponent < 0:
        raise ZeroDivisionError
    if isinstance(exponent, float) and base < 0 and not exponent.is_integer():
        raise CalculatorError("a negative number to a fractional power is not a real number")


def check_size(value):
    if isinstance(value, int) and abs(value) >= 10**MAX_DIGITS:
        raise CalculatorError("number too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("number too large")
    return value


def format_number(value):
    """Integers exactly; floats with up to 10 significant digits (a whole float as an integer: 6/3 is 2)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value) if isinstance(value, int) else format(value, ".10g")


class ToolCalls:
    """One row's tool state in the engine: after() sees each token the row takes and returns the tokens the engine
    must feed next (the output of a call that just closed), [] otherwise. calls holds (expression, output) pairs."""

    def __init__(self, tokenizer):
        chat = tokenizer.chat_ids
        self.tokenizer = tokenizer
        self.start, self.end = chat["<|python_start|>"], chat["<|python_end|>"]
        self.output_start, self.output_end = chat["<|output_start|>"], chat["<|output_end|>"]
        self.chat_ids = set(chat.values())
        self.expression = None  # the ids of the call being written; None outside a call
        self.calls = []

    def after(self, token):
        if self.expression is None:
            if token == self.start:
                self.expression = []
            return []
        if token == self.end:
            return self.answer(calculate(self.tokenizer.decode(self.expression)))
        if token in self.chat_ids or len(self.expression) >= MAX_CALL_TOKENS:
            return self.answer("error: unclosed call")  # short: the model reads every token of an output
        self.expression.append(token)
        return []

    def answer(self, output):
        self.calls.append((self.tokenizer.decode(self.expression), output))
        self.expression = None
        return [self.output_start, *encode_known(self.tokenizer, output), self.output_end]


def encode_known(tokenizer, text):
    """text's ids, leaving out characters a character-level vocabulary lacks (an error message may hold some):
    the engine must never fail on what a tool says."""
    try:
        return tokenizer.encode(text)
    except UserError:
        return [i for c in text for i in safe_char(tokenizer, c)]


def safe_char(tokenizer, c):
    try:
        return tokenizer.encode(c)
    except UserError:
        return []


def part_changes(tokenizer):
    """{tool token id: the kind of reply part that follows it}: the call ("python") after <|python_start|>, its
    output ("python_output") after <|output_start|>, text again after <|python_end|> and <|output_end|>."""
    chat = tokenizer.chat_ids
    return {chat[name]: kind for name, kind in (("<|python_start|>", "python"), ("<|output_start|>", "python_output"),
                                                ("<|python_end|>", "text"), ("<|output_end|>", "text"))
            if name in chat}


def reply_parts(tokenizer, ids):
    """A reply's token ids (as the engine made them, tool tokens included) -> the assistant content as parts:
    [{"type": "text" | "python" | "python_output", "text": ...}], the shape chat_format renders. The text parts
    joined are the reply's final text (final_text)."""
    changes, chat = part_changes(tokenizer), set(tokenizer.chat_ids.values())
    parts, kind, run = [], "text", []

    def flush():
        if run or kind != "text":
            parts.append({"type": kind, "text": tokenizer.decode(run)})

    for token in ids:
        if token in changes:
            flush()
            kind, run = changes[token], []
        elif token not in chat:
            run.append(token)
    flush()
    return [p for p in parts if p["type"] != "text" or p["text"]]


def final_text(parts):
    """The text a user reads as the answer: the reply without its calls and their outputs."""
    return "".join(p["text"] for p in parts if p["type"] == "text")


class ReplyText:
    """A reply's final text as it streams, for a server: the engine's text (a TextStream, whose stop strings see the
    whole reply, calls and chat tokens' names included, as Generator.generate's do) less the calls, their outputs
    and the chat tokens' names. Without a stop string the whole of it is final_text(reply_parts(ids)).
    push(token) returns the final text that became final; shows(token), asked before push, whether token is part
    of it. text and stopped are the TextStream's.

    Why a piece of the stream's text can be told apart: a chat token decodes to its name (ChatTokenizer.decode), so
    the stream's pending tokens are decoded (released) at every chat token, and the reply changes part only at one."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stream = tokenizer, TextStream(tokenizer, stop)
        self.changes, self.chat = part_changes(tokenizer), set(tokenizer.chat_ids.values())
        self.kind = "text"  # the part the reply is in
        self.hidden = []  # [start, end) ranges of stream.text that are not the final text, in order
        self.shown = 0  # characters of stream.text looked at by release() so far

    @property
    def text(self):
        return self.stream.text

    @property
    def stopped(self):
        return self.stream.stopped

    def shows(self, token):
        return self.kind == "text" and token not in self.chat

    def push(self, token):
        stream, start = self.stream, len(self.stream.text)
        # a chat token's name comes after the pending tokens' text, which is still of the part before it
        name_at = start + len(self.tokenizer.decode(stream.pending)) if token in self.chat else None
        stream.push(token)
        if name_at is None:
            self.hide(start, len(stream.text), self.kind != "text")
        else:
            self.hide(start, name_at, self.kind != "text")
            self.hide(name_at, len(stream.text), True)
            self.kind = self.changes.get(token, self.kind)
        return self.release()

    def finish(self):
        self.stream.finish()
        return self.release()

    def hide(self, start, end, hidden):
        if hidden and end > start:
            self.hidden.append((start, end))

    def release(self):
        """The final text in stream.text[shown:released] (what the stream has released since the last call)."""
        end, pieces, at = min(self.stream.released, len(self.stream.text)), [], self.shown
        for a, b in self.hidden:
            if b > at and a < end:
                pieces.append(self.stream.text[at:a])
                at = b
        pieces.append(self.stream.text[at:end])
        self.shown = max(self.shown, end)
        return "".join(pieces)
