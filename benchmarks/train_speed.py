"""LoRA training cost against the floor: frozen-model forward+backward vs peft (default and bf16 adapters) vs
adapterkit (float32 adapter masters, weights cast to bf16 where used), adapterkit with full and with selective
gradient checkpointing (train/recompute.py), and adapterkit on a 4-bit NF4 base (QLoRA).

Each variant runs in its own subprocess (peak memory per variant), --rounds times in alternation: median step
time over --steps steps after 3 warm-up steps (median over rounds), and peak memory (GPU: max allocated; CPU:
peak RSS). A random Llama-shaped model, bf16 weights, LoRA r=16 on all 7 linear projections, AdamW, next-token
loss.

With --interleave the step times come instead from one process holding every variant and stepping them in turn:
on a CPU the single-process times swing by +-15 % with where the allocator puts the large logits tensors, which
alternating cancels (benchmarks/RESULTS.md).

    python benchmarks/train_speed.py --interleave    # CPU: small config (hidden 256, 4 layers, batch 4 x 128)
    python benchmarks/train_speed.py --shape 1.1b    # GPU: hidden 2048, 22 layers, batch 8 x 1024 (the issue's shape)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # hidden, layers, intermediate, heads, kv heads, vocab, batch, tokens
    "small": (256, 4, 688, 8, 4, 8000, 4, 128),
    "1.1b": (2048, 22, 5632, 32, 4, 32000, 8, 1024),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["floor", "peft default", "peft bf16 adapters", "adapterkit", "adapterkit + checkpointing",
            "adapterkit + selective checkpointing", "adapterkit QLoRA (NF4 base)"]


def prepare(variant: str, shape: str):
    """(step function running one training step, adapter master dtype, device) for ``variant``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter, heads, kv, vocab, batch, tokens = SHAPES[shape]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=max(2048, tokens))
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    if variant.startswith("peft"):
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ),
                                    autocast_adapter_dtype=variant == "peft default")
    elif variant.startswith("adapterkit"):
        import adapterkit as ak
        from adapterkit.train.recompute import checkpoint_kwargs

        if "QLoRA" in variant:
            from adapterkit.inject.quantize import quantize_base

            quantize_base(model, "nf4", compute_dtype=torch.bfloat16)
        ak.attach(model, "a", ak.LoRA(r=16, alpha=32), PROJ)
        ak.train_only(model, "a")
        if "checkpointing" in variant:
            policy = "selective" if "selective" in variant else "full"
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(policy))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()
    ids = torch.randint(0, vocab, (batch, tokens), device=device)

    def step() -> None:
        if variant == "floor":  # frozen stack: gradients reach only the input embeddings
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
            loss = model(inputs_embeds=embeds, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step, (str(params[0].dtype) if params else "-"), device


def timed(step, device: str) -> float:
    """Seconds of one call of ``step`` (synchronised on a GPU)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def one(variant: str, shape: str, steps: int) -> dict:
    """Median step and peak memory of ``variant`` alone in this process."""
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 16))
    step, master, device = prepare(variant, shape)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [timed(step, device) for _ in range(steps + 3)][3:]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"variant": variant, "ms": 1000 * statistics.median(times), "peak_gib": peak, "adapter_dtype": master,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def interleaved(shape: str, steps: int) -> dict[str, float]:
    """Median step of every variant, all built in this process and stepped in turn (one step each, round after
    round), so allocator state and machine load fall on all of them alike; ms per variant."""
    import torch

    torch.set_num_threads(min(torch.get_num_threads(), 16))
    built = {variant: prepare(variant, shape) for variant in VARIANTS}
    times: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for index in range(steps + 3):
        for variant, (step, _, device) in built.items():
            elapsed = timed(step, device)
            if index >= 3:
                times[variant].append(elapsed)
    return {variant: 1000 * statistics.median(values) for variant, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="run every variant this many times (median)")
    parser.add_argument("--interleave", action="store_true",
                        help="also time every variant in one process, stepping them in turn (the ms column then "
                             "comes from that run; peak memory still from one process per variant)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.shape, args.steps)), flush=True)
        return
    runs: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):  # variants alternate within each round, so a slow spell hits all of them
        for variant in VARIANTS:
            cmd = [sys.executable, __file__, "--one", variant, "--shape", args.shape, "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
            runs[variant].append(json.loads(lines[0][7:]))
    rows = [{**found[0], "ms": statistics.median(r["ms"] for r in found),
             "peak_gib": statistics.median(r["peak_gib"] for r in found), "rounds_ms": [r["ms"] for r in found]}
            for found in runs.values()]
    if args.interleave:
        together = interleaved(args.shape, args.steps)
        for row in rows:
            row["ms alone"], row["ms"] = row["ms"], together[row["variant"]]
    floor = rows[0]
    print(f"{args.shape} Llama shape on {floor['device']}, bf16 weights, LoRA r=16 on 7 projections, AdamW")
    print(f"{'run':<38} {'adapter':>9} {'ms/step':>9} {'x floor':>8} {'peak GiB':>9} {'x floor':>8}")
    for row in rows:
        print(f"{row['variant']:<38} {row['adapter_dtype'].removeprefix('torch.'):>9} {row['ms']:>9.1f} "
              f"{row['ms'] / floor['ms']:>8.2f} {row['peak_gib']:>9.2f} {row['peak_gib'] / floor['peak_gib']:>8.2f}")
    by = {row["variant"]: row for row in rows}
    for variant in ("adapterkit + checkpointing", "adapterkit + selective checkpointing"):
        print(f"{variant}: {by[variant]['ms'] / by['adapterkit']['ms']:.2f}x the step and "
              f"{by[variant]['peak_gib'] / by['adapterkit']['peak_gib']:.2f}x the peak memory of adapterkit alone")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
