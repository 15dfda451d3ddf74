"""Combining LoRAs: wall time and peak memory of ``ak.combine`` vs peft's ``add_weighted_adapter`` on the CPU.

Setup: a random Llama with TinyLlama-1.1B's layer sizes (hidden 2048, intermediate 5632, 32 heads / 4 kv heads,
vocabulary cut to 256: the embeddings are not adapted) but only ``--layers`` decoder layers (default 1), so a run
fits a small time budget; the work of a combination is per adapted module, so its time grows linearly with the
number of layers (TinyLlama has 22). ``--adapters`` LoRAs (default 16) of rank 16, alpha 32, on all seven
projections (q/k/v/o, gate/up/down), random factors (seed 0), are written once in peft's format (adapterkit's
``export_peft``); both libraries load the same folders, adapterkit through ``import_peft``, peft through
``PeftModel.from_pretrained`` + ``load_adapter``. Timed: the one combining call, all adapters with weight
1 / adapters:

    svd     rank 16 (adapterkit: how="svd", rank=16; peft: combination_type="svd", svd_rank=16)
    ties    density 0.5, majority sign "total" (factor-level TIES, as peft defines it)

Each measurement runs in its own subprocess (peak RSS from ``ru_maxrss`` belongs to that one call and its setup),
alternating adapterkit, peft per type for ``--rounds`` rounds, with ``torch.set_num_threads(1)``. Columns:

    seconds     wall time of the combining call (time.perf_counter)
    peak MiB    peak RSS of the whole process (imports, model, sources, the call)
    call MiB    peak RSS minus the RSS just before the call: what combining itself adds

    python benchmarks/combine_speed.py                                   # 1 layer, 1 round: about 1-2 min
    python benchmarks/combine_speed.py --layers 2 --rounds 3 --json benchmarks/results/combine_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import current_rss_mb, peak_rss_mb  # noqa: E402

LIBRARIES = ("adapterkit", "peft")
HOWS = ("svd", "ties")
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, SVD_RANK, DENSITY = 16, 32, 16, 0.5



def base_model(layers: int):
    """The random Llama (seed 0): the same weights in every process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def write_sources(folder: Path, layers: int, count: int) -> list[Path]:
    """``count`` random LoRAs in peft's format under ``folder`` (written once, read by every measurement)."""
    import torch

    import adapterkit as ak
    from adapterkit.inject.engine import placements
    from adapterkit.interop.peft_format import export_peft

    model = base_model(layers)
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        name = f"s{i}"
        ak.attach(model, name, ak.LoRA(r=RANK, alpha=ALPHA), PROJECTIONS)
        with torch.no_grad():  # B starts at zero: give every factor random values so the deltas are full rank-16
            for _, _, host in placements(model, name):
                for param in host.adapter(name).parameters():
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        out.append(export_peft(model, name, folder / name))
        ak.detach(model, name)
    return out


def one_run(library: str, how: str, layers: int, sources: list[str]) -> dict:
    """Load the sources, time one combining call; runs inside the measuring subprocess."""
    import torch

    torch.set_num_threads(1)
    model = base_model(layers)
    names = [Path(s).name for s in sources]
    weights = [1.0 / len(names)] * len(names)
    if library == "adapterkit":
        import adapterkit as ak
        from adapterkit.interop.peft_format import import_peft

        for name, folder in zip(names, sources, strict=True):
            import_peft(model, folder, name)
        options = {"rank": SVD_RANK} if how == "svd" else {"density": DENSITY}

        def call() -> None:
            ak.combine(model, names, weights, how, "mix", **options)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, sources[0], adapter_name=names[0])
        for name, folder in zip(names[1:], sources[1:], strict=True):
            model.load_adapter(folder, adapter_name=name)
        options = {"svd_rank": SVD_RANK} if how == "svd" else {"density": DENSITY}

        def call() -> None:
            model.add_weighted_adapter(names, weights, "mix", combination_type=how, **options)
    rss_before = current_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        call()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {"library": library, "how": how, "seconds": seconds, "peak_mib": peak, "before_mib": rss_before,
            "call_mib": peak - rss_before}


def run_subprocess(library: str, how: str, layers: int, sources: list[Path]) -> dict:
    cmd = [sys.executable, __file__, "--one", library, "--how", how, "--layers", str(layers),
           "--sources", *map(str, sources)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{library} {how} run failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1, help="decoder layers of the 1.1B-shaped Llama (default 1)")
    parser.add_argument("--adapters", type=int, default=16, help="LoRAs to combine (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs adapterkit then peft per type")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every run and the summary here")
    parser.add_argument("--note", default="", help="what else ran on the machine, kept in the JSON")
    parser.add_argument("--one", choices=LIBRARIES, help=argparse.SUPPRESS)  # internal: one measuring subprocess
    parser.add_argument("--how", choices=HOWS, help=argparse.SUPPRESS)
    parser.add_argument("--sources", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one, args.how, args.layers, args.sources)), flush=True)
        return

    import torch

    torch.set_num_threads(1)
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = write_sources(Path(tmp), args.layers, args.adapters)
        print(f"{'round':>5} {'how':<5} {'library':<11} {'seconds':>8} {'peak MiB':>9} {'call MiB':>9}")
        for rnd in range(args.rounds):
            for how in HOWS:
                for library in LIBRARIES:
                    r = run_subprocess(library, how, args.layers, sources)
                    r["round"] = rnd
                    runs.append(r)
                    print(f"{rnd:>5} {how:<5} {library:<11} {r['seconds']:>8.2f} {r['peak_mib']:>9.0f} "
                          f"{r['call_mib']:>9.0f}", flush=True)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    ratios: dict[str, dict[str, float]] = {}
    print(f"\n{args.adapters} LoRAs r={RANK} on 7 projections x {args.layers} layer(s) of a 1.1B-shaped Llama, "
          f"CPU, 1 thread; median of {args.rounds} round(s)")
    print(f"{'how':<5} {'library':<11} {'seconds':>8} {'peak MiB':>9} {'call MiB':>9}")
    for how in HOWS:
        summary[how] = {lib: {key: statistics.median(r[key] for r in runs if r["library"] == lib and r["how"] == how)
                              for key in ("seconds", "peak_mib", "call_mib")} for lib in LIBRARIES}
        for lib in LIBRARIES:
            s = summary[how][lib]
            print(f"{how:<5} {lib:<11} {s['seconds']:>8.2f} {s['peak_mib']:>9.0f} {s['call_mib']:>9.0f}")
        ak, pf = summary[how]["adapterkit"], summary[how]["peft"]
        ratios[how] = {key: ak[key] / pf[key] if pf[key] else float("nan") for key in ("seconds", "peak_mib",
                                                                                       "call_mib")}
        print(f"{how:<5} {'ak / peft':<11} {ratios[how]['seconds']:>8.2f} {ratios[how]['peak_mib']:>9.2f} "
              f"{ratios[how]['call_mib']:>9.2f}")
    if args.json:
        config = {"layers": args.layers, "adapters": args.adapters, "rounds": args.rounds, "r": RANK,
                  "alpha": ALPHA, "svd_rank": SVD_RANK, "density": DENSITY, "targets": PROJECTIONS, "threads": 1,
                  "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                  "date": started, "load": args.note}
        Path(args.json).write_text(json.dumps({"config": config, "runs": runs, "summary": summary,
                                               "ratio_adapterkit_over_peft": ratios}, indent=1) + "\n")


if __name__ == "__main__":
    main()
