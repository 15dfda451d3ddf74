"""SST-2 dev accuracy: adapterkit LoRA vs peft LoRA under the same script, data order and seeds.

LoRA r=8, alpha=16 on query/value of all-MiniLM-L6-v2 plus the classifier head; 3 epochs, batch 32, max length 64,
AdamW lr 5e-4 with linear warmup (6%) and decay. Each (library, seed) runs in its own process, so the two libraries
never share state. Prints a table and the mean per library.

Two designs:
  native  each library initialises its LoRA from the seed in its own way (peft draws extra random numbers while
          building its layers, so the same seed gives the two libraries different A matrices and dropout masks);
  paired  (--paired) both get the same A matrices (Kaiming-uniform from a generator seeded by the seed) and the
          global RNG is re-seeded before training, so the runs differ only in the libraries' arithmetic.

    python benchmarks/sst2_accuracy.py --seeds 0 1            # full run, ~25 min on 2 cores
    python benchmarks/sst2_accuracy.py --seeds 0 --max-steps 50  # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import attach_sst2_lora, minilm_dir  # noqa: E402


def paired_init(model, seed: int) -> None:
    """Overwrite every LoRA A with the same draw for both libraries (bound 1/sqrt(in), as kaiming_uniform(a=sqrt 5))."""
    import torch

    generator = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ("lora_A" in name or name.endswith("lora_a")) and param.dim() == 2:
                bound = 1 / param.shape[1] ** 0.5
                param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)


def one_run(library: str, seed: int, max_steps: int | None, paired: bool = False) -> dict:
    import torch

    from adapterkit.cli.commands import load_classifier
    from adapterkit.train.data import read_table, shipped_sst2
    from adapterkit.train.loop import TrainConfig, run_training, seed_everything

    torch.set_num_threads(2)
    train_path, dev_path = shipped_sst2()
    train, labels = read_table(train_path, "sentence", "label")
    dev, _ = read_table(dev_path, "sentence", "label", label_names=labels)
    seed_everything(seed)
    model, tokenizer = load_classifier(minilm_dir(), 2)
    model = attach_sst2_lora(model, library)
    if paired:
        paired_init(model, seed)
        torch.manual_seed(seed)  # the same dropout masks from here on
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = TrainConfig(epochs=3, lr=5e-4, batch_size=32, max_length=64, max_steps=max_steps, seed=seed)
    history, seconds = run_training(model, tokenizer, train, dev, config, desc=f"{library} seed {seed}")
    return {"library": library, "seed": seed, "dev_accuracy": history["dev_accuracy"][-1],
            "trainable": trainable, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--paired", action="store_true", help="same LoRA init and dropout stream for both")
    parser.add_argument("--one", nargs=2, metavar=("LIBRARY", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], int(args.one[1]), args.max_steps, args.paired)))
        return
    results = []
    for seed in args.seeds:
        for library in ("adapterkit", "peft"):
            cmd = [sys.executable, __file__, "--one", library, str(seed)]
            if args.max_steps:
                cmd += ["--max-steps", str(args.max_steps)]
            if args.paired:
                cmd.append("--paired")
            out = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ,
                                                                          "ADAPTERKIT_NO_PROGRESS": "1"})
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                sys.exit(f"{library} seed {seed} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(line[0][7:]))
            print(results[-1], flush=True)
    print(f"\n{'library':<11} {'seed':>4} {'dev acc':>8} {'trainable':>10} {'train s':>8}")
    for r in results:
        print(f"{r['library']:<11} {r['seed']:>4} {r['dev_accuracy']:>8.2f} {r['trainable']:>10,} {r['seconds']:>8.1f}")
    for library in ("adapterkit", "peft"):
        accs = [r["dev_accuracy"] for r in results if r["library"] == library]
        secs = [r["seconds"] for r in results if r["library"] == library]
        print(f"mean {library:<11} dev accuracy {sum(accs) / len(accs):.2f}  train {sum(secs) / len(secs):.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
