"""Prompts, prefixes, PHM, conformer, shared and generated adapters on real data, 2 seeds (issue 14).

Part ``minilm``: all-MiniLM-L6-v2 on SST-2, SUBJ and TREC dev, the protocol of the low-rank table (1,000 seeded
training rows, 2 epochs = 126 steps, batch 16, max length 64, nothing tuned on these dev sets). Learning rates:
2e-3 (LoRA's, the shared protocol) for every adapter; 1e-2 for prompt, P- and prefix tuning (PETL-AST's rate for
them; at 2e-3 they barely move). 20 virtual tokens each.
Part ``shifted``: prefix tuning with peft's shifted positions on SST-2 (the ``minilm`` rows keep BERT's positions).
Part ``long``: SST-2 at 2,000 rows x 3 epochs (375 steps) for two methods that barely move in 126 steps
(Compacter, prompt tuning), beside LoRA.
Part ``placement``: PETL-AST's placement study on text: a bottleneck and a conformer adapter at the same budget
(about 9.6k parameters a layer: bottleneck hidden 12, conformer 8 channels, kernel 7 -- PETL-AST's 31 exceeds most
SST-2 sentences -- LayerNorm instead of BatchNorm, since text batches are padded), each sequential or parallel,
beside attention (MHSA) or the FFN, Pfeiffer-style (one adapter a layer), on SST-2.
Part ``multitask``: SST-2 + SUBJ + TREC trained together (one head per task, mixed batches, 3,000 rows, 2 epochs):
one bottleneck shared by all tasks (VL-Adapter's single adapter) and Hyperformer (one hypernetwork generating
every layer's adapter from task and layer embeddings), against per-task bottleneck adapters (the ``minilm`` part's
Pfeiffer rows: with a frozen encoder and per-task heads, per-task adapters trained together are trained apart).
Part ``smollm2``: SmolLM2-135M-Instruct, SST-2 as generative classification (the low-rank table's recipe: 600 rows,
one epoch, batch 16), prompt / prefix tuning at 1e-2 and the LLaMA-Adapter / inner layers where they have landed,
beside LoRA r=16 from results/lowrank_table.jsonl.

Every finished run is appended to results/modular_table.jsonl (keyed part/task/method/seed) and skipped on a
rerun, so the work splits over two processes and resumes:

    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python modular_table.py minilm --worker 0/2
    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python modular_table.py placement --worker 1/2
    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python modular_table.py multitask
    cd benchmarks && OMP_NUM_THREADS=1 PYTHONPATH=../src:. python modular_table.py smollm2
    cd benchmarks && PYTHONPATH=../src:. python modular_table.py table
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (offline hub)
from _common import append_record, done_keys

RESULTS = Path(__file__).resolve().parent / "results" / "modular_table.jsonl"
SEEDS = (0, 1)
FFN_OUT = r"re:.*\.layer\.\d+\.output\.dense"  # BERT's FFN output projection (not attention.output.dense)
FFN_NORM = r"re:.*\.layer\.\d+\.output\.LayerNorm"  # the norm ending BERT's FFN sub-layer
PROMPT_LR = 1e-2


def minilm_methods() -> dict[str, tuple[Any, Any, float | None]]:
    """name -> (spec, targets (None: the method places itself), learning rate (None: the protocol's))."""
    import adapterkit as ak
    from adapterkit.methods.compacter import Compacter

    return {
        "LoRA r=8": (ak.LoRA(r=8, alpha=16), ["query", "value"], None),
        "bottleneck rf=16 (Pfeiffer)": (ak.SeqBottleneck(reduction_factor=16), [FFN_NORM], None),
        "Compacter": (Compacter(), ["output.dense"], None),
        "Compacter++": (Compacter(), [FFN_NORM], None),
        "prompt tuning n=20": (ak.methods.PromptTuning(n_tokens=20), None, PROMPT_LR),
        "P-tuning n=20 (MLP)": (ak.methods.PTuning(n_tokens=20, hidden=128), None, PROMPT_LR),
        # positions kept (AdapterHub's): a BERT's [CLS] stays at position 0; peft's shift moves it to n (one run
        # of that, on SST-2, shows what it costs). Random init is peft's; real-token init the paper's
        "prefix tuning n=20 (MLP, kept, random init)": (
            ak.methods.PrefixTuning(n_tokens=20, projection="mlp", hidden=128, positions="kept", init="random"),
            None, PROMPT_LR),
        "prefix tuning n=20 (kept, real-token init)": (
            ak.methods.PrefixTuning(n_tokens=20, positions="kept"), None, PROMPT_LR),
    }


def shifted_prefix() -> dict[str, tuple[Any, Any, float | None]]:
    import adapterkit as ak

    return {"prefix tuning n=20 (MLP, random init)": (
        ak.methods.PrefixTuning(n_tokens=20, projection="mlp", hidden=128, init="random"), None, PROMPT_LR)}


LONG_ROWS, LONG_EPOCHS = 2000, 3  # 375 steps: where the slow starters move (SST-2 only)


def long_methods() -> dict[str, tuple[Any, Any, float | None]]:
    chosen = ("LoRA r=8", "Compacter", "prompt tuning n=20")
    return {name: spec for name, spec in minilm_methods().items() if name in chosen}


PLACEMENTS = {"seq FFN": FFN_OUT, "par FFN": "intermediate", "seq MHSA": "attention.output.dense",
              "par MHSA": "attention.self"}


def placement_methods() -> dict[str, tuple[Any, Any, float | None]]:
    import adapterkit as ak

    found: dict[str, tuple[Any, Any, float | None]] = {}
    for where, target in PLACEMENTS.items():
        sequential = where.startswith("seq")
        found[f"bottleneck h=12, {where}"] = (
            (ak.SeqBottleneck if sequential else ak.ParBottleneck)(hidden=12, scaling=1.0), [target], None)
        conformer = ak.methods.SeqConformer if sequential else ak.methods.ParConformer
        found[f"conformer r=8 k=7, {where}"] = (conformer(hidden=8, kernel_size=7, norm="layer"), [target], None)
    return found


def _done() -> set[str]:
    return done_keys(RESULTS)


def _append(record: dict[str, Any]) -> None:
    append_record(RESULTS, record)


class Budget:
    """How many runs this process may still do (``--limit``: one run a process lets other work share the CPU)."""

    def __init__(self, limit: int | None) -> None:
        self.left = limit
        self.ran = 0

    def take(self) -> bool:
        if self.left is not None and self.ran >= self.left:
            return False
        self.ran += 1
        return True


def run_minilm(part: str, worker: int, workers: int, only: list[str] | None, tasks: tuple[str, ...],
               budget: Budget) -> None:
    from tasks import Protocol, load_task, train_once

    methods = {"minilm": minilm_methods, "placement": placement_methods, "shifted": shifted_prefix,
               "long": long_methods}[part]()
    protocol = Protocol(train_rows=LONG_ROWS, epochs=LONG_EPOCHS) if part == "long" else Protocol(1000, 2)
    jobs = [(task, name, seed) for task in tasks for name in methods for seed in SEEDS if not only or name in only]
    done = _done()
    for index, (task_name, name, seed) in enumerate(jobs):
        key = f"{part}/{task_name}/{name}/{seed}"
        if index % workers != worker or key in done:
            continue
        if not budget.take():
            return
        spec, targets, lr = methods[name]
        result = train_once(load_task(task_name), "m", spec, targets, seed, protocol, lr=lr)
        result.pop("model")
        losses = result.pop("loss_history")
        result.update(key=key, part=part, method=name, lr=lr or protocol.lr,
                      loss_first25=round(statistics.mean(losses[:25]), 4),
                      loss_last25=round(statistics.mean(losses[-25:]), 4), loss_curve=[round(v, 4) for v in losses])
        _append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}), flush=True)


