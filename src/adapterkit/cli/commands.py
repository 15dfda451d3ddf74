"""The bodies of the CLI commands that train, evaluate and convert adapters; each returns a process exit code.

``serve`` lives in serve_command.py and ``plot-routing`` in plot_routing.py; the helpers they share are in common.py
(re-exported here, where scripts have imported them from).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import adapterkit as ak
from adapterkit.cli.common import (
    calibrate_if_needed,
    default_model_dir,
    load_classifier,
    load_run,
    parse_spec,
    read_run,
    targets,
)
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.registry import spec_class
from adapterkit.train.data import TextTable, read_table, shipped_sst2

__all__ = ["cmd_eval", "cmd_explain", "cmd_export", "cmd_import_", "cmd_inspect", "cmd_merge", "cmd_methods",
           "cmd_train", "default_model_dir", "load_classifier", "parse_spec"]


def _split(table: TextTable, seed: int) -> tuple[TextTable, TextTable]:
    order = list(range(len(table.texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, len(order) // 10)
    return table.take(order[cut:]), table.take(order[:cut])


def cmd_train(args: argparse.Namespace) -> int:
    from adapterkit.cli.llm_commands import cmd_train_lm, wants_causal_lm

    if wants_causal_lm(args):  # --task causal-lm, or a causal LM given as --model: supervised fine-tuning
        return cmd_train_lm(args)
    from adapterkit.train.loop import TrainConfig, check_writable, encode, fit, seed_everything

    spec = parse_spec(args.method, args.param)  # bad specs fail before anything loads
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size), ("--max-length", args.max_length),
                        ("--max-steps", args.max_steps), ("--grad-accum", args.grad_accum),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value is not None and value < 1:
            raise AdapterKitError(f"{flag} must be at least 1, got {value}")
    if args.grad_accum > args.batch_size:
        raise AdapterKitError(f"--grad-accum {args.grad_accum} exceeds --batch-size {args.batch_size}")
    if args.dev and not args.data:
        raise AdapterKitError("--dev needs --data (the default data set brings its own dev split)")
    train_path, dev_path = (args.data, args.dev) if args.data else map(str, shipped_sst2())
    train_path = str(Path(train_path).resolve())
    dev_path = str(Path(dev_path).resolve()) if dev_path else None
    data_name = "sst2" if not args.data else Path(args.data).stem
    out = Path(args.out or f"runs/{data_name}-{args.method}")
    check_writable(out)
    columns = (args.text_column, args.label_column, args.pair_column)
    train, labels = read_table(train_path, *columns)
    if dev_path:
        dev, _ = read_table(dev_path, *columns, label_names=labels)
    else:
        train, dev = _split(train, args.seed)
    if args.resume and not (out / "checkpoint.safetensors").exists():
        print(f"--resume: no checkpoint in {out} yet; starting from the beginning")
    model_dir = args.model or default_model_dir()
    seed_everything(args.seed)
    model, tokenizer = load_classifier(model_dir, len(labels))
    chosen = targets(args, model, spec)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                         max_steps=args.max_steps, seed=args.seed, head=[h for h in args.head.split(",") if h],
                         grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing or False,
                         precision=args.precision, checkpoint_every=args.checkpoint_every,
                         parallel=args.parallel, quantize=args.quantize, lora_plus_ratio=args.lora_plus_ratio)
    calibrated = calibrate_if_needed(args, spec, model, tokenizer, chosen,
                                     lambda: encode(tokenizer, train, args.max_length).ids, args.max_length)
    plan = ak.explain(model, chosen, spec)
    print(f"{spec.method} on {len(plan.rows)} modules ({', '.join(chosen) or 'its call'}): "
          f"{plan.adapter_params:,} adapter parameters")
    record = {"model": str(Path(model_dir).resolve()), "data": data_name, "train_file": train_path,
              "dev_file": dev_path, "labels": labels, "targets": chosen,
              "columns": {"text": args.text_column, "label": args.label_column, "pair": args.pair_column}}
    if calibrated:
        record["calibration"] = calibrated
    metrics = fit(model, tokenizer, "adapter", spec, chosen, train, dev, config, out, record, resume=args.resume)
    print(f"dev accuracy {metrics['dev_accuracy']:.2f}  trainable parameters {metrics['trainable_parameters']:,}  "
          f"{metrics['train_seconds']:.0f} s  ->  {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from adapterkit.train.loop import accuracy, encode

    if args.batch_size < 1:
        raise AdapterKitError(f"--batch-size must be at least 1, got {args.batch_size}")
    record = read_run(args.run)  # the columns are checked before any model loads
    if record.get("task") == "causal-lm":
        from adapterkit.cli.llm_commands import cmd_eval_lm

        return cmd_eval_lm(args, record)
    path = args.data or record.get("dev_file")
    if not path:
        raise AdapterKitError(f"{args.run}: the run has no dev file; pass --data")
    columns = eval_columns(args, record)
    record, model, tokenizer = load_run(args.run)
    table, _ = read_table(path, *columns, label_names=record["labels"])
    data = encode(tokenizer, table, record["config"]["max_length"])
    acc = accuracy(model, data, args.batch_size, tokenizer.pad_token_id or 0)
    print(json.dumps({"data": str(path), "examples": len(table.labels), "accuracy": round(acc, 2)}))
    return 0


def eval_columns(args: argparse.Namespace, record: dict[str, Any]) -> tuple[str, str, str | None]:
    """(text, label, pair) columns of the file to evaluate: the options where given, else the run's own."""
    saved = record["columns"]
    if args.pair_column and not saved.get("pair"):
        raise AdapterKitError(f"--pair-column {args.pair_column}: the run {args.run} was trained on single texts "
                              "(no pair column)")
    return (args.text_column or saved["text"], args.label_column or saved["label"],
            args.pair_column or saved.get("pair"))


