"""``adapterkit transfer``: Trans-LoRA, a generative-classification LoRA moved to another base model without data.

The parser part imports nothing heavy (main.py builds every parser for ``--help``); the command imports the model
code when it runs.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterKitError

DESCRIPTION = """Move a run's LoRA to another base model without its training data (Trans-LoRA, arXiv 2405.17258).

RUN is a generative-classification run of `adapterkit train` (a causal LM answering with label words). The target
model writes synthetic prompts from a few seed examples; a discriminator LoRA trained on the source model keeps
those it rates real; the source model with its LoRA labels them (its label-word distribution); a fresh LoRA on the
target learns those labels (KL on the label words). The target never sees the real training data. Tokenizers are
never bridged: each model reads the text with its own tokenizer, so any two chat models can be paired.

OUT gets adapter/ and run.json (so `adapterkit eval OUT --data dev.tsv` works), synthetic.jsonl (every prompt, its
P(real), whether it was kept, the teacher's distribution) and result.json (sizes, times, KL before / after and,
with --dev, the accuracy of the source with its LoRA, the target zero-shot and the target with the new LoRA)."""

EXAMPLES = """examples:
  adapterkit transfer runs/sst2-smollm2-lora --target gemma3-270m --seeds train.tsv --dev dev.tsv
  adapterkit transfer RUN --target DIR --seeds seeds.tsv --real unlabeled.tsv --synthetic 2000 --keep 1000
  adapterkit transfer RUN --target DIR --seeds seeds.tsv --filter none      # the ablation without the filter"""


