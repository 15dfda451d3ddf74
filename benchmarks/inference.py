"""Inference time of all-MiniLM-L6-v2 with LoRA: base model vs adapterkit vs peft, unmerged and merged.

Five separate model objects, built from one base model (same weights, same classifier head):

    base                the plain model, no adapter
    adapterkit          LoRA r=8, alpha=16 on query/value, unmerged (computed beside the base layer by a hook)
    peft                the same LoRA with peft, unmerged
    adapterkit merged   adapterkit's LoRA after ``ak.merge``
    peft merged         peft's LoRA after ``merge_adapter()``

The LoRA B factors are set to non-zero random values (A stays at its Kaiming init) and peft gets exactly the
adapterkit factors, so both libraries compute the same function and it differs from the base model; before timing,
the script checks this on the max |difference| of the last hidden states. One fixed batch of 32 x 64 random token
ids (seed 0, attention mask all ones) is run in eval mode under ``torch.inference_mode()`` with
``torch.set_num_threads(2)``.

The five models are timed interleaved in one process: each repeat runs every model once (the order rotates from
repeat to repeat), so slow drifts and background load hit all of them alike. After ``--warmup`` rounds, the median
over ``--repeats`` rounds is reported per model, with its ratio to the base model.

    python benchmarks/inference.py                        # 20 repeats, about 2 min on 2 cores
    python benchmarks/inference.py --repeats 50 --json inference.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import minilm_dir  # noqa: E402

BATCH, SEQ_LEN = 32, 64
NAME = "bench"


def build_models() -> dict:
    """The five models, in eval mode, keyed by the label printed in the table."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    import adapterkit as ak

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()

    def with_adapterkit(factors: dict | None) -> torch.nn.Module:
        model = copy.deepcopy(base)
        ak.attach(model, NAME, ak.LoRA(r=8, alpha=16), targets=["query", "value"])
        lora = {n: p for n, p in model.named_parameters() if ".lora_" in n}
        with torch.no_grad():
            for pname, param in lora.items():
                if factors is not None:
                    param.copy_(factors[pname])
                elif pname.endswith("lora_b"):
                    param.normal_(std=0.02)
        return model.eval()

    def with_peft(factors: dict) -> torch.nn.Module:
        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
        model = get_peft_model(copy.deepcopy(base), config)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for pname, value in factors.items():  # "<path>.adapterkit.bench.lora_a" -> peft's "<path>.lora_A..."
                path, factor = pname.split(f".adapterkit.{NAME}.")
                peft_name = f"base_model.model.{path}.lora_{factor[-1].upper()}.default.weight"
                params[peft_name].copy_(value)
        return model.eval()

    ak_unmerged = with_adapterkit(None)
    factors = {n: p.detach().clone() for n, p in ak_unmerged.named_parameters() if ".lora_" in n}
    ak_merged = with_adapterkit(factors)
    ak.merge(ak_merged, NAME)
    peft_unmerged = with_peft(factors)
    peft_merged = with_peft(factors)
    peft_merged.merge_adapter()
    return {"base": base, "adapterkit": ak_unmerged, "peft": peft_unmerged,
            "adapterkit merged": ak_merged, "peft merged": peft_merged}


def check(models: dict, batch: dict) -> dict[str, float]:
    """Max |difference| of every model's last hidden state from the unmerged adapterkit one's.

    The base model's must be clearly above zero (the adapter changes the function), the others near zero.
    """
    import torch

    with torch.inference_mode():
        hidden = {label: model(**batch, output_hidden_states=True).hidden_states[-1] for label, model in models.items()}
    ref = hidden["adapterkit"]
    return {label: (out - ref).abs().max().item() for label, out in hidden.items() if label != "adapterkit"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds over the five models (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before them (default 2)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the timings and checks here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(2)
    models = build_models()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, models["base"].config.vocab_size, (BATCH, SEQ_LEN), generator=gen)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    diffs = check(models, batch)
    print("max |last hidden state - adapterkit unmerged|: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    if diffs["base"] < 1e-2 or max(v for k, v in diffs.items() if k != "base") > 1e-3:
        sys.exit("check failed: the adapters do not compute the same, non-trivial function")

    labels = list(models)
    times: dict[str, list[float]] = {label: [] for label in labels}
    with torch.inference_mode():
        for i in range(args.warmup + args.repeats):
            shift = i % len(labels)
            for label in labels[shift:] + labels[:shift]:
                start = time.perf_counter()
                models[label](**batch)
                if i >= args.warmup:
                    times[label].append((time.perf_counter() - start) * 1000)

    medians = {label: statistics.median(t) for label, t in times.items()}
    print(f"\nMiniLM-L6 seq. classification inference, batch {BATCH} x {SEQ_LEN}, LoRA r=8 on query/value; "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'model':<18} {'ms':>8} {'min ms':>8} {'x base':>7}")
    for label in labels:
        print(f"{label:<18} {medians[label]:>8.1f} {min(times[label]):>8.1f} {medians[label] / medians['base']:>7.3f}")
    if args.json:
        result = {"config": {"batch": BATCH, "seq_len": SEQ_LEN, "repeats": args.repeats, "warmup": args.warmup,
                             "r": 8, "alpha": 16, "targets": ["query", "value"], "threads": 2},
                  "median_ms": medians, "ratio_to_base": {k: v / medians["base"] for k, v in medians.items()},
                  "times_ms": times, "max_abs_hidden_diff_vs_adapterkit": diffs}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
