"""LoRA training step time and peak memory: adapterkit vs peft on all-MiniLM-L6-v2 sequence classification.

Setup, identical for both libraries: LoRA r=8, alpha=16, no dropout, on query/value; the classifier head trainable
(adapterkit: ``train_only(..., also=["classifier"])``, peft: ``modules_to_save=["classifier"]``); AdamW lr 5e-4;
model in train mode; one fixed batch of 32 x 64 random token ids (seed 0, attention mask all ones, random labels).
A step is zero_grad + forward + loss + backward + optimizer step, timed with ``time.perf_counter``.

Each measurement runs in its own subprocess, so peak RSS (``ru_maxrss``) belongs to one library only; the runs
alternate adapterkit, peft, adapterkit, peft, ... for ``--rounds`` rounds. A subprocess builds the model, warms up
3 steps, then times ``--steps`` steps and reports their median. Memory columns:

    peak MiB    peak RSS of the whole process (imports, model, training)
    train MiB   peak RSS minus the RSS right after the model, adapter and optimizer were built (before any step):
                what the training steps themselves add (activations, gradients, AdamW state, allocator slack)

The table shows the median over rounds per library and the adapterkit / peft ratios. Timings are wall-clock on
the CPU with ``torch.set_num_threads(2)``; other load on the machine shows up in them.

A step (batch 32 x 64 through the 6-layer encoder, forward and backward) takes about 2 s on 2 otherwise idle cores
and about 6 s when another 2-thread job shares them, so the default of 5 timed steps keeps a run near 2.5 minutes
on an idle machine (about 5 minutes on a shared one); raise ``--steps`` for tighter medians.

    python benchmarks/train_step.py                           # 3 rounds x 5 steps
    python benchmarks/train_step.py --steps 20 --json train_step.json   # about 6 min on an idle machine
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
from _common import attach_sst2_lora, current_rss_mb, minilm_dir, peak_rss_mb  # noqa: E402

LIBRARIES = ("adapterkit", "peft")
BATCH, SEQ_LEN, WARMUP = 32, 64, 3



def build(library: str):
    """MiniLM classifier with LoRA on query/value and a trainable head; returns (model, trainable params)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    model = attach_sst2_lora(model, library)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def one_run(library: str, steps: int) -> dict:
    """Build, warm up, time ``steps`` training steps; runs inside the measuring subprocess."""
    import torch

    torch.set_num_threads(2)
    model, params = build(library)
    optimizer = torch.optim.AdamW(params, lr=5e-4)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 2, (BATCH,), generator=gen)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        return loss.item()

    rss_loaded = current_rss_mb()
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    peak = peak_rss_mb()
    return {"library": library, "median_ms": statistics.median(times), "min_ms": min(times),
            "peak_mib": peak, "loaded_mib": rss_loaded, "train_mib": peak - rss_loaded,
            "trainable": sum(p.numel() for p in params), "steps": steps}


def run_subprocess(library: str, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--one", library, "--steps", str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{library} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Median over rounds of each metric, per library."""
    summary = {}
    for library in LIBRARIES:
        mine = [r for r in runs if r["library"] == library]
        summary[library] = {key: statistics.median(r[key] for r in mine)
                            for key in ("median_ms", "peak_mib", "loaded_mib", "train_mib")}
        summary[library]["trainable"] = mine[0]["trainable"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs adapterkit then peft (default 3)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run, after 3 warmup steps (default 5)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every run and the summary here")
    parser.add_argument("--one", choices=LIBRARIES, help=argparse.SUPPRESS)  # internal: one measuring subprocess
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one, args.steps)), flush=True)
        return

    runs = []
    print(f"{'round':>5} {'library':<11} {'ms/step':>8} {'peak MiB':>9} {'loaded MiB':>11} {'train MiB':>10}")
    for rnd in range(args.rounds):
        for library in LIBRARIES:
            r = run_subprocess(library, args.steps)
            r["round"] = rnd
            runs.append(r)
            print(f"{rnd:>5} {library:<11} {r['median_ms']:>8.1f} {r['peak_mib']:>9.0f} {r['loaded_mib']:>11.0f} "
                  f"{r['train_mib']:>10.0f}", flush=True)

    summary = summarize(runs)
    print(f"\nMiniLM-L6 seq. classification, batch {BATCH} x {SEQ_LEN}, LoRA r=8 q/v + head, AdamW; "
          f"median of {args.steps} steps per run, median of {args.rounds} rounds")
    print(f"{'library':<11} {'ms/step':>8} {'peak MiB':>9} {'train MiB':>10} {'trainable':>10}")
    for library, s in summary.items():
        print(f"{library:<11} {s['median_ms']:>8.1f} {s['peak_mib']:>9.0f} {s['train_mib']:>10.0f} "
              f"{s['trainable']:>10,}")
    ak, pf = summary["adapterkit"], summary["peft"]
    ratios = {key: ak[key] / pf[key] for key in ("median_ms", "peak_mib", "train_mib")}
    print(f"{'ak / peft':<11} {ratios['median_ms']:>8.2f} {ratios['peak_mib']:>9.2f} {ratios['train_mib']:>10.2f}")
    if args.json:
        config = {"batch": BATCH, "seq_len": SEQ_LEN, "warmup": WARMUP, "steps": args.steps, "rounds": args.rounds,
                  "r": 8, "alpha": 16, "targets": ["query", "value"], "lr": 5e-4, "threads": 2}
        Path(args.json).write_text(json.dumps({"config": config, "runs": runs, "summary": summary,
                                               "ratio_adapterkit_over_peft": ratios}, indent=1))


if __name__ == "__main__":
    main()
