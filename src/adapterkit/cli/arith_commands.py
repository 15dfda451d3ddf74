"""Adapter arithmetic on the command line: ``convert`` turns a run's mergeable adapter into a plain LoRA, ``combine``
mixes several runs' adapters into one (arith/combine.py: peft's add_weighted_adapter types).

The parser part imports nothing heavy (main.py builds every parser for ``--help``); the command body imports the
model code when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from adapterkit.core.errors import AdapterKitError

CONVERT_DESCRIPTION = """Convert a mergeable adapter (LoRA, rsLoRA, DoRA, IA3, LT-SFT, masks, ...) to a plain LoRA.

Each module's weight change merge(W) - W, taken in float64 on its own base weight, is cut to rank R by the
truncated SVD (the best rank-R approximation). The LoRA is saved with the run's head into --out: load it with
ak.load, or export it for peft, vLLM and LoRAX. Prints the relative error ||dW - BA|| / ||dW|| over the modules,
max and mean: 0 is exact (R at or above a module's min(in, out), or its change's own rank)."""

CONVERT_EXAMPLES = """examples:
  adapterkit convert runs/sst2-dora --to lora -r 16 --out runs/sst2-dora-lora16
  adapterkit convert saved/ia3 --model DIR --num-labels 3 -r 8 --drop-bias --out saved/ia3-lora8"""


COMBINE_DESCRIPTION = """Combine the adapters of several runs (trained on one base model) into one LoRA adapter.

--how cat joins the LoRA factors: the result's change is exactly the weighted sum of the sources' changes, at the
sum of their ranks. linear, ties, dare_linear, dare_ties and magnitude_prune mix the factors of equal-rank LoRAs as
peft's add_weighted_adapter does (ties / dare / magnitude_prune prune to --density). Their _svd forms (svd,
ties_svd, ...) mix the weight changes themselves (any mergeable adapter: DoRA, IA3, ...) and cut the result to
--rank by the truncated SVD. A negative weight subtracts a source. The result is saved into --out with the first
run's head."""

