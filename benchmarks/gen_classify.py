"""SST-2 as generative classification on SmolLM2-135M-Instruct: zero-shot base vs LoRA SFT through adapterkit
and through peft, with one recipe.

Each review becomes a chat (user: "Is the sentiment of this movie review positive or negative? Answer with one
word.\\n\\n<text>", assistant: "negative" / "positive"); accuracy is rank classification over the two answers
(adapterkit.train.gen_classify), greedy exact match beside it, on the SST-2 dev rows (872 by default).

Recipe, the same for both libraries: LoRA r=16 alpha=32, no dropout, on q/k/v/o/gate/up/down; ``--rows`` training
rows drawn by the seed, the same rows and batch order for both (adapterkit's length-grouped batches, seeded), AdamW
lr ``--lr`` with 6% warmup and linear decay, batch ``--batch-size``, ``--steps`` steps (default one epoch). The
training loop is adapterkit's (train/sft.py) for both: peft's LoRA layers are injected with ``get_peft_model``, and
the loop trains whatever requires grad, so only the adapter implementation differs (each library initialises its
own A matrices from the seed). Wall time per run: training only, and the dev evaluation apart.

    cd benchmarks && PYTHONPATH=../src python gen_classify.py --seeds 0 1 --json results/gen_classify.json
    # a quick check:  OMP_NUM_THREADS=1 PYTHONPATH=../src python gen_classify.py --rows 32 --steps 2 --dev-rows 8 \\
    #                     --seeds 0 --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import _common  # noqa: F401  (offline hub)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tables(rows: int, dev_rows: int | None, seed: int):
    from adapterkit.train.data import TextTable, read_table, shipped_sst2

    train_path, dev_path = shipped_sst2()
    train, labels = read_table(train_path, "sentence", "label")
    dev, _ = read_table(dev_path, "sentence", "label", label_names=labels)
    picked = random.Random(seed).sample(range(len(train.texts)), min(rows, len(train.texts)))
    train = TextTable([train.texts[i] for i in picked], None, [train.labels[i] for i in picked])
    if dev_rows:
        dev = TextTable(dev.texts[:dev_rows], None, dev.labels[:dev_rows])
    return train, dev, labels


def _attach(model, library: str) -> None:
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS,
                                         task_type="CAUSAL_LM"))  # injects into ``model`` in place
        return
    import adapterkit as ak

    ak.attach(model, "sst2", ak.LoRA(r=16, alpha=32), PROJECTIONS)
    ak.train_only(model, "sst2")


def one(library: str | None, seed: int, args: argparse.Namespace) -> dict:
    """One run: ``library`` None is the zero-shot base model."""
    from adapterkit.models import load_pretrained
    from adapterkit.train import gen_classify
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.sft import SFTConfig, run_sft
    from adapterkit.train.sft_data import render

    train_table, dev_table, labels = _tables(args.rows, args.dev_rows, seed)
    task = gen_classify.Task(gen_classify.DEFAULT_PROMPT, gen_classify.label_words(labels, None))
    seed_everything(seed)
    model, tok = load_pretrained("smollm2", task="causal-lm")
    result: dict = {"library": library or "base (zero-shot)", "seed": seed}
    if library is not None:
        _attach(model, library)
        result["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train = render(tok, gen_classify.conversations(task, train_table, "train"), args.max_length, model.config)
        # run_sft evaluates a dev loss per epoch, not wanted here: one dev row keeps it negligible
        dev = render(tok, gen_classify.conversations(task, type(dev_table)(dev_table.texts[:1], None,
                                                                            dev_table.labels[:1]), "dev"),
                     args.max_length, model.config)
        steps = args.steps or -(-len(train) // args.batch_size)
        config = SFTConfig(epochs=max(1, -(-steps * args.batch_size // len(train))), max_steps=steps, lr=args.lr,
                           batch_size=args.batch_size, max_length=args.max_length, seed=seed, samples=0)
        trained = run_sft(model, tok, train, dev, config)
        history = trained["history"]["loss"]
        result.update({"steps": len(history), "train_seconds": round(trained["seconds"], 1),
                       "first_loss": round(history[0], 4), "last_loss_mean10": round(statistics.mean(history[-10:]), 4),
                       "padding_share": round(1 - trained["stats"]["real_tokens"] / max(trained["stats"]["slots"], 1),
                                              4)})
    start = time.perf_counter()
    scores = gen_classify.evaluate(model, tok, task, dev_table, batch_size=32)
    result.update({"dev_rows": len(dev_table.labels), "accuracy": round(scores["accuracy"], 2),
                   "exact_match": round(scores["exact_match"], 2),
                   "eval_seconds": round(time.perf_counter() - start, 1)})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="training rows drawn by the seed (default 1000)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: one epoch)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-length", type=int, default=160, help="SST-2's longest rendered row is ~120 tokens")
    parser.add_argument("--dev-rows", type=int, default=None, help="first N dev rows (default all 872)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    runs = [one(None, args.seeds[0], args)]
    print(json.dumps(runs[-1]), flush=True)
    for seed in args.seeds:
        for library in ("adapterkit", "peft"):
            runs.append(one(library, seed, args))
            print(json.dumps(runs[-1]), flush=True)
    print(f"\n{'run':<20}{'seed':>5}{'steps':>7}{'train s':>9}{'accuracy':>10}{'exact':>8}{'last loss':>11}")
    for r in runs:
        print(f"{r['library']:<20}{r['seed']:>5}{r.get('steps', 0):>7}{r.get('train_seconds', 0):>9}"
              f"{r['accuracy']:>10.2f}{r['exact_match']:>8.2f}{r.get('last_loss_mean10', float('nan')):>11.4f}")
    for library in ("adapterkit", "peft"):
        mine = [r for r in runs if r["library"] == library]
        print(f"{library}: mean accuracy {statistics.mean(r['accuracy'] for r in mine):.2f}, mean train time "
              f"{statistics.mean(r['train_seconds'] for r in mine):.1f} s over {len(mine)} seed(s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": vars(args), "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
