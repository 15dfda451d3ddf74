"""Pretrained models by name or path, offline: ``model, tokenizer = load_pretrained("smollm2")``.

``name_or_path`` is a known name (``known_names()``: smollm2, gemma3-270m, minilm), a Hugging Face model folder,
or a ``.gguf`` file (converted once into a cached folder: models/gguf_cache.py). The task follows the model unless
given: a causal LM folder (its config names a ``*ForCausalLM`` / ``*LMHeadModel``) loads as one, anything else as a
sequence classifier with a fresh head of ``num_labels`` classes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterKitError
from adapterkit.models.gguf_cache import BadModelFileError, cache_root, cached_folder
from adapterkit.models.known import CHAT_FALLBACKS, KNOWN, ModelNotFoundError, known_names, locate

__all__ = ["BadModelFileError", "KNOWN", "ModelNotFoundError", "cache_root", "fallback_chat", "is_causal_lm",
           "known_names", "load_pretrained", "resolve"]
TASKS = ("auto", "causal-lm", "classify")


def resolve(name_or_path: str | Path) -> Path:
    """The local Hugging Face folder behind a known name, a folder or a ``.gguf`` file (converted and cached)."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf":
        return cached_folder(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{text}: not a Hugging Face model folder (no config.json)")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{text}: not a model folder or a .gguf file")
    if "/" in text or "\\" in text:
        raise ModelNotFoundError(f"{text}: no such folder or file")
    found, kind = locate(text)
    return cached_folder(found) if kind == "gguf" else found


def is_causal_lm(folder: str | Path) -> bool:
    """Whether a model folder's config names a causal-LM architecture."""
    config = Path(folder, "config.json")
    try:
        architectures = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as exc:
        raise AdapterKitError(f"{config}: unreadable model config ({exc})") from None
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def fallback_chat(model: Any, tokenizer: Any) -> bool:
    """Give a tokenizer without a chat template its model family's (known.CHAT_FALLBACKS, by the config's
    ``model_type``) when its vocabulary holds the format's turn-end token as one token: the template is set, the
    turn-end token becomes the end-of-sequence token (an answer ends with it, as the model ends its turn) and the
    generation config stops at it and at the old end token. Whether a template was given."""
    chat = CHAT_FALLBACKS.get(getattr(getattr(model, "config", None), "model_type", None) or "")
    if chat is None or getattr(tokenizer, "chat_template", None):
        return False
    end = tokenizer.convert_tokens_to_ids(chat.turn_end)
    if not isinstance(end, int) or end == tokenizer.unk_token_id:
        return False  # a vocabulary without the turn tokens: the format cannot be written in it
    old = tokenizer.eos_token_id
    tokenizer.chat_template = chat.template
    tokenizer.eos_token = chat.turn_end
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.eos_token_id = [end] + ([old] if old is not None and old != end else [])
    return True


def load_pretrained(name_or_path: str | Path, task: str = "auto", num_labels: int = 2, dtype: Any = None,
                    where: str = "--model") -> tuple[Any, Any]:
    """(model, tokenizer) for ``name_or_path``; ``task`` is "auto", "causal-lm" or "classify".

    The tokenizer always has a pad token (the end-of-sequence token where the model has none), and the model's
    config and generation config name it. A tokenizer without a chat template gets its family's fallback where
    known.py has one (``fallback_chat``). ``where`` names the value's origin in errors.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    if task not in TASKS:
        raise AdapterKitError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    try:
        folder = resolve(name_or_path)
    except AdapterKitError as exc:
        raise type(exc)(f"{where} {exc}") from None
    if task == "auto":
        task = "causal-lm" if is_causal_lm(folder) else "classify"
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a classifier's fresh head is expected; its notice is noise here
    try:
        if task == "causal-lm":
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=num_labels,
                                                                       dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise AdapterKitError(f"{where} {name_or_path}: cannot load ({(str(exc).splitlines() or [''])[0]})") \
            from None
    finally:
        logging.set_verbosity(verbosity)
    fallback_chat(model, tokenizer)
    if tokenizer.pad_token is None:  # GPT-2 / Llama tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
