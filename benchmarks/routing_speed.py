"""Route speed: base vs one LoRA vs MoLE top-1 over 8 experts vs X-LoRA (adapterkit) vs peft's X-LoRA.

A random Llama-shaped model (hidden 512, 4 layers, intermediate 1376, vocab 2000), batch 4 x 128 tokens, float32,
forward only. Every LoRA is r=16 on the FFN projections (gate, up, down: MoLE's placement); X-LoRA mixes 3 of
them (classifier depth 1, peft's default) and peft's X-LoRA gets the same experts and classifier weights, checked
equal before timing. The variants are timed interleaved in one process; medians; ratios printed. Each run is
timed twice: wall clock, and the process's CPU time (user + system), which a machine shared with other jobs
disturbs less (a descheduled process accrues no CPU time); the ratios use CPU time.

    python benchmarks/routing_speed.py [--repeats 15] [--json results/routing_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

FFN = ["gate_proj", "up_proj", "down_proj"]
HIDDEN, LAYERS, INTER, VOCAB, ROWS, TOKENS = 512, 4, 1376, 2000, 4, 128


def build(folder: Path):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterkit as ak
    from adapterkit.inject.engine import placements
    from adapterkit.interop.peft_format import export_peft

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, intermediate_size=INTER, vocab_size=VOCAB,
                         num_attention_heads=8, num_key_value_heads=8, use_cache=False)
    base = LlamaForCausalLM(config).eval()
    ours = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(1)
    for i in range(8):
        ak.attach(ours, f"x{i}", ak.LoRA(r=16, alpha=32), FFN)
        with torch.no_grad():
            for _, _, host in placements(ours, f"x{i}"):
                host.adapter(f"x{i}").lora_b.copy_(torch.randn(host.adapter(f"x{i}").lora_b.shape, generator=gen) * .02)
        if i < 3:
            export_peft(ours, f"x{i}", folder / f"x{i}")
    ak.attach(ours, "mole", ak.compose.MoLE(experts=8), FFN)
    ak.attach(ours, "xlora", ak.compose.XLoRA(experts=3, hidden_size=HIDDEN), FFN)
    xconfig = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=HIDDEN,
                               adapters={str(i): str(folder / f"x{i}") for i in range(3)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), xconfig).eval()
    classifier = theirs.base_model.internal_xlora_classifier.layers
    placements(ours, "xlora")[0][2].adapter("xlora").classifier.load_state_dict(classifier.state_dict())
    return ours.eval(), theirs


def measure(repeats: int) -> dict[str, float]:
    import adapterkit as ak

    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = build(Path(folder))
    ids = torch.randint(0, VOCAB, (ROWS, TOKENS), generator=torch.Generator().manual_seed(2))
    blocks = {"mole": ak.Mix(*[f"x{i}" for i in range(8)], name="mole"), "xlora": ak.Mix("x0", "x1", "x2",
                                                                                              name="xlora")}

    from adapterkit.methods.lora import LoRALinear

    def run(setup, loop: bool = False):
        def go() -> torch.Tensor:
            mixed = LoRALinear.mixed_delta
            if loop:  # the combiner's fallback: each expert on its own, then a weighted add
                LoRALinear.mixed_delta = staticmethod(lambda adapters, x, weights: None)  # type: ignore[method-assign]
            try:
                with ak.use(ours, *setup):
                    return ours(input_ids=ids).logits
            finally:
                LoRALinear.mixed_delta = mixed  # type: ignore[method-assign]
        return go

    runs = {
        "base": run(()),
        "lora": run(("x0",)),
        "mole top-1 of 8": run((blocks["mole"],)),
        "xlora (adapterkit)": run((blocks["xlora"],)),
        "xlora (expert loop)": run((blocks["xlora"],), loop=True),
        "xlora (peft)": lambda: theirs(input_ids=ids).logits,
    }
    results: dict[str, float] = {}
    with torch.inference_mode():
        results["xlora max abs difference to peft"] = (runs["xlora (adapterkit)"]() - runs["xlora (peft)"]()).abs(
        ).max().item()
        times: dict[str, list[float]] = {k: [] for k in runs}
        walls: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(repeats + 1):
            for key, fn in runs.items():
                start, wall = time.process_time(), time.perf_counter()
                fn()
                times[key].append(time.process_time() - start)
                walls[key].append(time.perf_counter() - wall)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    for key, value in med.items():
        results[f"{key} ms"] = 1000 * value
        results[f"{key} wall ms"] = 1000 * statistics.median(walls[key][1:])
    for key in runs:
        results[f"{key} / lora"] = med[key] / med["lora"]
    results["lora overhead over base ms"] = 1000 * (med["lora"] - med["base"])
    results["xlora (adapterkit) / xlora (peft)"] = med["xlora (adapterkit)"] / med["xlora (peft)"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the first published run used 1)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = measure(args.repeats)
    print(json.dumps(results, indent=1))
    print(f"\nLlama hidden {HIDDEN}, {LAYERS} layers, batch {ROWS} x {TOKENS}, fp32, CPU ({torch.get_num_threads()} "
          "threads); LoRA r=16 on gate/up/down")
    print(f"{'variant':<20} {'CPU ms':>8} {'/ base':>7} {'/ lora':>7} {'wall ms':>8}")
    base = results["base ms"]
    for key in ("base", "lora", "mole top-1 of 8", "xlora (adapterkit)", "xlora (expert loop)", "xlora (peft)"):
        ms = results[f"{key} ms"]
        print(f"{key:<20} {ms:>8.1f} {ms / base:>7.2f} {results[f'{key} / lora']:>7.2f} "
              f"{results[f'{key} wall ms']:>8.1f}")
    print(f"X-LoRA adapterkit / peft: {results['xlora (adapterkit) / xlora (peft)']:.2f}; max |diff| "
          f"{results['xlora max abs difference to peft']:.1e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
