"""Adapter arithmetic on the command line: ``convert`` turns a run's mergeable adapter into a plain LoRA.

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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``convert`` on the ``adapterkit`` sub-command parser."""
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


def _load_source(args: argparse.Namespace) -> tuple[Any, str, tuple[str, ...]]:
    """(model with the adapter loaded, the adapter's name, the modules saved beside it)."""
    import adapterkit as ak
    from adapterkit.cli.common import load_classifier, load_run

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
    model, _ = load_classifier(args.model, args.num_labels)
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
