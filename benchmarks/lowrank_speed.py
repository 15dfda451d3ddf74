"""Training step and inference time of the low-rank methods on all-MiniLM-L6-v2, against LoRA, the base model and
peft's implementation of the same method, in one process.

Every method adapts query/value at rank 8 where it has a rank (SNNK: its default targets, output.dense):

    lora      LoRA(r=8, alpha=16)                         peft LoraConfig(r=8, lora_alpha=16); the reference row
    pissa     LoRA(r=8, alpha=16, init="pissa")           peft LoraConfig(..., init_lora_weights="pissa")
    vera      VeRA(r=8)                                   peft VeraConfig(r=8)
    loha      LoHa(r=8, alpha=8)                          peft LoHaConfig(r=8, alpha=8)
    lokr      LoKr(r=8, alpha=8)                          peft LoKrConfig(r=8, alpha=8)
    oft       OFT(block_size=32), exact Cayley            peft OFTConfig(oft_block_size=32, use_cayley_neumann=False)
                                                          (peft's default is its Neumann series: not what ours does)
    hydra     Hydra(r_par=4, r_seq=4): total rank 8       (no peft form)
    snnk      SNNK() on output.dense, 64 random features  (no peft form)
    adalora   adapterkit.methods.adalora.AdaLoRA, rank 8  peft AdaLoraConfig(init_r=8, target_r=8, total_step=1000)
    corda     LoRA(r=8, alpha=16, init="corda_ipm"), calibrated on the benchmark batch (no peft row: peft's CorDA
              is its LoRA once initialised)

A row whose method is missing or fails to build (AdaLoRA, CorDA are new) is skipped with the reason printed.
Each model is a copy of one base model (seed 0) with the same classifier head; the head trains beside the adapter
(adapterkit ``train_only(also=["classifier"])``, peft ``modules_to_save``). Every adapter tensor gets small random
noise, so no adapter is the identity, and peft's copy gets exactly ours where the tensors have a known peft name
(not AdaLoRA); the max |logit difference| of each pair is printed as a check. Merged: a copy of our adapted model after
``ak.merge`` (n/a where the method cannot merge: SNNK), against the base model's time and the unmerged output.

One fixed batch (``--batch`` x ``--length`` random token ids, seed 0, mask all ones, random labels). A training step
is zero_grad + forward (train mode, so dropout runs) + loss + backward + AdamW (lr 1e-4) on the trainable
parameters; inference is one eval-mode forward under ``torch.inference_mode()``. peft's AdaLoRA adds its orthogonal
regulariser to the loss inside its forward; the rank-budget update (``update_and_allocate``) is in neither step.
Each round times every variant once, training steps then inference, with the order rotated from round to round,
so slow drifts and background load hit all variants alike; after ``--warmup`` rounds, medians over ``--rounds``.
``torch.set_num_threads(--threads)``.

    OMP_NUM_THREADS=1 python benchmarks/lowrank_speed.py          # 32 x 64, 10 rounds: about 6 min, idle, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/lowrank_speed.py --batch 4 --length 16 --rounds 2 --only vera oft
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib
import json
import os
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import minilm_dir, peak_rss_mb  # noqa: E402

METHODS = ("lora", "pissa", "vera", "loha", "lokr", "oft", "hydra", "snnk", "adalora", "corda")
R, LORA_ALPHA, KRON_ALPHA, BLOCK = 8, 16, 8, 32
TARGETS = ["query", "value"]
SNNK_TARGETS = ["output.dense"]
NEW = ("adalora", "corda")  # being written: a failure to build skips the row instead of stopping the run
NOISE = 0.05  # std of the random noise added to every adapter tensor
LORA_NAMES = {"lora_a": "lora_A.weight", "lora_b": "lora_B.weight"}  # ours -> peft's saved-name suffix


class Skip(Exception):
    """A method that cannot run here: the message says why."""


def adalora_spec() -> Any:
    """Our AdaLoRA at rank 8, built from whatever rank fields its spec has (it is new)."""
    try:
        cls = importlib.import_module("adapterkit.methods.adalora").AdaLoRA
    except (ImportError, AttributeError) as exc:
        raise Skip(f"adapterkit.methods.adalora.AdaLoRA not available ({exc})") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {key: R for key in ("init_r", "r", "target_r") if key in fields}
    if "total_step" in fields:
        kwargs["total_step"] = 1000
    for attempt in (kwargs, {k: v for k, v in kwargs.items() if k != "target_r"}):
        try:
            return cls(**attempt)
        except Exception as exc:  # noqa: BLE001 - any refusal of the spec skips the row, with its message
            reason = str(exc)
    raise Skip(f"AdaLoRA({kwargs}) refused: {reason}")


def ak_spec(method: str) -> tuple[Any, list[str]]:
    """(our spec, targets) of a method."""
    import adapterkit as ak
    from adapterkit.methods.hydra import Hydra
    from adapterkit.methods.loha import LoHa
    from adapterkit.methods.lokr import LoKr
    from adapterkit.methods.oft import OFT
    from adapterkit.methods.snnk import SNNK
    from adapterkit.methods.vera import VeRA

    if method == "adalora":
        return adalora_spec(), TARGETS
    if method == "corda":
        try:
            return ak.LoRA(r=R, alpha=LORA_ALPHA, init="corda_ipm"), TARGETS
        except ak.SpecError as exc:
            raise Skip(f"LoRA rejects init='corda_ipm': {exc}") from None
    specs = {"lora": ak.LoRA(r=R, alpha=LORA_ALPHA), "pissa": ak.LoRA(r=R, alpha=LORA_ALPHA, init="pissa"),
             "vera": VeRA(r=R), "loha": LoHa(r=R, alpha=KRON_ALPHA), "lokr": LoKr(r=R, alpha=KRON_ALPHA),
             "oft": OFT(block_size=BLOCK), "hydra": Hydra(r_par=R // 2, r_seq=R // 2), "snnk": SNNK()}
    return specs[method], SNNK_TARGETS if method == "snnk" else TARGETS


def peft_config(method: str) -> Any | None:
    """peft's config of the same method (classifier head saved and trained), or None if peft has none."""
    import peft

    common = {"target_modules": TARGETS, "modules_to_save": ["classifier"]}
    if method in ("lora", "pissa"):
        return peft.LoraConfig(r=R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                               init_lora_weights="pissa" if method == "pissa" else True, **common)
    if method == "vera":
        return peft.VeraConfig(r=R, **common)
    if method == "loha":
        return peft.LoHaConfig(r=R, alpha=KRON_ALPHA, **common)
    if method == "lokr":
        return peft.LoKrConfig(r=R, alpha=KRON_ALPHA, **common)
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=BLOCK, use_cayley_neumann=False, **common)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=R, target_r=R, lora_alpha=LORA_ALPHA, total_step=1000, **common)
    return None