COMBINE_EXAMPLES = """examples:
  adapterkit combine runs/a runs/b --how cat --weights 1,1 --out runs/a+b
  adapterkit combine runs/a runs/b --how ties_svd --weights 0.5,0.5 --density 0.5 --rank 16 --out runs/ties"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` and ``combine`` on the ``adapterkit`` sub-command parser."""
    convert = sub.add_parser(
        "convert", help="turn a run's adapter (DoRA, IA3, LT-SFT, ...) into a plain LoRA of a chosen rank",
        description=CONVERT_DESCRIPTION,
        epilog=CONVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    convert.add_argument("source", metavar="RUN_OR_ADAPTER_DIR",
                         help="run folder written by `adapterkit train`, or an adapter folder (ak.save) with --model")
    convert.add_argument("--to", choices=["lora"], default="lora", help="what to convert to (default lora)")
    convert.add_argument("-r", "--rank", type=int, required=True, metavar="R",
                         help="rank of the LoRA (capped per module at min(in, out), where it is exact)")
    convert.add_argument("--out", required=True, metavar="DIR", help="folder for the LoRA adapter")
    convert.add_argument("--name", default=None,
                         help="name the LoRA is saved under (default: the adapter's name + _lora<R>)")
    convert.add_argument("--drop-bias", action="store_true",
                         help="convert an adapter that also changes biases (BitFit, IA3 on outputs with a bias), "
                              "leaving the bias change out; the dropped part counts in the printed error")
    convert.add_argument("--model", default=None, metavar="DIR",
                         help="base model folder, for an adapter folder that is not in a run folder")
    convert.add_argument("--num-labels", type=int, default=2, metavar="N",
                         help="classes of the classification head, with --model (default 2)")

    combine = sub.add_parser("combine", help="mix several runs' adapters into one (cat, linear, TIES, DARE, SVD)",
                             description=COMBINE_DESCRIPTION, epilog=COMBINE_EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    combine.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `adapterkit train`")
    combine.add_argument("--how", default="cat", metavar="TYPE",
                         help="cat, linear, ties, dare_linear, dare_ties, magnitude_prune, or svd, ties_svd, "
                              "dare_linear_svd, dare_ties_svd, magnitude_prune_svd (default cat: the exact sum)")
    combine.add_argument("--weights", default=None, metavar="LIST",
                         help="comma-separated weight per run, e.g. 0.5,0.5 (default 1 each; write --weights=-1,1 "
                              "when the first is negative)")
    combine.add_argument("--density", type=float, default=None, metavar="D",
                         help="fraction each source keeps, in (0, 1]: needed by ties, dare and magnitude_prune")
    combine.add_argument("--rank", type=int, default=None, metavar="R", help="rank of the result: the _svd types")
    combine.add_argument("--majority-sign", choices=["total", "frequency"], default="total",
                         help="TIES sign election: sign of the sum or of the sign count (default total)")
    combine.add_argument("--seed", type=int, default=0, metavar="N", help="seed of DARE's random masks (default 0)")
    combine.add_argument("--name", default="combined", help="name the result is saved under (default combined)")
    combine.add_argument("--out", required=True, metavar="DIR", help="folder for the combined adapter")


def _load_source(args: argparse.Namespace) -> tuple[Any, str, tuple[str, ...]]:
    """(model with the adapter loaded, the adapter's name, the modules saved beside it)."""
    import adapterkit as ak
    from adapterkit.cli.common import load_run
    from adapterkit.models import load_pretrained

    folder = Path(args.source)
    if (folder / "run.json").is_file():
        if args.model is not None:
            raise AdapterKitError(f"{folder} is a run folder, whose run.json names its model; drop --model")
        # a QLoRA run converts on the float model it was quantised from, as `merge` does: the delta needs real weights
        record, model, _ = load_run(str(folder), float_base=True)
        return model, "adapter", tuple(record.get("config", {}).get("head", []))
    if not (folder / "adapter.json").is_file():
        raise AdapterKitError(f"{folder}: neither a run folder (run.json) nor an adapter folder (adapter.json)")
    if args.model is None:
        raise AdapterKitError(f"{folder} is an adapter folder: pass --model DIR, the base model it was trained on")
    model, _ = load_pretrained(args.model, task="auto", num_labels=args.num_labels)  # a causal LM loads as one
    record, _ = ak.read(folder)
    name = ak.load(model, folder)
    return model, name, tuple(record.get("modules") or ())


def cmd_convert(args: argparse.Namespace) -> int:
    """``adapterkit convert``: load, convert, save, and print the error summary."""
    import adapterkit as ak
    from adapterkit.arith.convert import ConvertError, to_lora
    from adapterkit.core.tree import placements
    from adapterkit.train.loop import check_writable

    if args.rank < 1:
        raise AdapterKitError(f"--rank must be at least 1, got {args.rank}")
    out = Path(args.out)
    check_writable(out)  # fail before loading anything
    model, name, head = _load_source(args)
    method = placements(model, name)[0][2].adapter(name).spec.method
    new_name = args.name or f"{name}_lora{args.rank}"
    try:
        errors = to_lora(model, name, args.rank, new_name=new_name, bias="drop" if args.drop_bias else "refuse")
    except ConvertError as exc:  # the library's advice names its keyword; here the option says the same
        raise ConvertError(str(exc).replace("bias='drop'", "--drop-bias")) from None
    ak.save(model, out, new_name, modules=head)
    worst = max(errors, key=lambda p: errors[p])
    print(f"converted {name!r} ({method}, {len(errors)} modules) to a rank-{args.rank} LoRA {new_name!r}")
    print(f"relative error  max {errors[worst]:.3e} ({worst})  mean {sum(errors.values()) / len(errors):.3e}")
    print(f"written to {out}" + (f" (with {', '.join(head)})" if head else ""))
    return 0


def _weights(text: str | None, runs: int) -> list[float]:
    if text is None:
        return [1.0] * runs
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise AdapterKitError(f"--weights {text!r}: expected comma-separated numbers, e.g. 0.5,0.5") from None
    if len(weights) != runs:
        raise AdapterKitError(f"--weights {text!r}: {len(weights)} values for {runs} runs")
    return weights


def cmd_combine(args: argparse.Namespace) -> int:
    """``adapterkit combine``: load every run's adapter onto one base model, combine, save with the first head."""
    import adapterkit as ak
    from adapterkit.arith.combine import combine
    from adapterkit.cli.common import load_classifier, read_run
    from adapterkit.core.tree import placements
    from adapterkit.train.loop import check_writable

    weights = _weights(args.weights, len(args.runs))
    records = [read_run(run) for run in args.runs]  # every run.json is checked before any model loads
    out = Path(args.out)
    check_writable(out)
    first = records[0]
    where = f"{Path(args.runs[0], 'run.json')}: model"
    if first.get("task") == "causal-lm":  # a causal-LM run records no labels: its model loads as one
        from adapterkit.models import load_pretrained

        model, _ = load_pretrained(first["model"], task="causal-lm", where=where)
    else:
        model, _ = load_classifier(first["model"], len(first["labels"]), where=where)
    names = [f"run{i}" for i in range(len(args.runs))]
    # each load also copies its run's head into the model: loading the first run last leaves its head there
    for run, name in reversed(list(zip(args.runs, names, strict=True))):
        ak.load(model, Path(run, "adapter"), name=name)  # strict_base: a run on another base model is refused
    combine(model, names, weights, args.how, args.name, density=args.density,
            majority_sign_method=args.majority_sign, rank=args.rank, seed=args.seed)
    head = tuple(first.get("config", {}).get("head", []))
    ak.save(model, out, args.name, modules=head)
    ranks = sorted({host.adapter(args.name).spec.r for _, _, host in placements(model, args.name)})
    print(f"combined {len(names)} adapters ({args.how}, weights {','.join(f'{w:g}' for w in weights)}) into "
          f"{args.name!r}: {len(placements(model, args.name))} modules, rank {'/'.join(map(str, ranks))}")
    print(f"written to {out}" + (f" (with {', '.join(head)} of {args.runs[0]})" if head else ""))
    return 0