def cmd_inspect(args: argparse.Namespace) -> int:
    record, tensors = ak.read(args.adapter)
    folder = Path(args.adapter)
    adapter_params = sum(_logical_numel(t) for k, t in tensors.items() if k.startswith("adapter."))
    module_params = sum(t.numel() for k, t in tensors.items() if k.startswith("module."))
    size = (folder / record["weights"]).stat().st_size
    print(f"adapter   {record['name']}  (format {record['format_version']})")
    print(f"method    {json.dumps(record['spec'])}")
    print(f"targets   {len(record['targets'])} modules, {adapter_params:,} parameters")
    for path in record["targets"]:
        shapes = record["fingerprint"][path]["shapes"]
        print(f"  {path}  {' '.join(f'{k}{tuple(v)}' for k, v in shapes.items())}")
    if record.get("modules"):
        print(f"modules   {', '.join(record['modules'])} ({module_params:,} parameters saved with it)")
    print(f"stored    {record['weights']}  {size:,} bytes  sha256 {record['weights_sha256'][:16]}")
    stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("adapter."))
    print(f"size      adapter tensors {stored:,} bytes stored, {4 * adapter_params:,} bytes as float32 "
          f"({4 * adapter_params / max(stored, 1):.1f}x)")
    return 0


def _logical_numel(tensor: Any) -> int:
    """Values a stored tensor represents: a bit-packed tensor (ops/bitpack.py) counts its codes, not its bytes."""
    from adapterkit.ops.bitpack import describe, is_packed

    return math.prod(describe(tensor)[1]) if is_packed(tensor) else int(tensor.numel())


def cmd_merge(args: argparse.Namespace) -> int:
    from adapterkit.train.loop import check_writable

    out = Path(args.out)
    check_writable(out)  # fail before loading anything
    _, model, tokenizer = load_run(args.run, float_base=True)  # a QLoRA adapter merges into the float model
    _untie_adapted_embeddings(model, "adapter")
    ak.merge(model, "adapter")
    ak.detach(model, "adapter", keep_merged=True)
    _check_tied_head(model)
    try:
        _save_merged(model, tokenizer, out)
    except OSError as exc:
        raise AdapterKitError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    print(f"merged model written to {out} (loads with transformers alone)")
    return 0