def build_ak(base: Any, method: str, batch: dict) -> Any:
    """A copy of ``base`` with our adapter (named after the method), noised, head trainable."""
    import torch

    import adapterkit as ak
    from adapterkit.inject.engine import placements

    spec, targets = ak_spec(method)
    model = copy.deepcopy(base)
    if method == "corda":
        try:
            from adapterkit.train.calibrate import calibrate_corda
        except ImportError as exc:
            raise Skip(f"adapterkit.train.calibrate not available ({exc})") from None
        calibrate_corda(model, [batch], targets, progress=False)
    ak.attach(model, method, spec, targets)
    ak.train_only(model, method, also=["classifier"])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, host in placements(model, method):
            for param in host.adapter(method).parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator) * NOISE)
    return model


def build_peft(base: Any, method: str, ours: Any) -> Any | None:
    """peft's model of the method, with our adapter tensors copied in where their peft names are known."""
    import torch
    from peft import get_peft_model

    from adapterkit.inject.engine import placements
    from adapterkit.interop.peft_tuners import NAMES

    config = peft_config(method)
    if config is None:
        return None
    model = get_peft_model(copy.deepcopy(base), config)
    names = LORA_NAMES if method in ("lora", "pissa") else NAMES.get(method, (None, None))[1]
    if names is None:
        return model  # AdaLoRA: peft's own init, no name map
    with torch.no_grad():
        for path, _, host in placements(ours, method):
            layer = model.base_model.model.get_submodule(path)
            for pname, param in host.adapter(method).named_parameters():
                head, _, tail = names[pname].partition(".")
                layer.get_parameter(f"{head}.default" + (f".{tail}" if tail else "")).copy_(param)
    return model