def add_parser(sub: argparse._SubParsersAction, method_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``transfer`` on the ``adapterkit`` sub-command parser (main.py's adapter options)."""
    parser = sub.add_parser("transfer", help="move a generative-classification LoRA to another base model without "
                                             "its data (Trans-LoRA)", description=DESCRIPTION, epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="source run folder (run.json + adapter/) of a generative classifier")
    parser.add_argument("--target", required=True, metavar="NAME|DIR|GGUF",
                        help="the target base model: a known name (gemma3-270m, smollm2), a folder or a .gguf file")
    data = parser.add_argument_group("data")
    data.add_argument("--seeds", required=True, metavar="FILE",
                      help="file whose texts are the seed examples (.csv, .tsv, .jsonl; labels are not read)")
    data.add_argument("--num-seeds", type=int, default=5, metavar="K",
                      help="seed examples drawn from --seeds, seeded (default 5, as in the paper)")
    data.add_argument("--real", default=None, metavar="FILE",
                      help="more real unlabeled task text for the discriminator (the source side only)")
    data.add_argument("--dev", default=None, metavar="FILE", help="labelled file to report accuracies on")
    data.add_argument("--text-column", default=None, metavar="NAME", help="text column (default: the run's)")
    synth = parser.add_argument_group("synthetic prompts and filter")
    synth.add_argument("--synthetic", type=int, default=200, metavar="N", help="prompts the target writes (200)")
    synth.add_argument("--keep", type=int, default=100, metavar="N", help="prompts kept for distillation (100)")
    synth.add_argument("--filter", default="discriminator", choices=["discriminator", "none"],
                       help="keep the prompts the discriminator rates real (default), or the first --keep")
    synth.add_argument("--threshold", type=float, default=0.5, metavar="P", help="P(real) to pass (default 0.5)")
    synth.add_argument("--disc-synthetic", type=int, default=64, metavar="N",
                       help="prompts the source base writes as the discriminator's synthetic side (64)")
    synth.add_argument("--describe", default="Here are some examples of texts:", metavar="TEXT",
                       help="the line before the seed examples in each request (e.g. 'Here are some movie reviews:')")
    synth.add_argument("--max-new-tokens", type=int, default=48, metavar="N", help="longest prompt written (48)")
    method_args(parser)
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=3, help="distillation epochs (default 3)")
    train.add_argument("--lr", type=float, default=5e-4, help="distillation learning rate (default 5e-4)")
    train.add_argument("--disc-epochs", type=int, default=2, help="discriminator epochs (default 2)")
    train.add_argument("--batch-size", type=int, default=8, metavar="N", help="texts per step (default 8)")
    train.add_argument("--seed", type=int, default=0, help="seed of the draws, sampling and inits (default 0)")
    train.add_argument("--out", default=None, metavar="DIR", help="output folder (default runs/<run>-to-<target>)")


def _texts(path: str, column: str, where: str) -> list[str]:
    from adapterkit.train.data import DataError, read_rows

    rows = read_rows(path)
    if column not in rows[0].values:
        raise DataError(f"{where} {path}: no column {column!r} (columns: {', '.join(rows[0].values)})")
    return [row.values[column] for row in rows if row.values.get(column, "").strip()]


def cmd_transfer(args: argparse.Namespace) -> int:
    from adapterkit.cli.common import load_run, parse_spec, read_run
    from adapterkit.cli.defaults import default_targets
    from adapterkit.models import load_pretrained, resolve
    from adapterkit.train.gen_classify import Task, evaluate
    from adapterkit.train.loop import check_writable
    from adapterkit.train.transfer import SynthConfig, TransferConfig, transfer

    spec = parse_spec(args.method, args.param)  # bad specs and options fail before anything loads
    config = TransferConfig(synthetic=args.synthetic, keep=args.keep, filter=args.filter, threshold=args.threshold,
                            disc_synthetic=args.disc_synthetic, disc_epochs=args.disc_epochs, epochs=args.epochs,
                            lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                            synth=SynthConfig(describe=args.describe, max_new_tokens=args.max_new_tokens))
    if args.num_seeds < 1:
        raise AdapterKitError(f"--num-seeds must be at least 1, got {args.num_seeds}")
    record = read_run(args.run)
    if "label_words" not in record or "prompt" not in record:
        raise AdapterKitError(f"{args.run}: not a generative-classification run (no label words); transfer takes "
                              "a causal LM trained on a labelled table")
    try:
        target_folder = resolve(args.target)  # a missing target fails before the source loads
    except AdapterKitError as exc:
        raise type(exc)(f"--target {exc}") from None
    column = args.text_column or record["columns"]["text"]
    pool = _texts(args.seeds, column, "--seeds")
    seeds = random.Random(args.seed).sample(pool, min(args.num_seeds, len(pool)))
    real = _texts(args.real, column, "--real") if args.real else []
    out = Path(args.out or f"runs/{Path(args.run).name}-to-{Path(args.target).stem}")
    check_writable(out)
    task = Task(record["prompt"], record["label_words"])
    _, source, source_tok = load_run(args.run)
    import adapterkit as ak

    teacher = ak.adapters(source)[0]
    target, target_tok = load_pretrained(target_folder, task="causal-lm", where="--target")
    if source_tok.get_vocab() != target_tok.get_vocab():
        print(f"the tokenizers differ ({len(source_tok)} vs {len(target_tok)} tokens): nothing to bridge, each model "
              "reads the text with its own tokenizer")
    source_targets = [t for t in (args.targets or "").split(",") if t] or default_targets(source, args.method, True)
    target_targets = [t for t in (args.targets or "").split(",") if t] or default_targets(target, args.method, True)
    dev = None
    scores: dict[str, Any] = {}
    if args.dev:
        from adapterkit.train.data import read_table

        dev, _ = read_table(args.dev, column, record["columns"]["label"], label_names=record["labels"])
        scores["source_lora"] = evaluate(source, source_tok, task, dev, exact_match=False)["accuracy"]
        scores["target_zero_shot"] = evaluate(target, target_tok, task, dev, exact_match=False)["accuracy"]
    result = transfer(source, source_tok, teacher, target, target_tok, task, seeds, spec, source_targets,
                      target_targets, config, real=real, name="transferred")
    if dev is not None:
        scores["target_transferred"] = evaluate(target, target_tok, task, dev, exact_match=False)["accuracy"]
    _write(out, args, record, result, scores, target, spec, target_folder, target_targets, seeds)
    shown = "  ".join(f"{k} {v:.2f}" for k, v in scores.items())
    print(f"kept {len(result.kept)} of {len(result.pool)} synthetic prompts; KL to the teacher "
          f"{result.record['kl_before']:.4f} -> {result.record['kl_after']:.4f}  {shown}  ->  {out}")
    return 0


def _write(out: Path, args: argparse.Namespace, record: dict[str, Any], result: Any, scores: dict[str, Any],
           target: Any, spec: Any, target_folder: Path, target_targets: list[str], seeds: list[str]) -> None:
    import adapterkit as ak
    from adapterkit.core.files import atomic_write

    kept = {text: i for i, text in enumerate(result.kept)}
    lines = [json.dumps({"text": text, "p_real": None if result.p_real is None else round(result.p_real[i], 4),
                         "kept": text in kept,
                         "teacher": [round(float(p), 4) for p in result.teacher[kept[text]]] if text in kept else None},
                        ensure_ascii=False) for i, text in enumerate(result.pool)]
    atomic_write(out / "synthetic.jsonl", ("\n".join(lines) + "\n").encode())
    summary = {**{k: v for k, v in result.record.items() if k != "losses"}, "accuracy": scores, "seeds": seeds}
    atomic_write(out / "result.json", (json.dumps(summary, indent=1) + "\n").encode())
    run = {"task": "causal-lm", "model": str(Path(target_folder).resolve()), "model_name": args.target,
           "labels": record["labels"], "label_words": record["label_words"], "prompt": record["prompt"],
           "columns": record["columns"], "train_file": None, "dev_file": str(Path(args.dev).resolve())
           if args.dev else None, "targets": target_targets, "method": spec.to_dict(),
           "config": {"head": []}, "transfer": {"source_run": str(Path(args.run).resolve()),
                                                "config": result.record["config"]}}
    ak.save(target, out / "adapter", "transferred")
    atomic_write(out / "run.json", (json.dumps(run, indent=2) + "\n").encode())
