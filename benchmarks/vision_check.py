"""EfficientNet-Lite0 on the digits: training-step time by input size and a quick accuracy check, to choose the input
size of the class-incremental digits stream (it must stay fast on a 2-core CPU).

Setups, each on the ImageNet backbone (frozen) with a fresh 10-class ``_fc`` that trains:
  head   only the new head (a linear probe; the backbone still runs forward and backward stops at the head)
  lora   LoRA r=8 (alpha 16) on the 31 pointwise convolutions (``_expand_conv``, ``_project_conv``)
  convbn sequential conv bottleneck (reduction 4, ReLU, zero-init Up) on every block's ``_bn2`` (the BatchNorm after
         the project conv, before the residual)
The model stays in eval mode while it trains: BatchNorm keeps its ImageNet statistics (a frozen backbone's running
statistics would otherwise drift to the digits' batches and its affine parameters are frozen anyway) and dropout is
off. Step = forward + backward + AdamW step on a batch of 32; the median of ``--steps`` timed steps after 2 warm-up
steps. Accuracy: ``--epochs`` epochs over the 1,437 training digits (batch 32, shuffled, AdamW lr 2e-3), then the 360
test digits. Run single-threaded for the numbers a 2-core CPU shared by two jobs gives:

    OMP_NUM_THREADS=1 python benchmarks/vision_check.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import _common  # noqa: F401  (offline hub)
import adapterkit as ak
from adapterkit.methods.conv_bottleneck import SeqConvBottleneck
from adapterkit.models.efficientnet_lite import POINTWISE, EfficientNetLite0, load_efficientnet_lite0
from vision import digits

SETUPS = ("head", "lora", "convbn")


def build(setup: str, seed: int = 0) -> tuple[EfficientNetLite0, list[torch.nn.Parameter]]:
    """The model with ``setup``'s adapter attached and only it (and ``_fc``) trainable; eval mode."""
    torch.manual_seed(seed)
    model = load_efficientnet_lite0(num_classes=10)
    if setup == "head":
        for param in model.parameters():
            param.requires_grad_(param is model._fc.weight or param is model._fc.bias)
    else:
        spec = ak.LoRA(r=8, alpha=16) if setup == "lora" else SeqConvBottleneck(reduction_factor=4)
        ak.attach(model, setup, spec, POINTWISE if setup == "lora" else ["_bn2"])
        ak.train_only(model, setup, also=["_fc"])
    model.eval()  # BatchNorm frozen at its ImageNet statistics, dropout off
    return model, [p for p in model.parameters() if p.requires_grad]


def step_time(setup: str, size: int, steps: int, batch: int = 32) -> dict[str, Any]:
    model, params = build(setup)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    x = torch.rand(batch, 3, size, size) * 2 - 1
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    forwards = []
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            model(x)
            forwards.append(time.perf_counter() - start)
    forward = statistics.median(forwards)
    return {"setup": setup, "size": size, "batch": batch, "step_s": statistics.median(times),
            "forward_s": forward, "trainable": sum(p.numel() for p in params)}


def accuracy(setup: str, size: int, epochs: int, lr: float = 2e-3, batch: int = 32) -> dict[str, Any]:
    data = digits(size)
    model, params = build(setup)
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for i in range(0, len(order), batch):
            rows = order[i : i + batch]
            loss = F.cross_entropy(model(data.x_train[rows]), data.y_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    train_s = time.perf_counter() - start
    with torch.no_grad():
        predicted = torch.cat([model(data.x_test[i : i + 128]).argmax(-1) for i in range(0, len(data.y_test), 128)])
    per_epoch = len(losses) // epochs
    return {"setup": setup, "size": size, "epochs": epochs, "lr": lr,
            "test_acc": (predicted == data.y_test).float().mean().item(), "train_s": train_s,
            "last_epoch_loss": statistics.mean(losses[-per_epoch:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128])
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--acc", nargs="*", default=["lora:32", "lora:64", "lora:96", "head:64", "convbn:64"],
                        help="setup:size pairs for the accuracy check")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "vision_check.json")
    args = parser.parse_args()
    print(f"threads {torch.get_num_threads()}")
    timings = []
    for size in args.sizes:
        for setup in args.setups:
            row = step_time(setup, size, args.steps)
            timings.append(row)
            print(f"step  {setup:<7} size {size:>3}  batch 32: {row['step_s'] * 1000:7.0f} ms/step, forward "
                  f"{row['forward_s'] * 1000:6.0f} ms  ({row['trainable']:,} trainable)", flush=True)
    accuracies = []
    for pair in args.acc:
        setup, size = pair.split(":")
        row = accuracy(setup, int(size), args.epochs)
        accuracies.append(row)
        print(f"acc   {setup:<7} size {size:>3}  {args.epochs} epochs: test accuracy {row['test_acc']:.4f} "
              f"(last-epoch loss {row['last_epoch_loss']:.3f}, {row['train_s']:.0f} s training)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "timings": timings,
                                    "accuracy": accuracies}, indent=1) + "\n")


if __name__ == "__main__":
    main()