def _tied_embeddings(model: Any) -> tuple[Any, Any] | None:
    """(input embeddings, output head) when the model ties the head's weight to the embeddings, else None."""
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out):
        return None
    embeddings, head = get_in(), get_out()
    if embeddings is None or head is None or getattr(head, "weight", None) is not getattr(embeddings, "weight", 1):
        return None
    return embeddings, head


def _untie_adapted_embeddings(model: Any, name: str) -> None:
    """Give the head its own copy of a tied weight when the adapter changes the embeddings or the head.

    Merging into one of two tied modules would change the other too (the adapted model changes one only), and a
    merged model saved with ``tie_word_embeddings`` true would have its head rebuilt from the embeddings on load.
    So the head is untied first and the config says so: both weights are then saved and loaded separately. An
    adapter that touches neither leaves them tied (saved once, tied again on load)."""
    from torch import nn

    from adapterkit.inject.engine import placements

    tied = _tied_embeddings(model)
    adapted = {id(module) for _, module, _ in placements(model, name)}
    if tied is None or not adapted & {id(tied[0]), id(tied[1])}:
        return
    head = tied[1]
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in (model.config, model.config.get_text_config()):
        config.tie_word_embeddings = False


def _check_tied_head(model: Any) -> None:
    """A config that ties the head must hold a head that is the embeddings: else the saved head would be lost."""
    config = model.config.get_text_config()
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if getattr(config, "tie_word_embeddings", False) and head is not None and _tied_embeddings(model) is None:
        raise AdapterKitError("merge: the config ties the output head to the embeddings but the merged weights "
                              "differ; refusing to write a model whose head would be rebuilt wrongly on load")


def _save_merged(model: Any, tokenizer: Any, out: Path) -> None:
    """The model (weights, config, generation config) and the tokenizer (with its chat template) into ``out``:
    written into a temporary folder beside it first and moved in file by file (``os.replace``), so a killed merge
    never leaves a half-written weights file under ``out``."""
    import os
    import shutil
    import tempfile

    staging = Path(tempfile.mkdtemp(prefix=f".{out.name or 'merged'}-", dir=out.resolve().parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        for item in sorted(staging.iterdir()):
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cmd_explain(args: argparse.Namespace) -> int:
    from transformers import AutoModel

    spec = parse_spec(args.method, args.param)
    model = AutoModel.from_pretrained(args.model or default_model_dir())
    print(ak.explain(model, targets(args, model, spec), spec))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name in ak.methods.available():
        cls = spec_class(name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<8} {doc}\n         {fields}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import sys
    import warnings

    from adapterkit.interop.peft_format import VllmWarning, export_peft

    record, model, _ = load_run(args.run)
    head = tuple(record["config"].get("head", []))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VllmWarning)
        export_peft(model, "adapter", args.out, modules=head, base_model_name_or_path=record["model"])
    for each in caught:  # vLLM's limits: one line each on stderr; other warnings go on as they came
        if issubclass(each.category, VllmWarning):
            print(f"warning: {each.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(each.message, each.category, each.filename, each.lineno)
    print(f"peft-format adapter written to {args.out}")
    return 0


def cmd_import_(args: argparse.Namespace) -> int:
    from adapterkit.interop.peft_format import import_peft
    from adapterkit.models import load_pretrained

    # the task follows the model: a causal LM loads as one (its LoRA keys name model.layers..., not a classifier's)
    model, _ = load_pretrained(args.model or default_model_dir(), task="auto", num_labels=args.num_labels)
    import_peft(model, args.peft_dir, name="adapter")
    config = json.loads(Path(args.peft_dir, "adapter_config.json").read_text())
    ak.save(model, args.out, "adapter", modules=tuple(config.get("modules_to_save") or ()))
    print(f"adapterkit adapter written to {args.out}")
    return 0
