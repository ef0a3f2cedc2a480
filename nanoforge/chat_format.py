"""
Conversations for chat fine-tuning (SFT) and chat: the format that turns messages into tokens, the
records it reads them from, and a built-in set of small tasks to fine-tune on offline.

The format (tokenizer.CHAT_TOKENS, as nanochat's):

    <|bos|> <|user_start|> question <|user_end|> <|assistant_start|> answer <|assistant_end|> <|user_start|> ...

A system message is merged into the first user turn. Roles alternate user, assistant, user, ...
after an optional system message. Training learns to produce the assistant turns only: the loss
mask is 1 on the tokens of each assistant reply and on its <|assistant_end|> (so the model learns
to stop), 0 on everything else, <|assistant_start|> included (the format, not the model, places it).

An assistant turn may call the calculator (tools.py): its content is then a list of parts,
[{"type": "text" | "python" | "python_output", "text": ...}], rendered as
<|python_start|> expression <|python_end|> <|output_start|> result <|output_end|> between the text parts.
The call is the model's to write (mask 1); the output is the engine's (mask 0, in every loss).
"""


from nanoforge import records
from nanoforge.errors import UserError
from nanoforge.tokenizer import has_tools

ROLES = ("system", "user", "assistant")


class ChatError(UserError):
    """A conversation that breaks the format; the message names the problem."""


