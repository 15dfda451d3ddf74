"""SmolLM2-135M-Instruct: LoRA SFT step time and peak memory, and generation speed, adapterkit vs peft vs the floor.

Training step (``--what step``), the issue-17 recipe: LoRA r=16, alpha=32, no dropout, on all seven projections
(q/k/v/o/gate/up/down) of the 30 layers; AdamW lr 2e-4; one fixed batch of 4 x 256 random token ids (seed 0),
labels = the ids (causal-LM loss on every position), model in train mode. A step is zero_grad + forward + loss +
backward + optimizer step. Three rows:

    floor        the frozen base with no adapter: forward + backward with the input embeddings' output requiring
                 grad (what any adapter placed in layer 0 makes backward do); no optimizer. No adapter method can
                 train for less.
    peft         get_peft_model(model, LoraConfig(...)), peft 0.21.2 defaults otherwise
    adapterkit   ak.attach + ak.train_only

``--dtype bf16`` loads the model in bfloat16 (both libraries keep their LoRA weights in float32: peft's
``autocast_adapter_dtype`` default, adapterkit's float32 masters).

Generation (``--what generate``): greedy decoding of exactly ``--new-tokens`` tokens (min = max new tokens) after a
chat-templated prompt, batch 1, for the base model, a LoRA unmerged (adapterkit, active), the same LoRA merged into
the weights (adapterkit), and peft unmerged; the LoRA has random non-zero B so it changes the output. Reported as
new tokens per second.

Every measurement runs in its own subprocess (peak RSS belongs to one row only); rows alternate within each round.
A run warms up, then times ``--steps`` steps (or ``--steps`` generations) and reports their median; the table shows
the median over rounds and the ratio to the floor (step) or the base (generate).

    python benchmarks/llm_speed.py --what step --dtype fp32 --rounds 3 --steps 5
    python benchmarks/llm_speed.py --what generate --rounds 3 --steps 5 --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import current_rss_mb, peak_rss_mb  # noqa: E402

STEP_ROWS = ("floor", "peft", "adapterkit")
GEN_ROWS = ("base", "adapterkit", "adapterkit_merged", "peft")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA, LR, WARMUP = 16, 32, 2e-4, 2



def load(dtype: str):
    import torch

    from adapterkit.models import load_pretrained

    torch.manual_seed(0)
    model, tokenizer = load_pretrained("smollm2", dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    return model, tokenizer


def with_lora(model, library: str, nonzero: bool):
    """The model with LoRA r=16 on the seven projections, through ``library``; B random when ``nonzero``."""
    import torch

    if library == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=PROJECTIONS))
        params = [p for n, p in model.named_parameters() if "lora_B" in n]
    else:
        import adapterkit as ak

        ak.attach(model, "lora", ak.LoRA(r=R, alpha=ALPHA), targets=PROJECTIONS)
        ak.train_only(model, "lora")
        params = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(".B")]
    if nonzero:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def one_step_run(row: str, dtype: str, steps: int, batch: int, seq_len: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, _ = load(dtype)
    if row == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    else:
        model = with_lora(model, row, nonzero=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR) if params else None
    ids = torch.randint(0, 49152, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def step() -> float:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        return loss.item()

    loaded = current_rss_mb()
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    peak = peak_rss_mb()
    return {"row": row, "median_ms": statistics.median(times), "peak_mib": peak, "train_mib": peak - loaded,
            "trainable": sum(p.numel() for p in params)}


def one_generate_run(row: str, dtype: str, steps: int, new_tokens: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, tokenizer = load(dtype)
    if row != "base":
        model = with_lora(model, "peft" if row == "peft" else "adapterkit", nonzero=True)
    if row == "adapterkit_merged":
        import adapterkit as ak

        ak.merge(model, "lora")
    model.eval()
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def generate() -> list[int]:
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        return out[0, batch["input_ids"].shape[1]:].tolist()

    generate()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tokens = generate()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"row": row, "tokens_per_s": len(tokens) / seconds, "median_s": seconds, "new_tokens": len(tokens),
            "first_tokens": tokens[:8], "peak_mib": peak_rss_mb()}


def run_subprocess(args: argparse.Namespace, row: str) -> dict:
    cmd = [sys.executable, __file__, "--one", row, "--what", args.what, "--dtype", args.dtype, "--steps",
           str(args.steps), "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--new-tokens",
           str(args.new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{row} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=["step", "generate"], default="step")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every row once (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps / generations per run (default 5)")
    parser.add_argument("--batch", type=int, default=4, help="training batch rows (default 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="training tokens per row (default 256)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per call (default 64)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every run and the summary here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one measuring subprocess
    args = parser.parse_args()
    if args.one:
        result = (one_step_run(args.one, args.dtype, args.steps, args.batch, args.seq_len) if args.what == "step"
                  else one_generate_run(args.one, args.dtype, args.steps, args.new_tokens))
        print("RESULT " + json.dumps(result), flush=True)
        return

    rows = STEP_ROWS if args.what == "step" else GEN_ROWS
    key = "median_ms" if args.what == "step" else "tokens_per_s"
    runs = []
    for rnd in range(args.rounds):
        for row in rows:
            result = run_subprocess(args, row) | {"round": rnd}
            runs.append(result)
            print(f"round {rnd} {row:<18} {key} {result[key]:.1f}  peak MiB {result['peak_mib']:.0f}", flush=True)
    summary = {row: {k: statistics.median(r[k] for r in runs if r["row"] == row)
                     for k in (key, "peak_mib", *(("train_mib",) if args.what == "step" else ()))}
               for row in rows}
    reference = summary[rows[0]]
    if args.what == "step":
        print(f"\nSmolLM2-135M {args.dtype}, batch {args.batch} x {args.seq_len}, LoRA r={R} on 7 projections, "
              f"median of {args.steps} steps, median of {args.rounds} rounds")
        print(f"{'row':<12} {'ms/step':>9} {'x floor':>8} {'peak MiB':>9} {'train MiB':>10}")
        for row, s in summary.items():
            print(f"{row:<12} {s['median_ms']:>9.0f} {s['median_ms'] / reference['median_ms']:>8.3f} "
                  f"{s['peak_mib']:>9.0f} {s['train_mib']:>10.0f}")
        ratio = {k: summary["adapterkit"][k] / summary["peft"][k] for k in ("median_ms", "peak_mib", "train_mib")}
        print(f"adapterkit / peft: time {ratio['median_ms']:.3f}, peak {ratio['peak_mib']:.3f}, "
              f"train memory {ratio['train_mib']:.3f}")
    else:
        print(f"\nSmolLM2-135M {args.dtype} greedy generation, batch 1, {args.new_tokens} new tokens, median of "
              f"{args.steps} calls, median of {args.rounds} rounds")
        print(f"{'row':<18} {'tokens/s':>9} {'time x base':>12}")
        for row, s in summary.items():
            print(f"{row:<18} {s['tokens_per_s']:>9.1f} {reference['tokens_per_s'] / s['tokens_per_s']:>12.3f}")
        ratio = {"time_over_base": {row: reference["tokens_per_s"] / s["tokens_per_s"] for row, s in summary.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary,
                                               "ratios": ratio}, indent=1))


if __name__ == "__main__":
    main()