def smollm2_methods() -> dict[str, tuple[Any, Any, float]]:
    """name -> (spec factory, targets, lr); a method not landed yet raises in its factory and is skipped."""
    import adapterkit as ak

    def landed(method: str, **fields: Any) -> Any:
        from adapterkit.core.registry import spec_from_dict

        return lambda: spec_from_dict({"method": method, **fields})

    return {"prompt tuning n=20": (lambda: ak.methods.PromptTuning(n_tokens=20), None, PROMPT_LR),
            "prefix tuning n=20 (MLP, random init)": (
                lambda: ak.methods.PrefixTuning(n_tokens=20, projection="mlp", hidden=256, init="random"), None,
                PROMPT_LR),
            "LLaMA-Adapter (adaption prompt)": (landed("adaption_prompt"), None, PROMPT_LR),
            "prefix tuning n=20 (real-token init)": (lambda: ak.methods.PrefixTuning(n_tokens=20), None, PROMPT_LR),
            "inner layers x2": (landed("inner_layers"), [r"re:model\.layers\.(14|29)"], 1e-4)}


def run_smollm2(only: list[str] | None, rows: int, dev_rows: int, seeds: tuple[int, ...], budget: Budget) -> None:
    import adapterkit as ak
    from adapterkit.models import load_pretrained
    from adapterkit.train import gen_classify
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.sft import SFTConfig, dev_loss, run_sft
    from adapterkit.train.sft_data import render
    from gen_classify import _tables

    done = _done()
    for name, (factory, targets, lr) in smollm2_methods().items():
        for seed in seeds:
            key = f"smollm2/sst2/{name}/{seed}"
            if (only and name not in only) or key in done:
                continue
            if not budget.take():
                return
            try:
                spec = factory()
            except Exception as exc:  # noqa: BLE001  (a method not landed yet: say so, go on)
                print(f"skip {key}: {exc}", flush=True)
                break
            seed_everything(seed)
            model, tok = load_pretrained("smollm2", task="causal-lm")
            pad = tok.pad_token_id or 0
            train_table, dev_table, labels = _tables(rows, dev_rows, seed)
            task = gen_classify.Task(gen_classify.DEFAULT_PROMPT, gen_classify.label_words(labels, None))
            train = render(tok, gen_classify.conversations(task, train_table, "train"), 160, model.config)
            dev = render(tok, gen_classify.conversations(task, dev_table, "dev"), 160, model.config)
            ak.attach(model, "t", spec, targets)
            ak.train_only(model, "t")
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            one_row = type(dev)(dev.ids[:1], dev.labels[:1], dev.where[:1])  # run_sft's per-epoch loss: negligible
            config = SFTConfig(epochs=1, lr=lr, batch_size=16, max_length=160, seed=seed, samples=0)
            trained = run_sft(model, tok, train, one_row, config)
            losses = trained["history"]["loss"]
            start = time.perf_counter()
            scores = gen_classify.evaluate(model, tok, task, dev_table, batch_size=32)
            evaluate_seconds = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as tmp:
                ak.save(model, Path(tmp) / "a", "t")
                stored = sum(f.stat().st_size for f in (Path(tmp) / "a").rglob("*") if f.is_file())
            record = {"key": key, "part": "smollm2", "method": name, "seed": seed, "lr": lr,
                      "trainable_parameters": trainable, "stored_bytes": stored,
                      "train_seconds": round(trained["seconds"], 1), "evaluate_seconds": round(evaluate_seconds, 1),
                      "steps": len(losses), "loss_first10": round(statistics.mean(losses[:10]), 4),
                      "loss_last10": round(statistics.mean(losses[-10:]), 4),
                      "accuracy": round(scores["accuracy"], 2),
                      "task_loss": round(dev_loss(model, dev, 16, pad)["loss"], 4),
                      "loss_curve": [round(v, 4) for v in losses]}
            _append(record)
            print(json.dumps({k: v for k, v in record.items() if k != "loss_curve"}), flush=True)


