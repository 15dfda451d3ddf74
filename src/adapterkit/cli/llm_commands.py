"""`adapterkit train` and `eval` for causal LMs: supervised fine-tuning on instruction / chat data or, given a
labelled table, generative classification; and their evaluation (dev loss / perplexity, or accuracy)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterKitError

DEV_SHARE = 0.05  # held out of --data (or the shipped set) when no --dev is given
DEFAULT_MODEL = "smollm2"


def wants_causal_lm(args: argparse.Namespace) -> bool:
    """Whether `adapterkit train` should fine-tune a causal LM: ``--task causal-lm``, or a causal LM as --model."""
    task = getattr(args, "task", "auto")
    if task != "auto":
        return bool(task == "causal-lm")
    if not args.model:
        return False
    from adapterkit.models import is_causal_lm, resolve

    return is_causal_lm(resolve(args.model))


def _config(args: argparse.Namespace) -> Any:
    """The run's SFTConfig: typed options, causal-LM defaults for those left out (the parser's are a classifier's)."""
    from adapterkit.train.sft import SFTConfig

    given: set[str] = getattr(args, "given", set())
    chosen: dict[str, Any] = {key: getattr(args, key) for key in ("epochs", "lr", "batch_size", "max_length")
                              if key in given}
    if "head" in given:
        chosen["head"] = [h for h in args.head.split(",") if h]
    for flag, value in (("--epochs", chosen.get("epochs")), ("--batch-size", chosen.get("batch_size")),
                        ("--max-length", chosen.get("max_length")), ("--max-steps", args.max_steps),
                        ("--grad-accum", args.grad_accum), ("--checkpoint-every", args.checkpoint_every),
                        ("--max-new-tokens", args.max_new_tokens)):
        if value is not None and value < 1:
            raise AdapterKitError(f"{flag} must be at least 1, got {value}")
    if args.samples < 0:
        raise AdapterKitError(f"--samples must be at least 0, got {args.samples}")
    if args.parallel != "ddp":
        raise AdapterKitError("--parallel fsdp is for classifier runs; causal-LM fine-tuning runs in one process")
    config = SFTConfig(**chosen, max_steps=args.max_steps, seed=args.seed, grad_accum=args.grad_accum,
                       gradient_checkpointing=args.gradient_checkpointing or False, precision=args.precision,
                       checkpoint_every=args.checkpoint_every, quantize=args.quantize, samples=args.samples,
                       max_new_tokens=args.max_new_tokens, lora_plus_ratio=args.lora_plus_ratio)
    if config.grad_accum > config.batch_size:
        raise AdapterKitError(f"--grad-accum {config.grad_accum} exceeds --batch-size {config.batch_size}")
    return config


def _is_table(path: str) -> bool:
    from adapterkit.train.sft_data import is_instruction_file

    return Path(path).suffix.lower() in (".csv", ".tsv") or not is_instruction_file(path)


