"""Instruction and chat data for supervised fine-tuning: read, check, render with the chat template, mask.

Two file shapes are read: alpaca (``instruction``, optional ``input``, ``output``; a JSON array in ``.json`` or one
object per line in ``.jsonl``) and chat (``messages`` in the OpenAI shape, ``[{"role": ..., "content": ...}]``).
Every conversation is rendered with the tokenizer's own chat template, and its labels are -100 except on the
assistant turns' tokens, each turn's end token included (so the model learns to stop).

The assistant tokens are found by rendering the conversation prefix by prefix: the tokens of the turns before an
assistant turn plus the generation prompt must be a prefix of the tokens of the conversation up to and including
that turn, which must be a prefix of the whole. Where a template breaks this (one that rewrites earlier turns, say)
the span cannot be trusted, and the template is refused rather than guessed at.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from adapterkit.train.data import DataError

IGNORE = -100  # the label cross-entropy skips
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """One example: its messages and where it came from (``file:line``, for errors)."""

    messages: list[dict[str, str]]
    where: str


@dataclass
class Tokenized:
    """Token ids and labels (``IGNORE`` outside the assistant turns) of each example, unpadded, plus bookkeeping."""

    ids: list[list[int]]
    labels: list[list[int]]
    where: list[str]
    truncated: int = 0  # examples cut to max_length
    dropped: list[str] = field(default_factory=list)  # where the examples are that the cut left without an answer

    def __len__(self) -> int:
        return len(self.ids)


def shipped_alpaca() -> Path:
    """The Alpaca Libre instruction set shipped inside the package (1,173 rows; README beside it)."""
    return Path(str(resources.files("adapterkit") / "data" / "alpaca_libre" / "train.jsonl"))


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """(line, value) of each record of a ``.jsonl`` file or of a ``.json`` file holding an array."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {file} does not exist")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{file}: not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"data file {file} is empty")
    if file.suffix.lower() == ".json" or text.lstrip().startswith("["):
        return _json_array(file, text)
    records = []
    for number, line in enumerate(text.split("\n"), 1):  # split("\n"): a text may hold U+2028
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise DataError(f"{file}:{number}: invalid JSON ({exc.msg})") from None
    return records


def _json_array(file: Path, text: str) -> list[tuple[int, Any]]:
    """The elements of a JSON array with the line each starts on (json.loads would lose the lines)."""
    decoder = json.JSONDecoder()
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        raise DataError(f"{file}: expected a JSON array of examples")
    at += 1
    records: list[tuple[int, Any]] = []
    while True:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if text.startswith("]", at):
            return records
        line = text.count("\n", 0, at) + 1
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        records.append((line, value))
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        if text.startswith(",", at):
            at += 1
        elif not text.startswith("]", at):
            raise DataError(f"{file}:{text.count(chr(10), 0, at) + 1}: expected ',' or ']' in the array")


def is_instruction_file(path: str | Path) -> bool:
    """Whether a .json / .jsonl file holds instruction or chat examples (its first record has ``messages`` or
    ``instruction``), as opposed to a labelled table."""
    if Path(path).suffix.lower() not in (".json", ".jsonl"):
        return False
    records = read_records(path)
    first = records[0][1] if records else None
    return isinstance(first, dict) and ("messages" in first or "instruction" in first)


def read_conversations(path: str | Path) -> list[Conversation]:
    """Every example of an alpaca or chat file as a checked conversation; a one-line error (file:line) otherwise."""
    conversations = [to_conversation(value, f"{path}:{line}") for line, value in read_records(path)]
    if not conversations:
        raise DataError(f"data file {path} holds no examples")
    return conversations


