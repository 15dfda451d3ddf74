"""Request bodies: read within the size limit, parsed as strict JSON, validated field by field.

Everything a client can get wrong here is an ``ApiError`` (a 4xx answer with a one-line message naming the field):
a body over the limit (413, found while reading, so a chunked body is never held whole before it is refused),
malformed or non-standard JSON (NaN, Infinity, nesting too deep), text that is not valid Unicode (a lone surrogate
such as ``"\\ud800"``, which the JSON grammar allows but no tokenizer can encode), and a field of the wrong type.
Types are strict: ``"8"``, ``true`` and ``8.0`` are not integers, ``1`` is not a boolean.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# strict: no coercion between types (a bool is not an int, "8" is not 8); no NaN or infinities; unknown fields refused
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ApiError(Exception):
    """An error answer: HTTP status, one-line message, OpenAI-style type, extra headers."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    model_config = _STRICT
    include_usage: bool = False


class _Generation(BaseModel):
    """The sampling fields completions and chat share."""

    model_config = _STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1, description="default: 16, or the server's limit if lower")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 (the default): greedy")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionRequest(_Generation):
    """The OpenAI completions fields this server honours; others are refused, not silently ignored."""

    prompt: str | list[str]


class ChatRequest(_Generation):
    """The OpenAI chat-completions fields this server honours (messages are checked by serve/chat.py)."""

    messages: list[Any]
    max_completion_tokens: int | None = Field(default=None, ge=1, description="the newer name of max_tokens")


class ClassifyRequest(BaseModel):
    """One text or a list of texts, classified with adapter ``model`` and its head."""

    model_config = _STRICT
    model: str
    input: str | list[str]


class LoadRequest(BaseModel):
    """Load ``<adapters dir>/<name>``, or build ``name`` from a combination recipe (serve.recipes.Recipe)."""

    model_config = _STRICT
    name: str
    combine: Any = None  # validated by serve.recipes.parse_recipe, whose errors name the recipe's own fields


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes (declared or while it streams)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # stop reading: the rest of a chunked body is never received
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes (read {size} so far)")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model: type[BaseModel], limit: int) -> Any:
    """The body of ``request`` validated as ``model`` (an ApiError naming what is wrong otherwise)."""
    data = loads(await read_body(request, limit))
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(data)}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, _field_error(exc, model)) from None


def loads(raw: bytes) -> Any:
    """Standard JSON only: UTF-8, no NaN / Infinity, nesting within Python's recursion limit, valid Unicode text."""
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"malformed JSON body: not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON body: nested too deeply") from None
    _check_text(data)
    return data


def _no_constant(name: str) -> Any:
    raise ApiError(400, f"malformed JSON body: {name} is not a JSON number")


def _check_text(data: Any) -> None:
    """Every string (keys too) must be encodable as UTF-8; JSON escapes can spell lone surrogates."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # iterative: the depth is bounded by the parser already, the breadth by the body size
        where, value = stack.pop()
        if isinstance(value, str):
            _check_string(where or "body", value)
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_string(f"a key in {where or 'the body'}", key)
                stack.append((f"{where}.{key}" if where else key, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))


def _check_string(where: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = where.encode("utf-8", "backslashreplace").decode()
        raise ApiError(400, f"{where}: not valid Unicode text (lone surrogate {text[exc.start]!r} at character "
                            f"{exc.start})") from None


def _field_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """One line naming the first bad field, what it must be and what it got."""
    errors = exc.errors()
    field = str(errors[0]["loc"][0]) if errors[0]["loc"] else "body"
    # a union field (str | list[str]) reports one error per member: the one that reached an item is the telling one
    first = max((e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]),
                key=lambda e: sum(isinstance(p, int) for p in e["loc"]))
    indices = [p for p in first["loc"][1:] if isinstance(p, int)]
    where = field + "".join(f"[{p}]" for p in indices)
    if first["type"] == "extra_forbidden":
        return f"{field}: unknown field (this endpoint takes {', '.join(model.model_fields)})"
    if first["type"] == "missing":
        return f"{field}: required field missing"
    info = model.model_fields.get(field)
    if first["type"].endswith("_type") and info is not None:  # a wrong type: say what the field takes
        value = first.get("input")
        wanted = _describe(_item(info.annotation) if indices else info.annotation)
        return f"{where}: must be {wanted}, got {_json_type(value)} {_shown(value)}"
    return f"{where}: {first['msg'][:1].lower()}{first['msg'][1:]}"


def _item(annotation: Any) -> Any:
    """The item type of the list in ``annotation`` (``str | list[str]`` -> ``str``)."""
    for part in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(part) is list:
            return typing.get_args(part)[0]
    return annotation


def _describe(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [a for a in typing.get_args(annotation) if a is not type(None)]
        text = " or ".join(_describe(a) for a in parts)
        return f"{text} or null" if len(parts) < len(typing.get_args(annotation)) else text
    if origin is list:
        return f"a list of {_describe(typing.get_args(annotation)[0]).removeprefix('a ').removeprefix('an ')}s"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "an object"
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean (true or false)"}
    return names.get(annotation, str(annotation))


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                       (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _shown(value: Any) -> str:
    if isinstance(value, dict | list):
        return "{...}" if isinstance(value, dict) else "[...]"
    text = json.dumps(value)  # ASCII-only: safe to echo whatever the client sent
    return text if len(text) <= 40 else text[:37] + "..."