def cmd_train_lm(args: argparse.Namespace) -> int:
    from adapterkit.cli.common import parse_spec, targets
    from adapterkit.models import load_pretrained, resolve
    from adapterkit.train.loop import check_writable, seed_everything
    from adapterkit.train.sft import fit_sft, sample_prompts
    from adapterkit.train.sft_data import shipped_alpaca

    spec = parse_spec(args.method, args.param)  # bad specs and options fail before anything loads
    config = _config(args)
    if args.dev and not args.data:
        raise AdapterKitError("--dev needs --data (the default instruction set is split into train and dev)")
    model_name = args.model or DEFAULT_MODEL
    folder = resolve(model_name)
    train_path = str(Path(args.data).resolve()) if args.data else str(shipped_alpaca())
    dev_path = str(Path(args.dev).resolve()) if args.dev else None
    classify = bool(args.data) and _is_table(train_path)
    data_name = Path(args.data).stem if args.data else "alpaca"
    out = Path(args.out or f"runs/{data_name}-{Path(model_name).stem}-{args.method}")
    check_writable(out)
    if args.resume and not (out / "checkpoint.safetensors").exists():
        print(f"--resume: no checkpoint in {out} yet; starting from the beginning")
    seed_everything(config.seed)
    model, tokenizer = load_pretrained(folder, task="causal-lm")
    record: dict[str, Any] = {"model": str(Path(folder).resolve()), "model_name": model_name, "data": data_name,
                              "train_file": train_path, "dev_file": dev_path}
    if classify:
        train, dev, conversations, on_epoch = _classification(args, record, tokenizer, model, config)
    else:
        train, dev, conversations = _instructions(train_path, dev_path, tokenizer, model, config)
        on_epoch = None
    if dev_path is None:
        record["dev_split"] = {"share": DEV_SHARE, "seed": config.seed}
    chosen = targets(args, model, spec, causal_lm=True)
    record["targets"] = chosen
    import adapterkit as ak
    from adapterkit.cli.common import calibrate_if_needed

    calibrated = calibrate_if_needed(args, spec, model, tokenizer, chosen, lambda: train.ids, config.max_length)
    if calibrated:
        record["calibration"] = calibrated
    plan = ak.explain(model, chosen, spec)
    where = ", ".join(chosen) or "its call"
    print(f"{spec.method} on {len(plan.rows)} modules ({where}): {plan.adapter_params:,} adapter "
          f"parameters; {len(train)} train / {len(dev)} dev examples{_cuts(train, dev, config.max_length)}")
    samples = sample_prompts(tokenizer, conversations, config.samples)
    metrics = fit_sft(model, tokenizer, spec, chosen, train, dev, config, out, record, samples=samples,
                      on_epoch=on_epoch, resume=args.resume)
    shown = f"dev accuracy {metrics['dev_accuracy']:.2f}  " if "dev_accuracy" in metrics else ""
    print(f"{shown}dev loss {metrics['dev_loss']:.4f}  perplexity {metrics['dev_perplexity']:.2f}  padding "
          f"{100 * metrics['padding_share']:.1f}%  trainable parameters {metrics['trainable_parameters']:,}  "
          f"{metrics['train_seconds']:.0f} s  ->  {out}")
    return 0


def _cuts(train: Any, dev: Any, max_length: int) -> str:
    """What --max-length did to the data, for the summary line."""
    cut, dropped = train.truncated + dev.truncated, train.dropped + dev.dropped
    if not cut:
        return ""
    left_out = f", {len(dropped)} of them left out (no answer token left; first: {dropped[0]})" if dropped else ""
    return f"; {cut} cut to --max-length {max_length}{left_out}"


def _instructions(train_path: str, dev_path: str | None, tokenizer: Any, model: Any, config: Any
                  ) -> tuple[Any, Any, list[Any]]:
    """Tokenised train and dev conversations of an instruction / chat file, and the dev conversations."""
    from adapterkit.train.sft_data import read_conversations, render, split

    train_convs = read_conversations(train_path)
    if dev_path:
        dev_convs = read_conversations(dev_path)
    else:
        train_convs, dev_convs = split(train_convs, DEV_SHARE, config.seed)
    return (render(tokenizer, train_convs, config.max_length, model.config),
            render(tokenizer, dev_convs, config.max_length, model.config), dev_convs)


def _table_split(table: Any, seed: int) -> tuple[Any, Any]:
    from adapterkit.train.data import TextTable
    from adapterkit.train.sft_data import split

    rows = list(zip(table.texts, table.labels))
    train, dev = split(rows, DEV_SHARE, seed)
    return (TextTable([t for t, _ in train], None, [y for _, y in train]),
            TextTable([t for t, _ in dev], None, [y for _, y in dev]))


