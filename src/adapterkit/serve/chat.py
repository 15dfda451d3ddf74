"""Chat requests: the messages checked one by one, then the model's chat template applied with the generation
prompt (what the assistant's answer continues from). Every problem is a 400 naming the message and field."""

from __future__ import annotations

import json
from typing import Any

from adapterkit.serve.requests import ApiError

ROLES = ("system", "user", "assistant")
FIELDS = ("role", "content", "name")


def check_messages(messages: list[Any]) -> list[dict[str, str]]:
    """The messages as plain dicts of strings; ApiError (400) for an empty list, a wrong role, a missing or
    non-string content, or an unknown field."""
    if not messages:
        raise ApiError(400, "messages: empty list; send at least one message")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where}: must be an object with role and content, got {_kind(message)}")
        unknown = sorted(set(message) - set(FIELDS))
        if unknown:
            raise ApiError(400, f"{where}.{unknown[0]}: unknown field (a message takes {', '.join(FIELDS)})")
        role = message.get("role")
        if role not in ROLES:
            shown = json.dumps(role)[:40] if role is not None else "nothing"
            raise ApiError(400, f"{where}.role: must be one of {', '.join(ROLES)}, got {shown}")
        if "content" not in message or message["content"] is None:
            raise ApiError(400, f"{where}.content: required (the message's text)")
        if not isinstance(message["content"], str):
            raise ApiError(400, f"{where}.content: must be a string, got {_kind(message['content'])}")
        if "name" in message and not isinstance(message["name"], str):
            raise ApiError(400, f"{where}.name: must be a string, got {_kind(message['name'])}")
        checked.append({k: message[k] for k in FIELDS if k in message})
    return checked


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[int, ...]:
    """Token ids of the conversation in the model's chat template, ending with the assistant's generation prompt."""
    from jinja2 import TemplateError

    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model has no chat template: use POST /v1/completions with a plain prompt")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as exc:  # the template's own raise_exception(...): it refuses this conversation
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ApiError(400, f"messages: the model's chat template rejects this conversation ({first})") from None
    # the template writes the special tokens itself: adding the tokenizer's own (a BOS, say) would double them
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _kind(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
