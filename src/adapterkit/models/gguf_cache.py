"""A GGUF file as a cached Hugging Face folder: converted once (dequantised to float32), loaded fast after.

transformers reads a GGUF with ``gguf_file=`` by dequantising every tensor, which takes seconds to tens of seconds
each time, and its GGUF tokenizer conversion gets some special tokens wrong (SmolLM2's comes back with
``<|im_start|>`` as its end-of-sequence token and a start token added to every text, which the model never saw).
So the first load converts: model and tokenizer are read from the GGUF, the tokenizer's special tokens are set from
the file's own metadata (``tokenizer.ggml.*``), and both are saved as safetensors into a temporary folder, which is
renamed into the cache when complete: a conversion killed half way leaves nothing behind that looks finished. The
folder's manifest holds the source file's sha256 (part of the folder's name, so a changed source converts anew) and
every file's size and sha256, checked on each load: a damaged cache is a one-line error naming the folder to delete.

transformers also reads a SentencePiece vocabulary of GGUF model "llama" as a Unigram model for Gemma files, with
the file's scores as log-probabilities; but those scores are BPE merge ranks (minus the token id), so Unigram splits
words into the shortest oldest pieces (Gemma-3's "the" into "t" + "he", "negative" into four pieces): text the model
never saw. The converted tokenizer is rebuilt as the BPE it is (merges ranked by the merged piece's score, as
SentencePiece and llama.cpp encode); a cache converted before this fix (manifest ``conversion`` < 2 with a Unigram
tokenizer) is converted again.

Cache: ``$ADAPTERKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/adapterkit`` or ``~/.cache/adapterkit``; converted
models live in its ``models/`` folder as ``<file stem>-<first 16 hex of the GGUF's sha256>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterKitError
from adapterkit.core.files import atomic_write, fsync_dir

MANIFEST = "adapterkit-model.json"
GGUF_MAGIC = b"GGUF"
CONVERSION = 2  # 2: SentencePiece-BPE vocabularies rebuilt as BPE (see the module docstring)


class BadModelFileError(AdapterKitError, ValueError):
    """A file that is not a model this can load (not GGUF, no architecture, an architecture transformers lacks)."""


def cache_root() -> Path:
    """Where converted models are kept (see the module docstring)."""
    if os.environ.get("ADAPTERKIT_CACHE"):
        return Path(os.environ["ADAPTERKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "adapterkit"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_gguf(path: Path) -> None:
    """A one-line error unless ``path`` starts like a GGUF file."""
    if not path.is_file():
        raise BadModelFileError(f"{path}: no such file")
    with path.open("rb") as handle:
        head = handle.read(4)
    if head != GGUF_MAGIC:
        raise BadModelFileError(f"{path}: not a GGUF file (starts with {head!r}, not {GGUF_MAGIC!r})")


def cached_folder(gguf: str | Path, root: Path | None = None) -> Path:
    """The cached Hugging Face folder of ``gguf``, converting it first if needed; checked on every call."""
    source = Path(gguf).resolve()
    check_gguf(source)
    digest = sha256_file(source)
    models = (root or cache_root()) / "models"
    folder = models / f"{source.stem}-{digest[:16]}"
    if not (folder / MANIFEST).is_file() or _stale(folder):
        with _conversion_lock(models, folder.name):
            if not (folder / MANIFEST).is_file() or _stale(folder):  # another process may have finished it
                _convert(source, digest, folder)
    verify(folder)
    return folder


def verify(folder: Path) -> dict[str, Any]:
    """The folder's manifest, after checking every listed file's size and sha256 against it."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterKitError(f"model cache {folder}: unreadable manifest ({exc}); delete the folder to convert "
                              "again") from None
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise AdapterKitError(f"model cache {folder}: {name} is missing or damaged (size or sha256 differs "
                                  "from the manifest); delete the folder to convert again")
    return manifest


def _stale(folder: Path) -> bool:
    """Whether a finished folder predates a conversion fix that changes it (a Unigram-read SentencePiece BPE)."""
    try:
        if json.loads((folder / MANIFEST).read_text()).get("conversion", 1) >= CONVERSION:
            return False
        with open(folder / "tokenizer.json", encoding="utf-8") as handle:
            return json.load(handle)["model"]["type"] == "Unigram"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # unreadable: verify() names the damage