def _classification(args: argparse.Namespace, record: dict[str, Any], tokenizer: Any, model: Any, config: Any
                    ) -> tuple[Any, Any, list[Any], Any]:
    """Generative classification of a labelled table: tokenised train / dev, dev conversations, epoch hook."""
    from adapterkit.train import gen_classify
    from adapterkit.train.data import read_rows, read_table
    from adapterkit.train.sft_data import render

    if args.pair_column:
        raise AdapterKitError("--pair-column: generative classification takes single texts")
    train_table, labels = read_table(record["train_file"], args.text_column, args.label_column)
    lines = [row.line for row in read_rows(record["train_file"])]  # for errors that name file:line
    dev_lines = None
    if record["dev_file"]:
        dev_table, _ = read_table(record["dev_file"], args.text_column, args.label_column, label_names=labels)
        dev_lines = [row.line for row in read_rows(record["dev_file"])]
    else:
        train_table, dev_table = _table_split(train_table, config.seed)
        lines = []  # split rows: numbered within the split
    task = gen_classify.Task(args.prompt or gen_classify.DEFAULT_PROMPT, gen_classify.label_words(labels,
                                                                                                  args.label_words))
    record.update({"labels": labels, "label_words": task.words, "prompt": task.prompt,
                   "columns": {"text": args.text_column, "label": args.label_column}})
    train_convs = gen_classify.conversations(task, train_table, record["train_file"], lines)
    dev_convs = gen_classify.conversations(task, dev_table, record["dev_file"] or record["train_file"], dev_lines)
    train = render(tokenizer, train_convs, config.max_length, model.config)
    dev = render(tokenizer, dev_convs, config.max_length, model.config)

    def on_epoch(model: Any, epoch: int) -> dict[str, float]:
        return gen_classify.evaluate(model, tokenizer, task, dev_table, batch_size=2 * config.batch_size)

    return train, dev, dev_convs, on_epoch


def cmd_eval_lm(args: argparse.Namespace, record: dict[str, Any]) -> int:
    """Dev loss / perplexity of an instruction-tuned run, or accuracy of a generative classifier; one JSON line."""
    import adapterkit as ak
    from adapterkit.cli.common import load_run
    from adapterkit.models import load_pretrained

    config = record.get("config", {})
    classify = "labels" in record
    if args.pair_column:
        raise AdapterKitError(f"--pair-column: the run {args.run} is a causal LM (single texts)")
    if not classify and (args.text_column or args.label_column):
        raise AdapterKitError(f"--text-column / --label-column: the run {args.run} was fine-tuned on instructions, "
                              "which have no columns")
    path = args.data or record.get("dev_file")
    if not path and not record.get("dev_split"):
        raise AdapterKitError(f"{args.run}: the run has no dev file; pass --data")
    if args.base:
        model, tokenizer = load_pretrained(record["model"], task="causal-lm", where=f"{args.run}/run.json: model")
        if config.get("quantize"):  # the base the adapter was trained on
            ak.quantize_base(model, config["quantize"], keep=config.get("head", []))
    else:
        _, model, tokenizer = load_run(args.run)
    model.eval()
    shown = path or f"{record['train_file']} (dev split)"
    result: dict[str, Any] = {"data": str(shown)}
    if classify:
        table = _eval_table(args, record, path)
        from adapterkit.train import gen_classify

        task = gen_classify.Task(record["prompt"], record["label_words"])
        scores = gen_classify.evaluate(model, tokenizer, task, table, batch_size=args.batch_size)
        result.update({"examples": len(table.labels), "accuracy": round(scores["accuracy"], 2),
                       "exact_match": round(scores["exact_match"], 2)})
    else:
        from adapterkit.train.sft import dev_loss
        from adapterkit.train.sft_data import read_conversations, render, split

        if path:
            convs = read_conversations(path)
        else:
            _, convs = split(read_conversations(record["train_file"]), record["dev_split"]["share"],
                             record["dev_split"]["seed"])
        data = render(tokenizer, convs, config.get("max_length", 512), model.config)
        scores = dev_loss(model, data, args.batch_size, tokenizer.pad_token_id or 0)
        result.update({"examples": len(data), "loss": round(scores["loss"], 4),
                       "perplexity": round(scores["perplexity"], 3), "tokens": scores["tokens"]})
    result["adapter"] = not args.base
    print(json.dumps(result))
    return 0


def _eval_table(args: argparse.Namespace, record: dict[str, Any], path: str | None) -> Any:
    from adapterkit.train.data import read_table

    columns = record["columns"]
    text, label = args.text_column or columns["text"], args.label_column or columns["label"]
    if path:
        table, _ = read_table(path, text, label, label_names=record["labels"])
        return table
    table, _ = read_table(record["train_file"], text, label, label_names=record["labels"])
    return _table_split(table, record["dev_split"]["seed"])[1]
