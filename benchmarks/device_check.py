"""One-shot GPU check: the test suite on the lent machine's stack (transformers 5.x), CUDA parity with peft,
LoRA training-step time / peak memory on a 1.1B Llama-shaped model, the Triton multi-adapter LoRA kernels run
natively (no interpreter) against float64 and the torch path, and the multi-adapter serving table (Select via Triton
vs the torch gathered path vs peft vs the base model), printed as short tables.

Runs from the source tree with nothing installed:  PYTHONPATH=src:. python benchmarks/device_check.py
A shorter slot, kernels and serving only:  ... device_check.py --skip-tests --skip-train --multi-n 16 64
Shapes follow the issues: hidden 2048, 22 layers, intermediate 5632, 32 heads (4 KV), vocab 32000, bf16 weights,
LoRA r=16 on all 7 linear projections, AdamW, batch 8 x 1024, median of --steps steps after 3 warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run_tests() -> str:
    env = {**os.environ, "ADAPTERKIT_NO_PROGRESS": "1", "PYTHONPATH": "src:."}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         capture_output=True, text=True, env=env, timeout=400)
    lines = out.stdout.strip().splitlines()
    failures = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    return "\n".join(failures[:15] + lines[-1:])


def kernel_checks() -> None:
    """The kernel checks of tests/ops natively on this GPU (fp32, bf16, fp16; also 1.1B projection shapes)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADAPTERKIT_KERNELS")}
    env["PYTHONPATH"] = "src:."
    out = subprocess.run([sys.executable, "-m", "tests.ops.kernel_checks", "--device", "cuda"], capture_output=True,
                         text=True, env=env, timeout=300)
    if out.returncode:
        print("Triton kernel checks FAILED:", out.stderr.strip()[-1500:], flush=True)
        return
    results = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{'Triton kernels (native)':<32} {'rel err vs float64':>18} {'vs torch path':>14}")
    for name, numbers in results.items():
        if isinstance(numbers, dict):
            first = numbers.get("vs_float64", numbers.get("rows_alone_max_rel", float("nan")))
            print(f"{name:<32} {first:>18.2e} {numbers.get('vs_torch', float('nan')):>14.2e}")
    print(flush=True)


def multi_adapter(ns: list[int]) -> None:
    """benchmarks/multi_adapter.py on the 1.1B shape; its table (Select = Triton, Sel.torch = gathered path)."""
    out = subprocess.run([sys.executable, "benchmarks/multi_adapter.py", "--shape", "1.1b", "--n", *map(str, ns),
                          "--repeats", "5"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src:."},
                         timeout=560)
    lines = out.stdout.strip().splitlines()
    print("\n".join(lines if out.returncode == 0 else lines[-5:] + [out.stderr.strip()[-1500:]]), flush=True)


def llama(hidden: int, layers: int, inter: int, heads: int, kv: int, vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=2048)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def cuda_parity() -> float:
    """Max relative error of adapterkit vs peft LoRA logits on a small bf16 Llama on the GPU."""
    import copy

    import peft

    import adapterkit as ak
    from adapterkit.inject.engine import placements

    torch.manual_seed(0)
    base = llama(256, 2, 512, 4, 2, 1000)
    ours = copy.deepcopy(base)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=PROJ)
    theirs = peft.get_peft_model(copy.deepcopy(base), config, autocast_adapter_dtype=False).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ak.attach(ours, "a", ak.LoRA(r=8, alpha=16), PROJ)
    with torch.no_grad():
        for path, _, host in placements(ours, "a"):
            layer = theirs.base_model.model.get_submodule(path)
            host.adapter("a").lora_a.copy_(layer.lora_A["default"].weight)
            host.adapter("a").lora_b.copy_(layer.lora_B["default"].weight)
    ids = torch.randint(0, 1000, (4, 64), device="cuda")
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    return float((a - b).norm() / b.norm())


def time_steps(model, params, steps: int, floor: bool = False) -> tuple[float, float]:
    ids = torch.randint(0, 32000, (8, 1024), device="cuda")
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        if floor:
            emb = model.get_input_embeddings()(ids).detach().requires_grad_()
            loss = model(inputs_embeds=emb, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def train_speed(steps: int) -> list[tuple[str, float, float]]:
    import peft

    import adapterkit as ak

    shape = (2048, 22, 5632, 32, 4, 32000)
    rows = []
    for variant in ("floor", "peft default", "peft bf16 adapters", "adapterkit"):
        torch.manual_seed(0)
        model = llama(*shape)
        model.requires_grad_(False)
        if variant == "floor":
            params = []
        elif variant.startswith("peft"):
            config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ)
            model = peft.get_peft_model(model, config, autocast_adapter_dtype=variant == "peft default")
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            ak.attach(model, "a", ak.LoRA(r=16, alpha=32), PROJ)
            ak.train_only(model, "a")
            params = [p for p in model.parameters() if p.requires_grad]
        model.train()
        ms, gib = time_steps(model, params, steps, floor=variant == "floor")
        rows.append((variant, ms, gib))
        del model, params
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--multi-n", type=int, nargs="*", default=[1, 16, 64],
                        help="adapters counts for the multi-adapter table (none: skip it)")
    args = parser.parse_args()
    import transformers

    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  transformers {transformers.__version__}")
    if not args.skip_tests:
        print("tests:", run_tests(), flush=True)
    print(f"CUDA bf16 LoRA parity with peft (relative error): {cuda_parity():.2e}", flush=True)
    kernel_checks()
    if args.multi_n:
        multi_adapter(args.multi_n)
    if args.skip_train:
        return
    rows = train_speed(args.steps)
    floor_ms, floor_gib = rows[0][1], rows[0][2]
    print(f"\n{'run':<22} {'ms/step':>8} {'x floor':>8} {'peak GiB':>9} {'x floor':>8}")
    for name, ms, gib in rows:
        print(f"{name:<22} {ms:>8.1f} {ms / floor_ms:>8.2f} {gib:>9.1f} {gib / floor_gib:>8.2f}")


if __name__ == "__main__":
    main()
