"""MixDA (Diao et al. 2023, https://arxiv.org/abs/2306.05406) with a real domain stage on SmolLM2-135M-Instruct, vs
the task adapter alone, on SST-2 as generative classification (issue 18).

Stage 1, the domain stage (``stage1``; once, seed 0; every stage-2 run of either seed reuses its adapters): one
domain adapter (``par_bn`` beside ``mlp.down_proj``: the FFN's 1536-wide activation -> 96 -> 576, GELU, scaling 1,
zero-init up, the paper's down-scale 16) and the MixDA gate (hidden 576 = d: the paper's 768 for d = 1024, scaled to
SmolLM2's width; depth 3, dropout 0.2) sit at layers 9 and 14 of 30, the paper's depth fractions (layers 7 and 11 of
RoBERTa-large's 24). They train with the paper's loss, w = 0.5:

    L = w * L_knowledge + L_old

``L_knowledge`` is the causal-LM loss (next-token cross-entropy) on MR sentences with their labels dropped
(unlabelled in-domain text). SST-2 and MR are both Rotten Tomatoes review sentences: every MR sentence that
matches, contains or is contained in one of the 872 SST-2 dev sentences is removed (1,077 of 10,662; 8,700
training sentences remain), so no dev text is trained on. ``L_old`` (train/mixda.py's ``old_knowledge_hooks``) is,
at each gated layer, the MSE of its output with the mixture against the same layer with the bare projection, on
general text. A pre-norm layer's output is the residual sum; it is compared RMS-normalised, as the next layer reads
it: the counterpart of the paper's post-norm LN(m + r) vs LN(f + r). Unnormalised, SmolLM2's residual stream made
the term 8.4 at step 1 against 2.7 for w * L_knowledge. The general text is CoLA's acceptable training
sentences (6,023; labels used only to drop the ungrammatical ones). They are plain general English prose like the
paper's Wikipedia, in the same form as the domain text (sentences, not chats, so the gate learns domain vs
general and not chat vs prose), and short and cheap.

Two deviations, for a decoder and this budget. The gate pools per token (``pool="token"``): the paper's last-token
pool would let every position see the answer it predicts. And the gate trains at ``--gate-lr`` 5e-5, a tenth of
the adapter's 5e-4. The paper's code has this knob (``moe_lr``) but defaults it to the same rate. At equal rates
the gate shut within 10 steps on every text (domain share 0.03-0.08; the zero-init adapter adds nothing yet, so the
LM loss only asks for the whole FFN back), and after 30 steps the held-out MR loss was the bare model's
(5.6109 vs 5.6123). At 5e-5 the share stayed at 0.46-0.49 and the adapter took over the halved FFN (MR loss 5.687
at attach -> 5.615 after 30 steps). Pass ``--gate-lr 5e-4`` for the code's default. Recorded: the LM loss of 256
held-out MR sentences (MR's fixed held-out split, same filter) and 256 held-out CoLA dev sentences, for the bare
model, at attach (the near-uniform gate halves the FFN output at the two layers) and after stage 1, and the gate's
domain share on each.

Stage 2 (``run``, seeds 0 and 1, arms ``mixda`` and ``alone``): each SST-2 row becomes gen_classify.py's chat
(answer "negative" / "positive"), trained with the SFT loss on the answer tokens. The task adapter is the paper's
Houlsby adapter (stage_two.sh's "houlsby-mixda"): a sequential bottleneck, reduction 16, swish, after attention
and after the FFN, i.e. on every layer's ``o_proj`` and ``down_proj`` output before the residual add (2,525,040
parameters). ``mixda``: the domain adapter is frozen; the task adapter and the gate (3,102,340 more parameters)
train, run as Stack(Mix(movies, name=gate), task). ``alone``: the same task adapter, with no domain adapter and
no gate. Both arms get the same rows (``--rows`` drawn by the seed), steps, length-grouped batch order
(train/sft.py's) and task-adapter init. AdamW at ``--lr`` 1e-3 (the gate too), 6 % warmup then linear decay,
batch 16, max length 160. Scoring is rank classification (train/gen_classify.py) on the first ``--dev-rows`` SST-2
dev rows, the same rows for every run, after each ``1/--evals`` of the steps. That is the dev curve; the last point
is the run's accuracy, nothing is picked on it. ``--score-start`` adds step 0, the same for every seed of an arm
(the task adapter starts as the identity; the gate's dropout is off when scoring), so pass it on one seed.
``--exact-match`` adds greedy exact match at the end.

Timing, one thread, measured while two other jobs held the machine's two cores (so about 1.5x slower than on a
free core): stage 1 3.6 s a step (median), stage 2 7.7 s (alone) and 8.7 s (mixda), a rank pass over 64 dev rows
37 s, greedy exact match over 64 rows 16 s more. On a free core that is about 2.4, 5.2 and 5.8 s a step and 100 s
a rank pass over 256 rows. Stage 1: about 8 min (150 steps + 6 short held-out passes). A stage-2 run: about 11 min
(alone) to 12 min (mixda) for 72 steps + 3 passes; --score-start adds about 100 s, --exact-match about 65 s.

    cd benchmarks && export PYTHONPATH=../src:. OMP_NUM_THREADS=1 ADAPTERKIT_NO_PROGRESS=1
    python mixda_llm.py stage1                                      # the domain stage, once
    python mixda_llm.py run --arm alone --seed 0 --score-start      # one stage-2 run; then --seed 1 without it
    python mixda_llm.py run --arm mixda --seed 0 --score-start      # (runs stage 1 first if it is missing)
    python mixda_llm.py table                                       # markdown table and mixda_llm.png
    # a quick check: python mixda_llm.py run --arm mixda --domain-steps 2 --steps 2 --rows 32 --dev-rows 8 \\
    #                    --heldout-rows 8 --score-start --stage-one /tmp/mixda_s1 --out /tmp/mixda_llm.jsonl

Results: one JSON line per run in results/mixda_llm.jsonl (a run already there is skipped); the stage-1 adapters
in results/mixda_stage1/smollm2/ (git-ignored, needed only to resume).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from _common import append_record, done_keys

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "mixda_llm.jsonl"
STAGE_ONE = HERE / "results" / "mixda_stage1" / "smollm2"  # under .gitignore's mixda_stage1/*/
PLOT = HERE / "mixda_llm.png"
PAPER_LAYERS, PAPER_DEPTH = (7, 11), 24  # RoBERTa-large's adapted layers
KNOWLEDGE_WEIGHT = 0.5  # w, the paper's
DOMAIN, GATE, TASK = "movies", "gate", "task"
HOULSBY = ["o_proj", "down_proj"]  # the projections before each residual add: after attention, after the FFN
ARMS = ("mixda", "alone")


# -- data ----------------------------------------------------------------------------------------------------------
def domain_texts() -> tuple[list[str], list[str]]:
    """(train, held-out) MR sentences without labels, minus any that shares text with an SST-2 dev sentence."""
    from tasks import load_task, without_overlap

    mr, dev = load_task("mr"), load_task("sst2").dev.texts
    return without_overlap(mr.train, dev).texts, without_overlap(mr.dev, dev).texts


def general_texts() -> tuple[list[str], list[str]]:
    """(train, held-out) CoLA sentences judged acceptable (the labels are used only to drop ungrammatical ones)."""
    from tasks import load_task

    cola = load_task("cola")
    return ([t for t, y in zip(cola.train.texts, cola.train.labels) if y == 1],
            [t for t, y in zip(cola.dev.texts, cola.dev.labels) if y == 1])


def lm_rows(tokenizer: Any, texts: list[str], max_length: int) -> Any:
    """Plain sentences for the causal-LM loss: every token is a target (padding is masked by ``collate``)."""
    from adapterkit.train.sft_data import Tokenized

    ids = [row[:max_length] for row in tokenizer(texts)["input_ids"]]
    return Tokenized(ids, [list(row) for row in ids], [])


def sst2_tables(rows: int, dev_rows: int, seed: int) -> tuple[Any, Any, list[str]]:
    """``rows`` training rows drawn by the seed (gen_classify.py's draw) and the first ``dev_rows`` dev rows."""
    from adapterkit.train.data import TextTable, read_table, shipped_sst2
    from tasks import subset

    train_path, dev_path = shipped_sst2()
    train, labels = read_table(train_path, "sentence", "label")
    dev, _ = read_table(dev_path, "sentence", "label", label_names=labels)
    return (subset(train, rows, seed), TextTable(dev.texts[:dev_rows], None, dev.labels[:dev_rows]), labels)


# -- model pieces --------------------------------------------------------------------------------------------------
def layers_of(model: Any) -> tuple[int, ...]:
    """The paper's depth fractions on this model: round(7/24 L), round(11/24 L); 9 and 14 of SmolLM2's 30."""
    depth = model.config.num_hidden_layers
    return tuple(round(layer * depth / PAPER_DEPTH) for layer in PAPER_LAYERS)


def gated_paths(model: Any) -> list[str]:
    return [f"model.layers.{i}.mlp.down_proj" for i in layers_of(model)]


def gated_layers(model: Any) -> list[str]:
    """The decoder layers holding the gate: where the old-knowledge loss compares outputs."""
    return [f"model.layers.{i}" for i in layers_of(model)]


def domain_specs(model: Any) -> tuple[Any, Any]:
    import adapterkit as ak
    from adapterkit.compose.mixda import MixDA

    return (ak.ParBottleneck(reduction_factor=16, scaling=1.0, activation="gelu"),
            MixDA(domains=1, hidden=model.config.hidden_size, pool="token"))


def task_spec() -> Any:
    import adapterkit as ak

    return ak.SeqBottleneck(reduction_factor=16, activation="swish")


def load_smollm2() -> tuple[Any, Any]:
    from adapterkit.models import load_pretrained

    return load_pretrained("smollm2", task="causal-lm")


def plan(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Length-grouped batches (train/sft.py's, seeded), epoch after epoch."""
    from adapterkit.train.sft import length_grouped

    generator = torch.Generator().manual_seed(seed)
    while True:
        yield from length_grouped(lengths, batch_size, generator)


def train_steps(model: Any, total: int, lr: float, loss_of: Callable[[int], torch.Tensor],
                points: set[int], after: Callable[[int, list[float]], None], gate_lr: float | None = None
                ) -> tuple[list[float], list[float]]:
    """``total`` AdamW steps of ``loss_of(step)`` over the parameters that require grad, the gate's at ``gate_lr``
    (default ``lr``; the paper's code has its own rate for the gate); weight decay 0.01, 6 % linear warmup then
    linear decay, as adamw_with_warmup. ``after(step, losses)`` runs at each step in ``points``. Returns each step's
    seconds (``after`` excluded) and loss."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if f".{GATE}." not in n], "lr": lr},
              {"params": [p for n, p in trained if f".{GATE}." in n], "lr": lr if gate_lr is None else gate_lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=0.01)
    warm = max(1, int(0.06 * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    losses: list[float] = []
    seconds: list[float] = []
    model.train()
    for step in range(1, total + 1):
        began = time.perf_counter()
        loss = loss_of(step)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        seconds.append(time.perf_counter() - began)
        if step in points:
            after(step, losses)
    return seconds, losses


def domain_share(model: Any, routing: Any, data: Any, rows: list[int], pad_id: int) -> dict[str, float]:
    """The gate's mean weight on the domain adapter over the real tokens of ``rows``, per gated layer."""
    from adapterkit.train.sft import collate

    batch = collate(data, rows, pad_id)
    with torch.no_grad():
        model.get_decoder()(input_ids=batch.ids, attention_mask=batch.mask)
    mask = batch.mask.float()
    return {path.split(".")[2]: round(float((w[..., 0] * mask).sum() / mask.sum()), 4)
            for path, w in routing.weights[GATE].items()}


def heldout(model: Any, data: Any, pad_id: int, block: Any = None) -> dict[str, Any]:
    """Token-weighted LM loss of ``data`` (bare model without ``block``) and, with it, the gate's domain share."""
    import adapterkit as ak
    from adapterkit.train.sft import dev_loss

    if block is None:
        return {"lm_loss": round(dev_loss(model, data, 32, pad_id)["loss"], 4)}
    with ak.use(model, block) as routing:
        loss = dev_loss(model, data, 32, pad_id)["loss"]
        model.eval()
        share = domain_share(model, routing, data, list(range(min(64, len(data)))), pad_id)
    return {"lm_loss": round(loss, 4), "domain_share": share}


# -- stage 1 -------------------------------------------------------------------------------------------------------
def stage_one(args: argparse.Namespace) -> None:
    """Train the domain adapter and the gate (seed 0) and save them to ``args.stage_one``; skipped when there."""
    import adapterkit as ak
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.mixda import old_knowledge_hooks
    from adapterkit.train.sft import collate, token_logprobs

    settings = {"domain_steps": args.domain_steps, "domain_lr": args.domain_lr, "gate_lr": args.gate_lr,
                "batch_size": args.batch_size}
    record = args.stage_one / "stage1.json"
    if record.is_file():
        saved = json.loads(record.read_text())["settings"]
        if saved != settings:
            sys.exit(f"{args.stage_one} holds a domain stage trained with {saved}, not {settings}: pass another "
                     "--stage-one or those flags")
        return
    model, tokenizer = load_smollm2()
    pad_id = tokenizer.pad_token_id
    know_texts, know_held = domain_texts()
    old_texts, old_held = general_texts()
    know, old = lm_rows(tokenizer, know_texts, 128), lm_rows(tokenizer, old_texts, 128)
    held = {"mr": lm_rows(tokenizer, know_held[:args.heldout_rows], 128),
            "general": lm_rows(tokenizer, old_held[:args.heldout_rows], 128)}
    began = time.perf_counter()
    report: dict[str, Any] = {"base": {k: heldout(model, v, pad_id) for k, v in held.items()}}
    seed_everything(0)
    domain, gate = domain_specs(model)
    paths = gated_paths(model)
    ak.attach(model, DOMAIN, domain, paths)
    ak.attach(model, GATE, gate, paths)
    trainable = ak.train_only(model, [DOMAIN, GATE])
    block = ak.Mix(DOMAIN, name=GATE)
    report["attached"] = {k: heldout(model, v, pad_id, block) for k, v in held.items()}
    eval_seconds = time.perf_counter() - began
    batches = plan([len(ids) for ids in know.ids], args.batch_size, 0)
    general = torch.Generator().manual_seed(1)
    parts: dict[str, list[float]] = {"knowledge": [], "old": []}

    def loss_of(step: int) -> torch.Tensor:
        rows = next(batches)
        old_rows = torch.randint(len(old.ids), (args.batch_size,), generator=general).tolist()
        with ak.use(model, block):
            logp, _ = token_logprobs(model, collate(know, rows, pad_id))
            knowledge = -logp.mean()
            layer_losses: list[torch.Tensor] = []
            handles = old_knowledge_hooks(model, gated_layers(model), layer_losses)
            try:  # the decoder body alone: the old-knowledge loss needs no output layer
                batch = collate(old, old_rows, pad_id)
                model.get_decoder()(input_ids=batch.ids, attention_mask=batch.mask)
            finally:
                for handle in handles:
                    handle.remove()
        old_loss = torch.stack(layer_losses).sum()
        parts["knowledge"].append(float(knowledge.detach()))
        parts["old"].append(float(old_loss.detach()))
        return KNOWLEDGE_WEIGHT * knowledge + old_loss

    seconds, _ = train_steps(model, args.domain_steps, args.domain_lr, loss_of, set(), lambda s, seen: None,
                             args.gate_lr)
    began = time.perf_counter()
    report["after"] = {k: heldout(model, v, pad_id, block) for k, v in held.items()}
    eval_seconds += time.perf_counter() - began
    ak.save(model, args.stage_one / DOMAIN, DOMAIN)
    ak.save(model, args.stage_one / GATE, GATE)
    result = {"key": stage_key(args), "run": "stage1", "seed": 0, **settings,
              "layers": list(layers_of(model)), "knowledge_weight": KNOWLEDGE_WEIGHT,
              "domain_rows": len(know.ids), "general_rows": len(old.ids), "heldout_rows": args.heldout_rows,
              "trainable_parameters": trainable, **_timing(seconds), "eval_seconds": round(eval_seconds, 1),
              "losses_by_tenth": {k: _tenths(v) for k, v in parts.items()},
              "heldout": report, **_provenance(args)}
    record.write_text(json.dumps({"settings": settings, "result": result}, indent=1) + "\n")
    append_record(args.out, result)
    print(json.dumps(result), flush=True)


def stage_key(args: argparse.Namespace) -> str:
    return f"stage1|steps {args.domain_steps}|lr {args.domain_lr}|gate lr {args.gate_lr}|batch {args.batch_size}"


# -- stage 2 -------------------------------------------------------------------------------------------------------
def run_key(args: argparse.Namespace) -> str:
    stage = f"|{stage_key(args)}" if args.arm == "mixda" else ""
    return (f"{args.arm}|seed {args.seed}|rows {args.rows}|steps {args.steps}|dev {args.dev_rows}|lr {args.lr}"
            f"|evals {args.evals}|batch {args.batch_size}{stage}")


def stage_two(args: argparse.Namespace) -> None:
    """One arm and seed of stage 2, with its dev curve; skipped when its key is in ``args.out``."""
    import adapterkit as ak
    from adapterkit.train import gen_classify
    from adapterkit.train.loop import seed_everything
    from adapterkit.train.sft import collate, token_logprobs
    from adapterkit.train.sft_data import render

    key = run_key(args)
    if key in done_keys(args.out):
        print(f"{key}: already in {args.out}", file=sys.stderr)
        return
    if args.arm == "mixda":
        stage_one(args)
    train_table, dev_table, labels = sst2_tables(args.rows, args.dev_rows, args.seed)
    task = gen_classify.Task(gen_classify.DEFAULT_PROMPT, gen_classify.label_words(labels, None))
    model, tokenizer = load_smollm2()
    pad_id = tokenizer.pad_token_id
    if args.arm == "mixda":
        ak.load(model, args.stage_one / DOMAIN)
        ak.load(model, args.stage_one / GATE)
    seed_everything(args.seed)  # after loading (which leaves the RNG alone): both arms' task adapters start alike
    ak.attach(model, TASK, task_spec(), HOULSBY)
    with torch.no_grad():  # a fingerprint of the task adapter's init: the same in both arms for a seed
        init = sum(float(p.double().abs().sum()) for n, p in model.named_parameters() if f".{TASK}." in n)
    trainable = ak.train_only(model, [TASK, GATE] if args.arm == "mixda" else TASK)
    task_parameters = sum(p.numel() for n, p in model.named_parameters() if f".{TASK}." in n)
    data = render(tokenizer, gen_classify.conversations(task, train_table, "train"), args.max_length, model.config)
    batches = plan([len(ids) for ids in data.ids], args.batch_size, args.seed)
    points = sorted({round(args.steps * i / args.evals) for i in range(1, args.evals + 1)} - {0})
    curve: list[dict[str, Any]] = []
    exact: list[float] = []

    def score(step: int, losses: list[float]) -> None:
        began = time.perf_counter()
        last = step == args.steps and args.exact_match  # generation costs more than ranking: at the end only
        scores = gen_classify.evaluate(model, tokenizer, task, dev_table, batch_size=32, exact_match=last)
        exact.extend([scores["exact_match"]] if last else [])
        since = losses[curve[-1]["step"]:] if curve else losses
        curve.append({"step": step, "accuracy": round(scores["accuracy"], 2),
                      "train_loss": round(statistics.mean(since), 4) if since else None,
                      "eval_seconds": round(time.perf_counter() - began, 1)})
        print(f"{args.arm} seed {args.seed}: step {step} dev {scores['accuracy']:.2f}", file=sys.stderr, flush=True)

    def loss_of(step: int) -> torch.Tensor:
        batch = collate(data, next(batches), pad_id)
        logp, _ = token_logprobs(model, batch)
        return -logp.mean()  # token-weighted over the batch's answer tokens, as run_sft

    block = ak.Stack(ak.Mix(DOMAIN, name=GATE), TASK) if args.arm == "mixda" else TASK
    with ak.use(model, block) as routing:
        if args.score_start:
            score(0, [])
        seconds, losses = train_steps(model, args.steps, args.lr, loss_of, set(points), score)
        share = None
        if args.arm == "mixda":
            model.eval()
            dev_chats = render(tokenizer, gen_classify.conversations(task, dev_table, "dev"), args.max_length,
                               model.config)
            share = domain_share(model, routing, dev_chats, list(range(min(32, len(dev_chats)))), pad_id)
    result = {"key": key, "run": args.arm, "seed": args.seed, "rows": len(train_table.labels), "steps": args.steps,
              "dev_rows": len(dev_table.labels), "lr": args.lr, "batch_size": args.batch_size,
              "max_length": args.max_length, "task_adapter": "houlsby seq_bn rf 16 swish on o_proj + down_proj",
              "stage_one": stage_key(args) if args.arm == "mixda" else None,
              "trainable_parameters": trainable, "task_adapter_parameters": task_parameters,
              "accuracy": curve[-1]["accuracy"], "best_accuracy": max(p["accuracy"] for p in curve),
              "exact_match": round(exact[0], 2) if exact else None,
              "curve": curve, **_timing(seconds), "eval_seconds": round(sum(p["eval_seconds"] for p in curve), 1),
              "loss_by_tenth": _tenths(losses),
              "dev_domain_share": share, "task_init_abs_sum": round(init, 6), **_provenance(args)}
    append_record(args.out, result)
    print(json.dumps(result), flush=True)


def _tenths(values: list[float]) -> list[float]:
    """Mean of each tenth of the steps (fewer parts when there are fewer than ten steps)."""
    parts = min(10, len(values))
    return [round(statistics.mean(values[len(values) * i // parts:len(values) * (i + 1) // parts]), 4)
            for i in range(parts)]


def _timing(seconds: list[float]) -> dict[str, float]:
    """Train seconds, their mean per step and the median step (the first steps pay for warm-up)."""
    return {"train_seconds": round(sum(seconds), 1), "seconds_per_step": round(sum(seconds) / len(seconds), 2),
            "median_step_seconds": round(statistics.median(seconds), 2)}


def _provenance(args: argparse.Namespace) -> dict[str, Any]:
    return {"threads": args.threads, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}


# -- report --------------------------------------------------------------------------------------------------------
def table(args: argparse.Namespace) -> None:
    """The markdown table of ``args.out`` and the dev-curve plot."""
    if not args.out.is_file():
        sys.exit(f"no results yet: {args.out} does not exist")
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    for stage in (r for r in rows if r["run"] == "stage1"):
        held = stage["heldout"]
        print(f"Stage 1: {stage['domain_steps']} steps at lr {stage['domain_lr']} (gate {stage['gate_lr']}), layers "
              f"{stage['layers']}, "
              f"{stage['trainable_parameters']:,} trainable, {stage['train_seconds']:.0f} s "
              f"({stage['seconds_per_step']} s/step).\n")
        print("| held-out text | LM loss, bare model | at attach | after stage 1 | gate's domain share after |")
        print("|---|---|---|---|---|")
        for name in ("mr", "general"):
            share = " / ".join(f"{v:.3f}" for v in held["after"][name]["domain_share"].values())
            print(f"| {name} | {held['base'][name]['lm_loss']:.4f} | {held['attached'][name]['lm_loss']:.4f} | "
                  f"{held['after'][name]['lm_loss']:.4f} | {share} |")
        print()
    runs = [r for r in rows if r["run"] in ARMS]
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["run"], r["steps"], r["rows"]), []).append(r)
    print("| arm | steps (rows) | trainable | dev acc per seed | mean | dev curve (mean over seeds), step: acc | "
          "exact match | train s / eval s per run |")
    print("|---|---|---|---|---|---|---|---|")
    for (arm, steps, n), found in sorted(groups.items()):
        found.sort(key=lambda r: r["seed"])
        accs = [r["accuracy"] for r in found]
        curve = _mean_curve(found)
        print(f"| {arm} | {steps} ({n}) | {found[0]['trainable_parameters']:,} | "
              + " / ".join(f"s{r['seed']} {r['accuracy']:.2f}" for r in found)
              + f" | **{statistics.mean(accs):.2f}** | " + ", ".join(f"{s}: {a:.1f}" for s, a in curve)
              + f" | {_mean_or_dash([r['exact_match'] for r in found])} | "
              f"{statistics.mean(r['train_seconds'] for r in found):.0f} / "
              f"{statistics.mean(r['eval_seconds'] for r in found):.0f} |")
    if runs:
        plot(groups, args.plot)
        print(f"\nplot: {args.plot}")


def _mean_or_dash(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.mean(known):.2f}" if known else "-"


def _mean_curve(found: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, mean accuracy) over the runs at each step; step 0, scored on one seed only, is the same for every
    seed (the task adapter starts as the identity and the gate's dropout is off when scoring)."""
    steps = sorted({p["step"] for r in found for p in r["curve"]})
    at = [[p["accuracy"] for r in found for p in r["curve"] if p["step"] == step] for step in steps]
    return [(step, statistics.mean(values)) for step, values in zip(steps, at)
            if step == 0 or len(values) == len(found)]


def plot(groups: dict[tuple[str, int, int], list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for index, ((arm, steps, _), found) in enumerate(sorted(groups.items())):
        color = f"C{index}"
        for r in found:
            ax.plot([p["step"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], color=color, alpha=0.35,
                    linewidth=0.8)
        mean = _mean_curve(found)
        ax.plot([s for s, _ in mean], [a for _, a in mean], color=color, marker="o",
                label=f"{arm}, {steps} steps ({len(found)} seeds)")
    ax.set_xlabel("stage-2 step (batch 16)")
    ax.set_ylabel("SST-2 dev accuracy (%, rank classification)")
    ax.set_title("SmolLM2-135M-Instruct: MixDA vs the task adapter alone")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line --------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=RESULTS, help="results file (default results/mixda_llm.jsonl)")
    common.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    domain = argparse.ArgumentParser(add_help=False)
    domain.add_argument("--domain-steps", type=int, default=150, help="stage-1 steps, batch 16 (default 150)")
    domain.add_argument("--domain-lr", type=float, default=5e-4,
                        help="stage-1 learning rate (default 5e-4, the paper's code's)")
    domain.add_argument("--gate-lr", type=float, default=5e-5,
                        help="stage-1 learning rate of the gate (default 5e-5; the paper's code's moe_lr, which "
                             "defaults to its lr)")
    domain.add_argument("--heldout-rows", type=int, default=256,
                        help="held-out MR and general sentences for the stage-1 LM loss (default 256 each)")
    domain.add_argument("--stage-one", type=Path, default=STAGE_ONE,
                        help="where the stage-1 adapters are saved and read (default results/mixda_stage1/smollm2)")
    domain.add_argument("--batch-size", type=int, default=16, help="batch size of both stages (default 16)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("stage1", parents=[common, domain], help="the domain stage (once, seed 0)",
                   description="Stage 1: the domain adapter and the gate on MR sentences (causal-LM loss) with the "
                               "old-knowledge loss on CoLA sentences; saved to --stage-one.")
    one = sub.add_parser("run", parents=[common, domain], help="one stage-2 run: an arm and a seed",
                         description="Stage 2, one arm and seed, with its dev curve; the mixda arm runs stage 1 "
                                     "first if --stage-one holds none.")
    one.add_argument("--arm", choices=ARMS, required=True,
                     help="mixda: Stack(Mix(domain, gate), task); alone: the task adapter only")
    one.add_argument("--seed", type=int, default=0, help="rows, batch order and task-adapter init (default 0)")
    one.add_argument("--rows", type=int, default=1152, help="SST-2 training rows drawn by the seed (default 1152)")
    one.add_argument("--steps", type=int, default=72, help="stage-2 steps (default 72: one epoch of 1152 rows)")
    one.add_argument("--dev-rows", type=int, default=256, help="first N SST-2 dev rows scored (default 256)")
    one.add_argument("--evals", type=int, default=3, help="dev points: after every 1/N of the steps (default 3)")
    one.add_argument("--score-start", action="store_true",
                     help="also score step 0 (the same for every seed of an arm: pass it on one seed)")
    one.add_argument("--exact-match", action="store_true",
                     help="also greedy exact match at the end (costs about one more dev pass)")
    one.add_argument("--lr", type=float, default=1e-3, help="stage-2 learning rate, both arms (default 1e-3)")
    one.add_argument("--max-length", type=int, default=160, help="SST-2's longest chat is ~120 tokens")
    report = sub.add_parser("table", parents=[common], help="markdown table and plot of the results")
    report.add_argument("--plot", type=Path, default=PLOT, help="the dev-curve plot (default mixda_llm.png)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for flag in ("domain_steps", "steps", "rows", "dev_rows", "evals", "heldout_rows", "batch_size"):
        if getattr(args, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    {"stage1": stage_one, "run": stage_two, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