def _records(part: str) -> list[dict[str, Any]]:
    if not RESULTS.exists():
        return []
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["part"] == part]


def _grouped(records: list[dict[str, Any]], value: str) -> dict[str, dict[str, list[float]]]:
    found: dict[str, dict[str, list[float]]] = {}
    for r in records:
        found.setdefault(r["method"], {}).setdefault(r["task"], []).append(r[value])
    return found


def table() -> None:
    for part, tasks in (("minilm", ("sst2", "subj", "trec")), ("shifted", ("sst2",)), ("placement", ("sst2",)),
                        ("long", ("sst2",))):
        records = _records(part)
        if not records:
            continue
        acc = _grouped(records, "dev_accuracy")
        params = {r["method"]: r["trainable_parameters"] for r in records}
        stored = {r["method"]: r["stored_bytes"] for r in records}
        seconds = _grouped(records, "train_seconds")
        print(f"\n### {part}\n")
        print("| method | lr | " + " | ".join(f"{t} (seed 0 / 1)" for t in tasks)
              + " | mean | trainable params (with head) | stored bytes | train s (SST-2) |")
        print("|---|---|" + "---|" * (len(tasks) + 4))
        lrs = {r["method"]: r["lr"] for r in records}
        for method, per in sorted(acc.items(), key=lambda kv: -statistics.mean(v for vs in kv[1].values()
                                                                                for v in vs)):
            cells = [" / ".join(f"{v:.2f}" for v in per.get(t, [])) or "-" for t in tasks]
            mean = statistics.mean(v for t in tasks for v in per.get(t, []))
            sst = seconds.get(method, {}).get("sst2", [])
            print(f"| {method} | {lrs[method]:g} | " + " | ".join(cells) + f" | {mean:.2f} | {params[method]:,} | "
                  f"{stored[method]:,} | {statistics.mean(sst) if sst else float('nan'):.0f} |")
    for part in ("multitask", "smollm2"):
        records = _records(part)
        if records:
            print(f"\n### {part}\n")
            for r in records:
                print(json.dumps({k: v for k, v in r.items() if k not in ("loss_curve", "key")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["minilm", "placement", "shifted", "long", "multitask", "smollm2", "table"])
    parser.add_argument("--worker", default="0/1", help="i/n: run every n-th job starting at i (two processes)")
    parser.add_argument("--only", nargs="*", help="method names to run (default: all of the part)")
    parser.add_argument("--tasks", nargs="*", help="tasks (default: the part's)")
    parser.add_argument("--rows", type=int, default=600, help="smollm2: training rows")
    parser.add_argument("--dev-rows", type=int, default=256, help="smollm2: dev rows")
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS), help="seeds (default 0 1)")
    parser.add_argument("--limit", type=int, help="stop after this many runs; exit code 3 when none was left")
    args = parser.parse_args()
    budget = Budget(args.limit)
    worker, workers = (int(v) for v in args.worker.split("/"))
    if args.part in ("minilm", "placement", "shifted", "long"):
        default = ("sst2", "subj", "trec") if args.part == "minilm" else ("sst2",)
        run_minilm(args.part, worker, workers, args.only, tuple(args.tasks or default), budget)
    elif args.part == "smollm2":
        run_smollm2(args.only, args.rows, args.dev_rows, tuple(args.seeds), budget)
    elif args.part == "multitask":
        from modular_multitask import run_multitask

        run_multitask(_done(), _append, tuple(args.seeds), budget.take)
    else:
        table()
        return
    if budget.ran == 0:
        raise SystemExit(3)  # nothing (more) to run in this part


if __name__ == "__main__":
    main()
