"""Many adapters in one batch: base model vs adapterkit `Select` vs peft `adapter_names`, N distinct adapters.

A random Llama-shaped model with N LoRA adapters (r=16 on all 7 projections, non-zero B); row i of the batch uses
adapter i mod N. Prefill: rows x 32 tokens (GPU: x 512); decode: rows x 1 token (one step, no cache). rows =
max(N, 4) at prefill and max(N, 8) at decode. The variants are timed interleaved in one process; medians;
ratios to the base model printed. Outputs of Select and peft are checked equal before timing. On CUDA with triton
installed, Select runs the Triton kernels (ADAPTERKIT_KERNELS=triton) and a fourth column, Sel.torch, times the
torch gathered path (ADAPTERKIT_KERNELS=torch) beside it; under TRITON_INTERPRET=1 on a CPU the same columns check
the benchmark's plumbing and correctness (interpreted kernels: their times mean nothing).

    python benchmarks/multi_adapter.py                      # CPU: hidden 768, 6 layers, fp32
    python benchmarks/multi_adapter.py --shape 1.1b         # GPU: hidden 2048, 22 layers, bf16
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import time

import torch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab, prefill tokens, prefill rows, decode rows
    "small": (768, 6, 2048, 12, 4, 32000, 32, 4, 8),
    "1.1b": (2048, 22, 5632, 32, 4, 32000, 512, 16, 64),
}


def build(shape: str, n: int, device: str, dtype: torch.dtype):
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import adapterkit as ak

    hidden, layers, inter, heads, kv, vocab, *_ = SHAPES[shape]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)
    with torch.device(device):
        base = LlamaForCausalLM(config).to(dtype).eval()
    ours = copy.deepcopy(base)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ)
    theirs = peft.get_peft_model(copy.deepcopy(base), lora, adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, n):
        theirs.add_adapter(f"a{i}", lora)
    theirs.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in range(n):
            ak.attach(ours, f"a{i}", ak.LoRA(r=16, alpha=32), PROJ)
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_((torch.randn(param.shape, generator=gen) * 0.02).to(param))
                adapter = name.split(".")[-2]
                path = name.split("base_model.model.", 1)[1].split(".lora_")[0]
                which = "lora_a" if ".lora_A." in name else "lora_b"
                target = ours.get_submodule(path).adapterkit.adapter(adapter)
                getattr(target, which).copy_(param)
    return base, ours, theirs


def measure(shape: str, n: int, device: str, dtype: torch.dtype, repeats: int) -> dict[str, float]:
    import adapterkit as ak

    base, ours, theirs = build(shape, n, device, dtype)
    *_, tokens, prefill_rows, decode_rows = SHAPES[shape]
    if device == "cpu":
        tokens = 32
    results = {}
    kernels = importlib.util.find_spec("triton") is not None and (
        device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
    for phase, rows, length in (("prefill", max(n, prefill_rows), tokens), ("decode", max(n, decode_rows), 1)):
        ids = torch.randint(0, 32000, (rows, length), device=device)
        names = [f"a{i % n}" for i in range(rows)]
        select = ak.Select(names)
        runs = {
            "base": lambda ids=ids: base(input_ids=ids).logits,
            "adapterkit": lambda ids=ids, select=select: _with(ours, select, ids, "triton" if kernels else None),
            "peft": lambda ids=ids, names=names: theirs(input_ids=ids, adapter_names=names).logits,
        }
        if kernels:  # the Triton kernels (above) vs the torch gathered path
            runs["adapterkit torch"] = lambda ids=ids, select=select: _with(ours, select, ids, kernels="torch")
        with torch.inference_mode():
            mixed, plain = runs["adapterkit"]().float(), runs["base"]().float()
            worst, floor = 0.0, 0.0
            for row in (0, rows - 1):  # the check: a mixed batch equals each example alone
                with ak.use(ours, names[row]):
                    alone = ours(input_ids=ids[row:row + 1]).logits[0].float()
                worst = max(worst, ((mixed[row] - alone).norm() / alone.norm()).item())
                base_alone = base(input_ids=ids[row:row + 1]).logits[0].float()  # the same for the bare model:
                floor = max(floor, ((plain[row] - base_alone).norm() / base_alone.norm()).item())  # GEMM noise
            results[f"{phase} Select vs alone"], results[f"{phase} base batch vs alone"] = worst, floor
            if worst >= max(1e-2, 3 * floor):
                print(f"warning: {phase} N={n}: Select vs rows alone {worst:.2e} (base batch vs alone {floor:.2e})")
            # peft's arithmetic rounds differently in bf16, and 22 random layers amplify it: reported, not asserted
            other = runs["peft"]().float()
            results[f"{phase} peft relative difference"] = ((mixed - other).norm() / other.norm()).item()
            if "adapterkit torch" in runs:
                gathered = runs["adapterkit torch"]().float()
                results[f"{phase} triton vs torch path"] = ((mixed - gathered).norm() / gathered.norm()).item()
            times: dict[str, list[float]] = {k: [] for k in runs}
            for _ in range(repeats + 1):
                for key, fn in runs.items():
                    if device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[key].append(time.perf_counter() - start)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        results[f"{phase} base ms"] = 1000 * med["base"]
        results[f"{phase} adapterkit x"] = med["adapterkit"] / med["base"]
        results[f"{phase} peft x"] = med["peft"] / med["base"]
        if "adapterkit torch" in med:
            results[f"{phase} adapterkit torch x"] = med["adapterkit torch"] / med["base"]
    return results


def _with(model, select, ids, kernels: str | None = None):
    import adapterkit as ak

    if kernels:
        os.environ["ADAPTERKIT_KERNELS"] = kernels
    try:
        with ak.use(model, select):
            return model(input_ids=ids).logits
    finally:
        if kernels:
            del os.environ["ADAPTERKIT_KERNELS"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_num_threads(min(torch.get_num_threads(), 16))
    rows = []
    for n in args.n:
        rows.append({"N": n, **measure(args.shape, n, device, dtype, args.repeats)})
        print(json.dumps(rows[-1]), flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{args.shape} Llama shape, {dtype}, {name}; LoRA r=16 on 7 projections; time / base model")
    both = "prefill adapterkit torch x" in rows[0]  # Select = Triton kernels, Sel.torch = gathered path
    extra = f" {'Sel.torch':>9}" if both else ""
    print(f"{'N':>3} {'prefill base ms':>16} {'Select':>7}{extra} {'peft':>7} "
          f"{'decode base ms':>15} {'Select':>7}{extra} {'peft':>7}")
    for r in rows:
        pre = f" {r['prefill adapterkit torch x']:>9.2f}" if both else ""
        dec = f" {r['decode adapterkit torch x']:>9.2f}" if both else ""
        print(f"{r['N']:>3} {r['prefill base ms']:>16.1f} {r['prefill adapterkit x']:>7.2f}{pre} "
              f"{r['prefill peft x']:>7.2f} {r['decode base ms']:>15.2f} {r['decode adapterkit x']:>7.2f}{dec} "
              f"{r['decode peft x']:>7.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
