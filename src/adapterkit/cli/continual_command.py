"""``adapterkit continual``: learn a stream of text-classification tasks with adapters on a frozen encoder.

The parser part imports nothing heavy (main.py builds every parser for ``--help``); the command imports the model
code when it runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterKitError

DESCRIPTION = """Learn a stream of tasks, one after another, with adapters on a frozen encoder, rehearsal-free.

The tasks are groups of the data's labels (--tasks), learnt in order; after each task every task seen so far is
tested, with no task id (class-incremental: one prediction over every class seen so far). The run folder gets
result.json (accuracy matrices, final and average incremental accuracy, forgetting, backward transfer, parameters,
time), accuracy_matrix.png and a state file saved after every task: --resume continues an interrupted run exactly.

strategies: finetune (one adapter, trained task after task: the lower bound), joint (retrained on all tasks so far:
the upper bound), lae (online adapter + EMA offline adapter, ensembled), mos (per-task adapters merged, Gaussian
classifier alignment, self-refined adapter retrieval), ear (grows an adaptor when the stream shifts, routes each
example by a hyperdimensional detector)."""

EXAMPLES = """examples:
  adapterkit continual --data trec.tsv --test trec_test.tsv --tasks DESC,ENTY/ABBR,HUM/LOC,NUM --strategy lae
  adapterkit continual --data news.csv --test news_test.csv --text-column text --classes-per-task 2 --strategy mos
  adapterkit continual ... --strategy lae --method seq_bn --targets output.LayerNorm --epochs 5 --out runs/cl
  adapterkit continual ... --out runs/cl --resume            # after a crash: continues after the last whole task"""


def add_parser(sub: argparse._SubParsersAction, model_args: Callable[[argparse.ArgumentParser], None],
               method_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``continual`` on the ``adapterkit`` sub-command parser (with main.py's --model and adapter
    options, so every command spells them alike)."""
    parser = sub.add_parser("continual", help="learn a stream of classification tasks without forgetting (LAE, "
                                              "MOS, EAR, and the fine-tuning / joint bounds)",
                            description=DESCRIPTION, epilog=EXAMPLES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="FILE", help="training file: .csv, .tsv or .jsonl")
    data.add_argument("--test", required=True, metavar="FILE", help="test file with the same label names")
    data.add_argument("--text-column", default="sentence", metavar="NAME", help="column holding the text")
    data.add_argument("--label-column", default="label", metavar="NAME", help="column holding the label")
    data.add_argument("--tasks", default=None, metavar="A,B/C,D",
                      help="the tasks as label groups in order, '/' between tasks (default: --classes-per-task)")
    data.add_argument("--classes-per-task", type=int, default=2, metavar="N",
                      help="without --tasks: the labels in file order, N per task (default 2)")
    data.add_argument("--max-length", type=int, default=64, metavar="N", help="tokens per text (default 64)")
    parser.add_argument("--strategy", default="lae", choices=["finetune", "joint", "lae", "mos", "ear"],
                        help="the continual-learning method (default lae)")
    method_args(parser)
    train = parser.add_argument_group("training, per task")
    train.add_argument("--epochs", type=int, default=3)
    train.add_argument("--lr", type=float, default=1e-3, help="adapter learning rate (default 1e-3)")
    train.add_argument("--head-lr", type=float, default=5e-3, help="head learning rate (default 5e-3)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/continual", metavar="DIR", help="run folder (default runs/continual)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")


def _groups(args: argparse.Namespace, names: list[str]) -> list[list[int]]:
    if args.tasks is None:
        n = args.classes_per_task
        if n < 1:
            raise AdapterKitError(f"--classes-per-task {n}: needs at least 1")
        return [list(range(i, min(i + n, len(names)))) for i in range(0, len(names), n)]
    groups = []
    for part in args.tasks.split("/"):
        labels = [label.strip() for label in part.split(",") if label.strip()]
        unknown = [label for label in labels if label not in names]
        if unknown or not labels:
            raise AdapterKitError(f"--tasks {args.tasks!r}: {'labels ' + str(unknown) if unknown else 'an empty task'}"
                                  f" (the data's labels: {', '.join(names)})")
        groups.append([names.index(label) for label in labels])
    return groups


def cmd_continual(args: argparse.Namespace) -> int:
    from transformers import AutoModel, AutoTokenizer

    from adapterkit.cli.common import default_model_dir, parse_spec
    from adapterkit.cli.defaults import default_targets
    from adapterkit.train import continual as cl
    from adapterkit.train.data import read_table

    train_table, names = read_table(args.data, args.text_column, args.label_column)
    test_table, _ = read_table(args.test, args.text_column, args.label_column, label_names=names)
    groups = _groups(args, names)
    model_dir = args.model or default_model_dir()
    if not Path(model_dir, "config.json").is_file():
        raise AdapterKitError(f"--model {model_dir}: not a Hugging Face model folder (no config.json)")
    model = AutoModel.from_pretrained(model_dir).eval()
    backbone = cl.TextBackbone(model, AutoTokenizer.from_pretrained(model_dir), args.max_length)
    train = backbone.encode(train_table.texts, train_table.labels)
    test = backbone.encode(test_table.texts, test_table.labels)
    stream = cl.Stream.class_incremental(train, test, groups, ["+".join(names[c] for c in g) for g in groups])
    spec = parse_spec(args.method, args.param)
    targets: Any = args.targets.split(",") if args.targets else None
    if targets is None and spec.default_targets(model) is None:
        targets = default_targets(model, args.method)
    config = cl.ContinualConfig(epochs=args.epochs, lr=args.lr, head_lr=args.head_lr, batch_size=args.batch_size,
                                seed=args.seed)
    learner = cl.Learner(backbone, spec, targets, config)
    method = cl.METHODS[args.strategy]()
    result = cl.run_stream(method, learner, stream, out=args.out, resume=args.resume)
    print(f"{args.strategy} on {len(stream)} tasks ({', '.join(result.task_names)}): {result.trainable_params:,} "
          f"trained parameters, {sum(result.seconds_per_task):.0f} s")
    for variant, metrics in result.metrics.items():
        print(f"  {variant:10s} " + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items()))
    print(f"wrote {Path(args.out) / 'result.json'} and accuracy_matrix.png")
    return 0