def build_merged(ours: Any, method: str) -> tuple[Any | None, str]:
    """(a merged copy of our model, "") or (None, why it cannot merge)."""
    import adapterkit as ak

    merged = copy.deepcopy(ours)
    try:
        ak.merge(merged, method)
    except ak.AdapterKitError as exc:
        return None, str(exc)
    return merged, ""


def logits(model: Any, batch: dict) -> Any:
    import torch

    model.eval()
    with torch.inference_mode():
        return model(**batch).logits.float()


def trainable(model: Any) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def timed_rounds(train: dict, infer: dict, batch: dict, labels: Any, warmup: int, rounds: int
                 ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per variant, the ms of each timed round: training steps, then inference, order rotated per round."""
    import torch

    optimizers = {key: torch.optim.AdamW(trainable(model), lr=1e-4) for key, model in train.items()}
    step_ms: dict[str, list[float]] = {key: [] for key in train}
    infer_ms: dict[str, list[float]] = {key: [] for key in infer}
    for rnd in range(warmup + rounds):
        for variants, into in ((list(train), step_ms), (list(infer), infer_ms)):
            shift = rnd % len(variants)
            for key in variants[shift:] + variants[:shift]:
                if into is step_ms:
                    model, optimizer = train[key], optimizers[key]
                    model.train()
                    start = time.perf_counter()
                    optimizer.zero_grad(set_to_none=True)
                    model(**batch, labels=labels).loss.backward()
                    optimizer.step()
                else:
                    model = infer[key]
                    model.eval()
                    start = time.perf_counter()
                    with torch.inference_mode():
                        model(**batch)
                if rnd >= warmup:
                    into[key].append((time.perf_counter() - start) * 1000)
        if rnd >= warmup:
            print(f"round {rnd - warmup + 1}/{rounds} done", flush=True)
    return step_ms, infer_ms


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="sequences per batch (default 32)")
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds over all variants (default 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--only", nargs="+", choices=METHODS, metavar="METHOD",
                        help=f"methods to run, of {', '.join(METHODS)} (LoRA, the reference, always runs)")
    parser.add_argument("--json", metavar="PATH", default="benchmarks/results/lowrank_speed.json",
                        help="where to write every timing and the summary (default %(default)s)")
    parser.add_argument("--note", default="", help="what else ran on the machine, kept in the JSON")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    torch.set_num_threads(args.threads)
    logging.set_verbosity_error()  # the "newly initialized head" notice is expected
    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    methods = [m for m in METHODS if m == "lora" or args.only is None or m in args.only]
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2).eval()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, base.config.vocab_size, (args.batch, args.length), generator=gen)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    labels = torch.randint(0, 2, (args.batch,), generator=gen)

    train: dict[str, Any] = {}
    infer: dict[str, Any] = {"base": base}
    skipped: dict[str, str] = {}
    no_merge: dict[str, str] = {}
    checks: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    base_logits = logits(base, batch)
    for method in methods:
        try:
            ours = build_ak(base, method, batch)
        except Exception as exc:  # noqa: BLE001 - the new methods may be absent or half-written: skip their row
            if not isinstance(exc, Skip) and method not in NEW:
                raise
            skipped[method] = str(exc) if isinstance(exc, Skip) else f"{type(exc).__name__}: {exc}"
            print(f"skip {method}: {skipped[method]}", flush=True)
            continue
        train[f"ak:{method}"] = infer[f"ak:{method}"] = ours
        out = logits(ours, batch)
        check = {"vs_base": (out - base_logits).abs().max().item()}
        theirs = build_peft(base, method, ours)
        if theirs is not None:
            train[f"peft:{method}"] = infer[f"peft:{method}"] = theirs
            check["peft_vs_ak"] = (logits(theirs, batch) - out).abs().max().item()
            counts[f"peft:{method}"] = sum(p.numel() for p in trainable(theirs))
        merged, why = build_merged(ours, method)
        if merged is None:
            no_merge[method] = why
        else:
            infer[f"merged:{method}"] = merged
            check["merged_vs_unmerged"] = (logits(merged, batch) - out).abs().max().item()
        counts[f"ak:{method}"] = sum(p.numel() for p in trainable(ours))
        checks[method] = check
        print(f"built {method}: max |logit diff| " + ", ".join(f"{k} {v:.2e}" for k, v in check.items()), flush=True)

    step_ms, infer_ms = timed_rounds(train, infer, batch, labels, args.warmup, args.rounds)
    step = {k: statistics.median(v) for k, v in step_ms.items()}
    inf = {k: statistics.median(v) for k, v in infer_ms.items()}
    rows = {}
    for method in checks:
        ak_key, pf_key, m_key = f"ak:{method}", f"peft:{method}", f"merged:{method}"
        rows[method] = {
            "trainable": counts[ak_key], "peft_trainable": counts.get(pf_key),
            "step_ms": step[ak_key], "step_vs_lora": ratio(step[ak_key], step["ak:lora"]),
            "peft_step_ms": step.get(pf_key), "step_vs_peft": ratio(step[ak_key], step.get(pf_key)),
            "infer_ms": inf[ak_key], "infer_vs_lora": ratio(inf[ak_key], inf["ak:lora"]),
            "infer_vs_base": ratio(inf[ak_key], inf["base"]),
            "peft_infer_ms": inf.get(pf_key), "infer_vs_peft": ratio(inf[ak_key], inf.get(pf_key)),
            "merged_ms": inf.get(m_key), "merged_vs_base": ratio(inf.get(m_key), inf["base"]),
            "merged_max_abs_diff": checks[method].get("merged_vs_unmerged"),
            "peft_max_abs_diff": checks[method].get("peft_vs_ak")}

    print(f"\nMiniLM-L6 seq. classification, batch {args.batch} x {args.length}, {args.threads} thread(s); median of "
          f"{args.rounds} interleaved rounds; base model inference {inf['base']:.1f} ms. Rank 8 on query/value "
          "(Hydra 4 + 4; OFT blocks of 32; SNNK on output.dense, its default); trainable includes the 770-parameter "
          "head; ratios are adapterkit / the named one.\n")
    print("| method | trainable params | step ms | step vs LoRA | step vs peft | infer ms | infer vs LoRA | "
          "infer vs base | infer vs peft | merged vs base | merged max\\|diff\\| |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for method, r in rows.items():
        merged_diff = "n/a" if method in no_merge else fmt(r["merged_max_abs_diff"], ".1e")
        merged_vs = "n/a" if method in no_merge else fmt(r["merged_vs_base"], ".2f")
        print(f"| {method} | {r['trainable']:,} | {r['step_ms']:.1f} | {fmt(r['step_vs_lora'], '.2f')} | "
              f"{fmt(r['step_vs_peft'], '.2f')} | {r['infer_ms']:.1f} | {fmt(r['infer_vs_lora'], '.2f')} | "
              f"{fmt(r['infer_vs_base'], '.2f')} | {fmt(r['infer_vs_peft'], '.2f')} | {merged_vs} | {merged_diff} |")
    print("\npeft: " + "; ".join(f"{m} step {r['peft_step_ms']:.1f} ms, infer {r['peft_infer_ms']:.1f} ms, "
                                 f"max |logit - ours| {fmt(r['peft_max_abs_diff'], '.1e')}"
                                 for m, r in rows.items() if r["peft_step_ms"] is not None))
    for method, why in {**skipped, **{m: f"not merged: {w}" for m, w in no_merge.items()}}.items():
        print(f"{method}: {why}")
    peak = peak_rss_mb()
    print(f"peak RSS {peak:.0f} MiB")
    if args.json:
        config = {"batch": args.batch, "length": args.length, "rounds": args.rounds, "warmup": args.warmup,
                  "threads": args.threads, "r": R, "targets": TARGETS, "snnk_targets": SNNK_TARGETS,
                  "oft_block_size": BLOCK, "noise": NOISE, "lr": 1e-4, "methods": methods,
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                  "date": started, "load": args.note, "peak_rss_mib": peak}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": config, "rows": rows, "base_infer_ms": inf["base"],
                                               "skipped": skipped, "not_mergeable": no_merge, "checks": checks,
                                               "step_ms": step_ms, "infer_ms": infer_ms}, indent=1) + "\n")


if __name__ == "__main__":
    main()