def to_conversation(record: Any, where: str) -> Conversation:
    """An alpaca record (instruction / input / output) or a chat record (messages) as a checked conversation."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    elif "instruction" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: alpaca field {key!r} must be a string, got "
                                f"{type(record.get(key)).__name__ if key in record else 'nothing'}")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: alpaca field 'input' must be a string, got {type(extra).__name__}")
        prompt = record["instruction"] + (f"\n\n{extra}" if extra.strip() else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise DataError(f"{where}: neither a chat example ('messages') nor an alpaca one ('instruction', 'output'); "
                        f"keys: {', '.join(map(str, record)) or 'none'}")
    check_messages(messages, where)
    return Conversation([{"role": m["role"], "content": m["content"]} for m in messages], where)


def check_messages(messages: list[Any], where: str) -> None:
    """Roles, contents and turn order a conversation must have; a one-line error naming the turn otherwise."""
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {number} must be an object with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise DataError(f"{where}: message {number} has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            shown = "missing" if "content" not in message else f"a {type(content).__name__}, not a string"
            raise DataError(f"{where}: message {number} ({role}) content is {shown}")
        if role == "system" and number > 1:
            raise DataError(f"{where}: message {number} is a system message; only the first may be one")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {number} is an empty assistant turn (nothing to learn)")
    turns = [m["role"] for m in messages if m["role"] != "system"]
    if "assistant" not in turns:
        raise DataError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    if turns[0] != "user":
        raise DataError(f"{where}: the first turn after the system prompt must be the user's, not the assistant's")


def split(items: list[Any], share: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, dev): a seeded ``share`` of the items held out (at least one, and at least one kept)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    cut = min(max(1, round(len(order) * share)), len(order) - 1)
    if cut < 1:
        raise DataError(f"{len(items)} example(s) cannot be split into train and dev; pass --dev")
    return [items[i] for i in order[cut:]], [items[i] for i in order[:cut]]


def model_limit(tokenizer: Any, model_config: Any = None) -> tuple[int, str]:
    """The longest sequence the model takes, and which setting says so."""
    limits = []
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if isinstance(positions, int) and positions > 0:
        limits.append((positions, "max_position_embeddings"))
    length = getattr(tokenizer, "model_max_length", None)
    if isinstance(length, int) and 0 < length < 10**8:  # "no limit" is a huge sentinel
        limits.append((length, "the tokenizer's model_max_length"))
    return min(limits) if limits else (10**9, "none")


def render(tokenizer: Any, conversations: list[Conversation], max_length: int, model_config: Any = None,
           ) -> Tokenized:
    """Token ids and assistant-only labels of every conversation, cut to ``max_length`` tokens.

    An example whose prompt alone fills ``max_length`` has nothing left to learn from: it is left out and listed in
    ``dropped``; if that leaves no example, the data is refused.
    """
    limit, source = model_limit(tokenizer, model_config)
    out = Tokenized([], [], [])
    first_cut = ""
    for conv in conversations:
        ids, spans = assistant_spans(tokenizer, conv)
        if len(ids) > limit:
            raise DataError(f"{conv.where}: {len(ids)} tokens, longer than the model's limit of {limit} ({source}); "
                            f"lower --max-length below it to truncate")
        labels = [IGNORE] * len(ids)
        for start, end in spans:
            labels[start:end] = ids[start:end]
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            out.truncated += 1
            if all(label == IGNORE for label in labels):
                out.dropped.append(conv.where)
                first_cut = first_cut or f"{conv.where}'s first answer starts at token {spans[0][0]}"
                continue
        out.ids.append(ids)
        out.labels.append(labels)
        out.where.append(conv.where)
    if not out.ids:
        raise DataError(f"cutting the examples to --max-length {max_length} tokens leaves none with an assistant token "
                        f"({first_cut}); raise --max-length")
    return out


def prompt_ids(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[int]:
    """Tokens of ``messages`` followed by the generation prompt: what a model continues to answer."""
    return _tokens(tokenizer, messages, where, generation_prompt=True)


def assistant_spans(tokenizer: Any, conv: Conversation) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's tokens and the [start, end) token spans of its assistant turns (end token included)."""
    full = _tokens(tokenizer, conv.messages, conv.where, generation_prompt=False)
    eos = tokenizer.eos_token_id
    spans = []
    for index, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        before = _tokens(tokenizer, conv.messages[:index], conv.where, generation_prompt=True)
        through = _tokens(tokenizer, conv.messages[:index + 1], conv.where, generation_prompt=False)
        if through[:len(before)] != before or full[:len(through)] != through or len(through) <= len(before):
            raise DataError(f"{conv.where}: the tokenizer's chat template does not render this conversation prefix "
                            f"by prefix (turn {index + 1}), so its assistant tokens cannot be found; use a model "
                            "whose template appends each turn without rewriting earlier ones")
        end = len(through)
        turn = through[len(before):]
        if eos is not None and eos in turn:  # stop after the turn's end token (a template may add a newline)
            end = len(before) + len(turn) - turn[::-1].index(eos)
        spans.append((len(before), end))
    return full, spans


def _tokens(tokenizer: Any, messages: list[dict[str, str]], where: str, generation_prompt: bool) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the tokenizer has no chat template; instruction data needs a chat (instruct) model")
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as exc:
        raise DataError(f"{where}: the chat template rejects this conversation ({exc})") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
