"""Useful SFT training tokens per second on the shipped Alpaca Libre set: adapterkit's SFT loop vs peft + the
transformers ``Trainer`` with its defaults.

Useful tokens are the tokens that are not padding (attention mask 1), counted per optimizer step; the answer
tokens that carry the loss are counted beside them. Both sides train SmolLM2-135M-Instruct with LoRA r=16
alpha=32 (no dropout) on q/k/v/o/gate/up/down, AdamW lr ``--lr`` (6% warmup, linear decay, weight decay 0.01),
``--batch-size`` examples per step for ``--steps`` steps, on the same rendered examples (adapterkit's chat-template
rendering, assistant-only labels, cut to ``--max-length``):

- adapterkit: train/sft.py, length-grouped batches (sorted within shuffled mega-batches of 50 batches), the output
  layer applied at the labelled positions only.
- peft + Trainer: ``get_peft_model`` and ``Trainer`` with ``DataCollatorForSeq2Seq`` (each randomly drawn batch
  padded to its longest row, labels padded with -100), ``group_by_length`` off, as the defaults are.

The two draw different batches, so their loss curves differ step by step; their mean training loss over the run
should agree within noise (printed with the standard error of each). Goal: >= 1.5x adapterkit / Trainer.

    cd benchmarks && PYTHONPATH=../src python sft_tokens.py --json results/sft_tokens.json
    # a quick check:  OMP_NUM_THREADS=1 PYTHONPATH=../src python sft_tokens.py --steps 2 --batch-size 2 \\
    #                     --max-length 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import _common  # noqa: F401  (offline hub)

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _data(tok, max_length: int, model_config):
    from adapterkit.train.sft_data import read_conversations, render, shipped_alpaca

    return render(tok, read_conversations(shipped_alpaca()), max_length, model_config)


def _summary(name: str, losses: list[float], seconds: float, real: int, slots: int, labelled: int) -> dict:
    return {"run": name, "steps": len(losses), "seconds": round(seconds, 2),
            "useful_tokens": real, "token_slots": slots, "padding_share": round(1 - real / max(slots, 1), 4),
            "label_tokens": labelled, "useful_tokens_per_s": round(real / seconds, 1),
            "label_tokens_per_s": round(labelled / seconds, 1),
            "mean_loss": round(statistics.mean(losses), 4),
            "loss_sem": round(statistics.stdev(losses) / math.sqrt(len(losses)), 4) if len(losses) > 1 else None,
            "losses": [round(x, 4) for x in losses]}


def run_adapterkit(args: argparse.Namespace) -> dict:
    import adapterkit as ak
    from adapterkit.models import load_pretrained
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.sft import SFTConfig, run_sft

    seed_everything(args.seed)
    model, tok = load_pretrained("smollm2", task="causal-lm")
    data = _data(tok, args.max_length, model.config)
    ak.attach(model, "sft", ak.LoRA(r=16, alpha=32), PROJECTIONS)
    ak.train_only(model, "sft")
    config = SFTConfig(epochs=math.ceil(args.steps * args.batch_size / len(data)), max_steps=args.steps,
                       lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, samples=0)
    one_row = type(data)(data.ids[:1], data.labels[:1], data.where[:1])  # the per-epoch dev loss: negligible
    result = run_sft(model, tok, data, one_row, config)
    stats = result["stats"]
    return _summary("adapterkit (length-grouped)", result["history"]["loss"], result["seconds"],
                    stats["real_tokens"], stats["slots"], stats["label_tokens"])


def run_trainer(args: argparse.Namespace) -> dict:
    import tempfile

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from adapterkit.models import load_pretrained
    from adapterkit.train.loop import seed_everything

    seed_everything(args.seed)
    model, tok = load_pretrained("smollm2", task="causal-lm")
    data = _data(tok, args.max_length, model.config)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS,
                                             task_type="CAUSAL_LM"))
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
            for ids, labels in zip(data.ids, data.labels)]
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    counts = {"real": 0, "slots": 0, "labelled": 0}

    def counting(features):
        batch = collate(features)
        counts["real"] += int(batch["attention_mask"].sum())
        counts["slots"] += batch["attention_mask"].numel()
        counts["labelled"] += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    class Clock(TrainerCallback):  # training steps only, as adapterkit's seconds are
        seconds = 0.0

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            Clock.seconds += time.perf_counter() - self.start

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                                  learning_rate=args.lr, warmup_ratio=0.06, weight_decay=0.01,
                                  lr_scheduler_type="linear", logging_steps=1, report_to=[], save_strategy="no",
                                  use_cpu=True, seed=args.seed, disable_tqdm=True, remove_unused_columns=False,
                                  dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting,
                          callbacks=[Clock()])
        torch.set_num_threads(args.threads)
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return _summary("peft + Trainer (defaults)", losses, Clock.seconds, counts["real"], counts["slots"],
                    counts["labelled"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    runs = [run_adapterkit(args), run_trainer(args)]
    for r in runs:
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    ours, theirs = runs
    print(f"\n{'run':<30}{'useful tok/s':>13}{'padding':>9}{'label tok/s':>12}{'mean loss':>11}{'sem':>8}")
    for r in runs:
        print(f"{r['run']:<30}{r['useful_tokens_per_s']:>13}{100 * r['padding_share']:>8.1f}%"
              f"{r['label_tokens_per_s']:>12}{r['mean_loss']:>11}{r['loss_sem'] or 0:>8}")
    ratio = ours["useful_tokens_per_s"] / theirs["useful_tokens_per_s"]
    gap = abs(ours["mean_loss"] - theirs["mean_loss"])
    noise = math.hypot(ours["loss_sem"] or 0, theirs["loss_sem"] or 0)
    print(f"\nuseful tokens/s: {ratio:.2f}x Trainer's (goal >= 1.5x); mean loss gap {gap:.4f} "
          f"({gap / noise:.1f} standard errors)" if noise else f"\nuseful tokens/s: {ratio:.2f}x Trainer's")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": vars(args), "ratio": round(ratio, 3), "runs": runs},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
