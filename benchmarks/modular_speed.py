"""Training step and inference time of issue 14's methods on all-MiniLM-L6-v2 against LoRA, and generation time on
SmolLM2-135M-Instruct against LoRA, in one process.

MiniLM (``--batch`` x ``--length`` random ids, seed 0): LoRA r=8 on query/value (the reference row), the Pfeiffer
bottleneck, Compacter, Compacter++, sequential and parallel conformer (FFN), one bottleneck shared by all layers,
prompt / P- / prefix tuning with 20 virtual tokens. A step is zero_grad + forward + loss + backward + AdamW on the
adapter and the head; inference one eval forward under inference_mode. Every adapter gets small random noise (no
identity shortcut). Rounds rotate the order; medians after warm-up (benchmarks/lowrank_speed.py's timed_rounds).

SmolLM2: greedy ``generate`` of ``--new-tokens`` tokens for ``--gen-batch`` prompts of 24 tokens, with the KV cache,
for the base model, LoRA r=16 on all seven projections, prompt and prefix tuning (20 tokens), the LLaMA-Adapter and
two inner layers where they have landed. The prompt methods' extra sequence cost is the 20 positions they add to
every attention (prompt tuning: also to every layer's FFN at the prefill).

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python benchmarks/modular_speed.py        # idle, about 6 min
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import _common  # noqa: F401  (offline hub)
from lowrank_speed import timed_rounds

FFN_OUT = r"re:.*\.layer\.\d+\.output\.dense"
FFN_NORM = r"re:.*\.layer\.\d+\.output\.LayerNorm"


def minilm_variants() -> dict[str, tuple[Any, Any]]:
    import adapterkit as ak
    from adapterkit.methods.compacter import Compacter

    found: dict[str, tuple[Any, Any]] = {
        "LoRA r=8": (ak.LoRA(r=8, alpha=16), ["query", "value"]),
        "bottleneck rf=16": (ak.SeqBottleneck(reduction_factor=16), [FFN_NORM]),
        "Compacter": (Compacter(), ["output.dense"]),
        "Compacter++": (Compacter(), [FFN_NORM]),
        "conformer seq FFN": (ak.methods.SeqConformer(hidden=8, kernel_size=7, norm="layer"), [FFN_OUT]),
        "conformer par FFN": (ak.methods.ParConformer(hidden=8, kernel_size=7, norm="layer"), ["intermediate"]),
        "prompt tuning n=20": (ak.methods.PromptTuning(n_tokens=20), None),
        "P-tuning n=20": (ak.methods.PTuning(n_tokens=20, hidden=128), None),
        "prefix tuning n=20": (ak.methods.PrefixTuning(n_tokens=20, projection="mlp", hidden=128), None),
    }
    shared = getattr(ak.methods, "Shared", None)
    if shared is not None:
        found["shared bottleneck rf=16"] = (shared(ak.SeqBottleneck(reduction_factor=16)), [FFN_NORM])
    return found


def _noise(model: Any, name: str) -> None:
    import torch

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if f".{name}." in f".{pname}." and "adapterkit" in pname:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def run_minilm(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    import adapterkit as ak
    from tasks import minilm_dir

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = torch.randint(0, 2, (args.batch,), generator=torch.Generator().manual_seed(1))
    models: dict[str, Any] = {}
    params: dict[str, int] = {}
    for name, (spec, targets) in minilm_variants().items():
        model = copy.deepcopy(base)
        ak.attach(model, "a", spec, targets)
        _noise(model, "a")
        ak.train_only(model, "a", also=["classifier"])
        params[name] = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "adapterkit" in n)
        models[name] = model
    models["base (no adapter)"] = copy.deepcopy(base)
    step_ms, infer_ms = timed_rounds({k: v for k, v in models.items() if k != "base (no adapter)"}, models, batch,
                                     labels, args.warmup, args.rounds)
    ref_step, ref_infer = statistics.median(step_ms["LoRA r=8"]), statistics.median(infer_ms["LoRA r=8"])
    print(f"\nMiniLM, batch {args.batch} x {args.length}, {torch.get_num_threads()} thread(s), medians of "
          f"{args.rounds} rounds\n")
    print("| method | adapter params | step ms | step vs LoRA | inference ms | inference vs LoRA |")
    print("|---|---|---|---|---|---|")
    for name in models:
        step = statistics.median(step_ms[name]) if name in step_ms else None
        infer = statistics.median(infer_ms[name])
        print(f"| {name} | {params.get(name, 0):,} | {'—' if step is None else f'{step:.1f}'} | "
              f"{'—' if step is None else f'{step / ref_step:.2f}'} | {infer:.1f} | {infer / ref_infer:.2f} |")


def smollm2_variants() -> dict[str, tuple[Any, Any]]:
    import adapterkit as ak
    from adapterkit.core.registry import spec_from_dict

    found: dict[str, tuple[Any, Any]] = {
        "LoRA r=16": (ak.LoRA(r=16, alpha=32), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]),
        "prompt tuning n=20": (ak.methods.PromptTuning(n_tokens=20), None),
        "prefix tuning n=20": (ak.methods.PrefixTuning(n_tokens=20), None),
    }
    for label, fields, targets in (("LLaMA-Adapter", {"method": "adaption_prompt"}, None),
                                   ("inner layers x2", {"method": "inner_layers"}, [r"re:model\.layers\.(14|29)"])):
        try:
            found[label] = (spec_from_dict(fields), targets)
        except Exception as exc:  # noqa: BLE001  (not landed: say so)
            print(f"skip {label}: {exc}")
    return found


def run_generation(args: argparse.Namespace) -> None:
    import torch

    import adapterkit as ak
    from adapterkit.models import load_pretrained

    base, _ = load_pretrained("smollm2", task="causal-lm")
    base.generation_config.eos_token_id = None  # every variant decodes the same number of tokens
    ids = torch.randint(100, 20000, (args.gen_batch, 24), generator=torch.Generator().manual_seed(0))
    models: dict[str, Any] = {"base (no adapter)": base}
    for name, (spec, targets) in smollm2_variants().items():
        model = copy.deepcopy(base)
        ak.attach(model, "a", spec, targets)
        _noise(model, "a")
        models[name] = model.eval()
    times: dict[str, list[float]] = {k: [] for k in models}
    order = list(models)
    for rnd in range(1 + args.gen_rounds):
        shift = rnd % len(order)
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            with torch.inference_mode():
                models[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens, pad_token_id=0)
            if rnd:
                times[name].append((time.perf_counter() - start) * 1000)
    ref = statistics.median(times["LoRA r=16"])
    print(f"\nSmolLM2 generate, {args.gen_batch} prompts x 24 tokens + {args.new_tokens} new, with the KV cache, "
          f"medians of {args.gen_rounds} rounds\n")
    print("| method | ms | vs LoRA | ms per new token |")
    print("|---|---|---|---|")
    for name in models:
        med = statistics.median(times[name])
        print(f"| {name} | {med:.0f} | {med / ref:.2f} | {med / args.new_tokens:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--gen-rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--part", choices=["all", "minilm", "generate"], default="all")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.part in ("all", "minilm"):
        run_minilm(args)
    if args.part in ("all", "generate"):
        run_generation(args)


if __name__ == "__main__":
    main()