def check_conversation(messages, for_reply=False):
    """messages: a list of {"role", "content"} -> [(role, content), ...] with the system message merged
    into the first user turn. A conversation for training ends with an assistant turn; one for a reply
    (for_reply) ends with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") is None or message.get("content") is None:
            raise ChatError(f"message {i + 1} is missing its 'role' or 'content' field")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ChatError(f"message {i + 1} has unknown role {role!r}: use one of {', '.join(ROLES)}")
        if role == "assistant" and isinstance(content, list):
            check_parts(content, i)
        elif not isinstance(content, str) or not content.strip():
            raise ChatError(f"message {i + 1} ({role}) has empty content")
        if role == "system" and i > 0:
            raise ChatError(f"message {i + 1} is a system message: only the first message may be one")
        turns.append((role, content))
    if turns[0][0] == "system":
        if len(turns) < 2 or turns[1][0] != "user":
            raise ChatError("a system message must be followed by a user message")
        turns = [("user", turns[0][1] + "\n\n" + turns[1][1])] + turns[2:]
    for i, (role, _) in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise ChatError(f"roles must alternate user, assistant, ...: turn {i + 1} is {role}, expected {expected}")
    if for_reply and turns[-1][0] != "user":
        raise ChatError("the conversation must end with a user message to be answered")
    if not for_reply and turns[-1][0] != "assistant":
        raise ChatError("the conversation has no assistant turn to learn from" if len(turns) == 1
                        else "the conversation ends with a user turn: its last message must be the assistant's")
    return turns


PART_TYPES = ("text", "python", "python_output")


def check_parts(parts, i):
    """An assistant turn with tool calls: a list of {"type": "text" | "python" | "python_output", "text"}."""
    if not parts or not all(isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str)
                            for p in parts):
        raise ChatError(f"message {i + 1} (assistant) has list content: each part must be {{\"type\": one of "
                        f"{', '.join(PART_TYPES)}, \"text\": a string}}")


def content_text(content):
    """All the text of a message's content (a string, or an assistant turn's parts)."""
    return content if isinstance(content, str) else "".join(part["text"] for part in content)


def render_conversation(tokenizer, messages):
    """Token ids of a whole conversation and its loss mask (1 on what the model learns to say).
    Returns (ids, mask), two lists of equal length. tokenizer must have the chat tokens."""
    ids, mask = render_turns(tokenizer, check_conversation(messages))
    return ids, mask


def render_for_reply(tokenizer, messages):
    """Token ids that ask for the next assistant turn: the conversation (ending with a user turn)
    followed by <|assistant_start|>."""
    ids, _ = render_turns(tokenizer, check_conversation(messages, for_reply=True))
    return ids + [tokenizer.chat_ids["<|assistant_start|>"]]


def render_turns(tokenizer, turns):
    chat = tokenizer.chat_ids
    ids, mask = [chat["<|bos|>"]], [0]
    for role, content in turns:
        if role == "user":
            text = tokenizer.encode(content)
            part = [chat["<|user_start|>"], *text, chat["<|user_end|>"]]
            ids += part
            mask += [0] * len(part)
        else:
            ids += [chat["<|assistant_start|>"]]
            mask += [0]
            for part_ids, part_mask in render_parts(tokenizer, content):
                ids += part_ids
                mask += part_mask
            ids += [chat["<|assistant_end|>"]]
            mask += [1]
    return ids, mask


def render_parts(tokenizer, content):
    """(ids, mask) of each part of an assistant turn: its text (a string is one text part), a call between
    <|python_start|> and <|python_end|> that the model learns to write (mask 1), and the call's output
    between <|output_start|> and <|output_end|>, which the engine writes, so no loss counts it (mask 0)."""
    if isinstance(content, str):
        text = tokenizer.encode(content)
        return [(text, [1] * len(text))]
    if not has_tools(tokenizer):
        raise ChatError("this conversation has tool calls, but the tokenizer has no tool tokens (it was made by an "
                        "earlier version): prepare the data again with this version")
    chat, rendered = tokenizer.chat_ids, []
    for part in content:
        text = tokenizer.encode(part["text"])
        if part["type"] == "text":
            rendered.append((text, [1] * len(text)))
        elif part["type"] == "python":
            rendered.append(([chat["<|python_start|>"], *text, chat["<|python_end|>"]], [1] * (len(text) + 2)))
        else:
            rendered.append(([chat["<|output_start|>"], *text, chat["<|output_end|>"]], [0] * (len(text) + 2)))
    return rendered


def require_chat_tokens(tokenizer):
    """Raise ChatError unless the tokenizer has the chat tokens (a model trained on chat data has them)."""
    if not hasattr(tokenizer, "chat_ids"):
        raise ChatError(f"this model's tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} tokens) has no chat "
                        "tokens, so it cannot chat: fine-tune it on chat data first (docs/chat.md)")


def fit_to_context(tokenizer, messages, block_size, max_new_tokens):
    """Drop the oldest user/assistant exchanges (a system message stays) until the prompt for the next
    reply leaves room for it: at most block_size - min(max_new_tokens, block_size // 2) tokens. The last
    user message is never dropped: alone, it may fill up to block_size (the reply then goes on past
    block_size as the engine's sliding window does). messages ends with a user message. Returns
    (messages kept, number of messages dropped); ChatError when the last message alone is too long.

    Linear in the conversation's length: each message is encoded once, and how many to drop is found from
    the sums of their lengths (render_turns encodes each turn on its own, so lengths add up), then checked
    with one rendering. Only a system message merged into the first kept turn can make the sum a few tokens
    off; a check that fails drops one more exchange."""
    budget = block_size - min(max_new_tokens, block_size // 2)
    check_conversation(messages, for_reply=True)
    head = messages[:1] if messages and messages[0].get("role") == "system" else []
    turns = messages[len(head):]
    head_length = len(tokenizer.encode(head[0]["content"] + "\n\n")) if head else 0
    # <|user_start|> text <|user_end|>, <|assistant_start|> text <|assistant_end|>: two chat tokens a turn
    lengths = [content_length(tokenizer, m["content"]) + 2 for m in turns]
    suffix = [0] * (len(turns) + 1)  # suffix[d]: tokens of turns d, d + 1, ...
    for d in range(len(turns) - 1, -1, -1):
        suffix[d] = suffix[d + 1] + lengths[d]
    dropped = 0  # <|bos|> and <|assistant_start|> are the 2
    while len(turns) - dropped > 1 and 2 + head_length + suffix[dropped] > budget:
        dropped += 2  # a user turn and the assistant's answer to it
    kept = head + turns[dropped:]
    n = len(render_for_reply(tokenizer, kept))
    while n > budget and len(turns) - dropped > 1:
        dropped += 2
        kept = head + turns[dropped:]
        n = len(render_for_reply(tokenizer, kept))
    if n > block_size:
        raise ChatError(f"the message is too long: {n} tokens with the chat format, more than the model's "
                        f"block_size {block_size}; shorten it")
    return kept, dropped


def content_length(tokenizer, content):
    """Tokens of a turn's content as render_turns writes it: its text, or an assistant's parts with their tool
    tokens (sample.py --chat keeps a reply's calls and outputs in the conversation)."""
    if isinstance(content, str):
        return len(tokenizer.encode(content))
    return sum(len(ids) for ids, _ in render_parts(tokenizer, content))


def conversation_from_record(record):
    """A record of a chat dataset -> messages. Two shapes are read: {"messages": [...]} and Alpaca's
    {"instruction", "input" (optional), "output"}, which becomes one user and one assistant turn."""
    if not isinstance(record, dict):
        raise ChatError("a record must be a JSON object with 'messages', or 'instruction' and 'output'")
    if "messages" in record:
        return record["messages"]
    if "instruction" in record:
        if "output" not in record:
            raise ChatError("an Alpaca-style record needs an 'output' field beside 'instruction'")
        instruction, extra = record["instruction"], record.get("input") or ""
        if not isinstance(instruction, str) or not isinstance(extra, str):
            raise ChatError("'instruction' and 'input' must be strings")
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
    raise ChatError(f"a chat record needs 'messages', or 'instruction' and 'output'; it has {sorted(record)}")


def is_chat_record(record):
    """Whether a record is a conversation ('messages', or Alpaca's 'instruction') rather than a document."""
    return isinstance(record, dict) and bool({"messages", "instruction"} & set(record))


def is_chat_file(path):
    """Whether a .jsonl or .parquet file holds conversations rather than documents: its first record's
    fields (JSONL) or its columns (Parquet) make a chat record."""
    return is_chat_record(dict.fromkeys(records.field_names(path)))


def read_conversations(path, to_messages=conversation_from_record):
    """(where, messages) for each record of a chat JSONL or Parquet file, messages checked; for a record
    that is not a valid conversation, a records.BadRecord naming the file, line or row and the problem.
    to_messages: a dataset's record shape -> messages."""
    for where, record in records.read_records(path):
        if not isinstance(record, records.BadRecord):
            try:
                messages = to_messages(record)
                check_conversation(messages)
                record = messages
            except ChatError as e:
                record = records.BadRecord(f"{where}: {e}")
        yield where, record