def spm_as_bpe(tokenizer_json: Path, source: Path) -> bool:
    """Rewrite a saved tokenizer.json whose SentencePiece vocabulary (GGUF ``tokenizer.ggml.model`` "llama") was
    read as Unigram into the BPE it is, from the GGUF's own pieces, scores and types: each piece's splits into two
    pieces become merges ranked by the merged piece's score (highest first); control pieces (type 3) become special
    added tokens and user-defined ones (type 4: newline and tab runs, ...) plain added tokens, matched whole in the
    text as SentencePiece matches them. Whether it was rewritten."""
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    if data["model"].get("type") != "Unigram":
        return False
    from gguf import GGUFReader

    fields = GGUFReader(str(source)).fields
    if "tokenizer.ggml.model" not in fields or fields["tokenizer.ggml.model"].contents() != "llama":
        return False
    from transformers.convert_slow_tokenizer import generate_merges

    pieces = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents()
    kinds = fields["tokenizer.ggml.token_type"].contents()
    vocab: dict[str, int] = {}
    for index, piece in enumerate(pieces):
        vocab.setdefault(piece, index)
    merges = generate_merges(vocab, {piece: float(scores[vocab[piece]]) for piece in vocab})
    unk = fields["tokenizer.ggml.unknown_token_id"].contents() if "tokenizer.ggml.unknown_token_id" in fields \
        else None
    data["model"] = {"type": "BPE", "dropout": None, "unk_token": pieces[unk] if unk is not None else None,
                     "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                     "byte_fallback": 6 in kinds, "ignore_merges": False, "vocab": vocab,
                     "merges": [list(pair) for pair in merges]}
    added = {token["id"] for token in data["added_tokens"]}
    data["added_tokens"] += [{"id": index, "content": pieces[index], "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": kinds[index] == 3}
                             for index in range(len(pieces)) if kinds[index] in (3, 4) and index not in added]
    data["added_tokens"].sort(key=lambda token: token["id"])
    atomic_write(tokenizer_json, json.dumps(data, ensure_ascii=False).encode())
    return True


@contextlib.contextmanager
def _conversion_lock(models: Path, name: str) -> Iterator[None]:
    models.mkdir(parents=True, exist_ok=True)
    with open(models / f".{name}.lock", "a+b") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # no fcntl (Windows): one converting process at a time is then the caller's to ensure
            pass
        yield


def _convert(source: Path, digest: str, folder: Path) -> None:
    started = time.perf_counter()
    print(f"converting {source.name} into {folder} (once; later loads read the cache)", flush=True)
    metadata = read_metadata(source)
    model, tokenizer = read_gguf(source)
    fix_special_tokens(tokenizer, model, metadata)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        rebuilt = spm_as_bpe(tmp / "tokenizer.json", source)
        files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())
                 if p.is_file()}
        manifest = {"source": str(source), "source_sha256": digest, "conversion": CONVERSION,
                    "tokenizer": "SentencePiece BPE rebuilt from scores" if rebuilt else "as read", "files": files,
                    "architecture": metadata.get("general.architecture"), "name": metadata.get("general.name"),
                    "convert_seconds": round(time.perf_counter() - started, 1)}
        atomic_write(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if folder.exists():  # a half-finished folder without a manifest (an older, killed conversion)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_gguf(source: Path) -> tuple[Any, Any]:
    """(causal LM dequantised to float32, tokenizer) as transformers reads them from the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the GGUF tokenizer's "legacy behaviour" notice is about what we fix after
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise BadModelFileError(f"{source}: transformers cannot load this GGUF as a causal LM "
                                f"({(str(exc).splitlines() or [type(exc).__name__])[0]})") from None
    finally:
        logging.set_verbosity(verbosity)
    return model, tokenizer


def read_metadata(source: Path) -> dict[str, Any]:
    """The GGUF's scalar metadata (architecture, special token ids, context length), without its tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(source))
    except (ValueError, OSError, IndexError) as exc:
        raise BadModelFileError(f"{source}: not a readable GGUF file ({(str(exc).splitlines() or [''])[0]})") \
            from None
    wanted = ("general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.ggml.bos_token_id",
              "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_eos_token")
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in wanted or key.endswith(".context_length"):
            metadata[key] = field.contents()
    if "general.architecture" not in metadata:
        raise BadModelFileError(f"{source}: GGUF without general.architecture: not a model file")
    return metadata


def fix_special_tokens(tokenizer: Any, model: Any, metadata: dict[str, Any]) -> None:
    """Special tokens, BOS/EOS insertion and length limit as the GGUF's metadata says."""
    tokens = tokenizer.convert_ids_to_tokens
    for role in ("bos", "eos"):
        index = metadata.get(f"tokenizer.ggml.{role}_token_id")
        if index is not None:
            setattr(tokenizer, f"{role}_token", tokens(int(index)))
    pad = metadata.get("tokenizer.ggml.padding_token_id", metadata.get("tokenizer.ggml.eos_token_id"))
    if pad is not None:
        tokenizer.pad_token = tokens(int(pad))
    for flag in ("add_bos_token", "add_eos_token"):
        value = metadata.get(f"tokenizer.ggml.{flag}")
        if value is not None and hasattr(tokenizer, flag):
            setattr(tokenizer, flag, bool(value))  # the fast Llama tokenizer rebuilds its post-processor
    context = next((v for k, v in metadata.items() if k.endswith(".context_length")), None)
    if context:
        tokenizer.model_max_length = int(context)
    for config in (model.config, model.generation_config):
        for role in ("bos", "eos", "pad"):
            token = getattr(tokenizer, f"{role}_token_id")
            if token is not None:
                setattr(config, f"{role}_token_id", token)
