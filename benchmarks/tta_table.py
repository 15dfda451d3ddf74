"""Test-time adaptation on corrupted digits: no adaptation, BN adaptation, Tent, ViDA and the neuro-modulated
Hebbian method (NHL) on one continual stream, 2 seeds; accuracy per domain and per round, and the cost per batch.

Source model (one per seed): EfficientNet-Lite0 with its ImageNet weights, a fresh 10-way head and a LoRA (r=8) on
the 31 pointwise convolutions, trained on the 1,437 clean training digits (``--size`` 32 px, ``--epochs`` 10 epochs,
batch 32, AdamW lr 2e-3, BatchNorm in training mode: the source's normalisation statistics are the digits', as a
source model trained the usual way has them). The LoRA is then merged into the weights and detached, and each
BatchNorm's running statistics are set to the exact population statistics of the clean training digits ("precise
BN": one pass with a cumulative average), so the source model is a plain model that normalises like its source
domain. Its clean test accuracy is reported.

Stream: the 360 test digits under four corruptions (Gaussian noise, blur, contrast, pixelation: benchmarks/vision.py)
at severities ``--severities`` (increasing), every corruption at each severity in turn, the whole sequence seen
``--rounds`` times, batches of 32
in a fixed order. ``--reset never`` is continual TTA (the method carries its state across domains and rounds, ViDA's
setting); ``--reset per_domain`` returns to the source model at the start of every domain (Tent's and NHL's papers
adapt to one corruption at a time). Labels never reach a method (adapterkit.train.tta keeps them apart and scores
each domain after its predictions are made). Each seed draws its own source model, its own corruption noise and its
own method randomness.

Methods and settings (chosen before the runs from the papers' CIFAR settings, scaled to a stream of ~12 batches per
domain; nothing tuned on this stream):
- ``source``: the source model as it is; ``bn``: the same with each test batch's BatchNorm statistics (Schneider et
  al. 2020), the norm every adapting method below uses.
- ``tent``: entropy minimisation of the BatchNorm affine parameters, Adam lr 1e-3 (Tent's CIFAR-10-C setting).
- ``vida``: LoRA r=1 and r=128 on the pointwise convolutions, homeostatic scales from 10 augmented views (the
  paper's N), Adam lr 1e-4, teacher EMA 0.99 (the paper's 0.999 is for streams of ~10k batches; 0.99 gives the
  teacher a time constant of 100 batches, under one round here). No source warm-up of the adapters (the reference
  ships warmed-up ones).
- ``nhl``: soft Hebbian learning of the stem convolution (eta 1e-3, tau 1) and a conv-bottleneck neuro-modulator
  after the stem's BatchNorm trained by entropy (Adam lr 1e-3); ``nhl_source``: the same with the stored BatchNorm
  statistics, which isolates what the Hebbian and modulator updates add to no adaptation.

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python tta_table.py run --method vida --seed 0
    OMP_NUM_THREADS=1 PYTHONPATH=../src:. python tta_table.py table     # the tables and benchmarks/tta_*.png

Each run saves a resumable state after every domain (runs/tta/<method>-<seed>/) and appends one line to
results/tta.jsonl when done; a run already there is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

import _common  # noqa: F401  (offline hub)

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "tta.jsonl"
RUNS = HERE.parent / "runs" / "tta"
METHODS = ("source", "bn", "tent", "vida", "nhl", "nhl_source")


def source_model(seed: int, size: int, epochs: int) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The seed's source model (trained once, then cached under runs/tta/) and its record."""
    import adapterkit as ak
    from adapterkit.models.efficientnet_lite import POINTWISE, load_efficientnet_lite0
    from vision import digits

    cache = RUNS / f"source-{seed}-{size}px-{epochs}ep.pt"
    model = load_efficientnet_lite0(num_classes=10)
    split = digits(size)
    if cache.exists():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["state"])
        return model.eval(), saved["record"]
    torch.manual_seed(seed)
    model._fc.reset_parameters()  # the head from the seed
    ak.attach(model, "source", ak.LoRA(r=8, alpha=8.0), POINTWISE)
    ak.train_only(model, "source")
    for param in model._fc.parameters():
        param.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    order = torch.Generator().manual_seed(seed)
    began = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(split.y_train), generator=order).split(32):
            loss = torch.nn.functional.cross_entropy(model(split.x_train[rows]), split.y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    ak.merge(model, "source")
    ak.detach(model, "source", keep_merged=True)
    precise_bn(model, split.x_train)
    with torch.no_grad():
        clean = float((model(split.x_test).argmax(-1) == split.y_test).float().mean()) * 100
    record = {"clean_test_accuracy": round(clean, 2), "train_seconds": round(time.perf_counter() - began, 1),
              "size": size, "epochs": epochs}
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state": model.state_dict(), "record": record}, cache)
    return model, record


@torch.no_grad()
def precise_bn(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> None:
    """Every BatchNorm's running mean / variance := the cumulative average over ``images`` (in batches)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
        m.train()
    for rows in images.split(batch):
        model.features(rows)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
        m.eval()


def build_method(name: str) -> Any:
    from adapterkit.methods.lora import LoRA
    from adapterkit.models.efficientnet_lite import POINTWISE
    from adapterkit.train import tta

    if name == "source":
        return tta.Source(norm="source")
    if name == "bn":
        return tta.Source(norm="batch")
    if name == "tent":
        return tta.Tent(lr=1e-3)
    if name == "vida":
        return tta.ViDA(POINTWISE, high=LoRA(r=128, alpha=128.0, init="gaussian"), lr=1e-4, ema=0.99,
                        augmentations=10)
    if name == "nhl":
        return tta.Hebbian("_conv_stem", ["_bn0"], eta=1e-3, lr=1e-3)
    if name == "nhl_source":  # the ablation: NHL's own updates without the test batches' BatchNorm statistics
        return tta.Hebbian("_conv_stem", ["_bn0"], eta=1e-3, lr=1e-3, norm="source")
    raise SystemExit(f"--method {name!r}: use one of {', '.join(METHODS)}")


def stream_for(seed: int, size: int, severities: tuple[int, ...], rounds: int) -> tuple[Any, dict[str, Any]]:
    from adapterkit.train import tta
    from adapterkit.train.continual.stream import Examples
    from vision import corruption_domains, digits

    split = digits(size)
    domains = corruption_domains(split.x_test, split.y_test, severities=severities, seed=seed)
    return tta.TestStream.from_labelled([(name, Examples(x, y)) for name, x, y in domains], batch_size=32,
                                        rounds=rounds)


def done() -> set[tuple[str, int, str, int]]:
    if not RESULTS.exists():
        return set()
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["method"], r["seed"], r.get("reset", "never"), r["rounds"]) for r in rows}


def run(args: argparse.Namespace) -> None:
    from adapterkit.train import tta

    label = f"{args.method} seed {args.seed} reset {args.reset} rounds {args.rounds}"
    if (args.method, args.seed, args.reset, args.rounds) in done():
        print(f"{label}: already in {RESULTS.name}", file=sys.stderr)
        return
    torch.set_num_threads(1)
    model, source = source_model(args.seed, args.size, args.epochs)
    stream, labels = stream_for(args.seed, args.size, tuple(args.severities), args.rounds)
    method = build_method(args.method)
    began = time.perf_counter()
    folder = RUNS / (f"{args.method}-{args.seed}" + ("" if args.reset == "never" else f"-{args.reset}")
                     + ("" if args.rounds == 5 else f"-{args.rounds}rounds"))
    result = tta.run_tta(method, model, stream, labels, reset=args.reset, out=folder, resume=True, seed=args.seed)
    row = {"method": args.method, "seed": args.seed, "reset": args.reset, "source": source,
           "severities": list(args.severities), "rounds": args.rounds, "steps": result.steps,
           "seconds_per_batch": result.seconds_per_batch(), "wall_seconds": round(time.perf_counter() - began, 1),
           "date": time.strftime("%Y-%m-%d")}
    with RESULTS.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(f"{label}: mean accuracy {result.mean_accuracy():.1f} "
          f"(source clean {source['clean_test_accuracy']})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one method on one seed's stream (resumable)")
    one.add_argument("--method", choices=METHODS, required=True)
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--size", type=int, default=32, help="input size in pixels (default 32)")
    one.add_argument("--epochs", type=int, default=10, help="source training epochs (default 10)")
    one.add_argument("--severities", type=int, nargs="+", default=[1, 3, 5])
    one.add_argument("--rounds", type=int, default=5)
    one.add_argument("--reset", choices=("never", "per_domain"), default="never",
                     help="never: continual TTA (default); per_domain: back to the source at every domain")
    sub.add_parser("table", help="print the tables from results/tta.jsonl and draw the plots")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
    else:
        from tta_report import report

        report(RESULTS, HERE)


if __name__ == "__main__":
    main()
