"""Generative classification: prompts and label words checked in one line, rows as chat examples, batched rank
scores equal to scoring each (text, label) alone, and accuracy / exact match as their definitions say."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import make_smollm2

from adapterkit.core.errors import AdapterKitError
from adapterkit.train import gen_classify
from adapterkit.train.data import TextTable
from adapterkit.train.gen_classify import DEFAULT_PROMPT, Task, evaluate, label_words, rank_scores
from adapterkit.train.sft import generate
from adapterkit.train.sft_data import render

TEXTS = ["a wonderful , moving film", "dull , lifeless and far too long .", "it is a film ."]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return make_smollm2()


@pytest.mark.parametrize("prompt, message", [
    ("Classify this.", "--prompt must hold a {text} slot"),
    ("{text} {other}", "only {text} may appear in braces"),
])
def test_bad_prompts(prompt, message):
    with pytest.raises(AdapterKitError, match=message.replace("{", r"\{").replace("}", r"\}")):
        Task(prompt, ["no", "yes"])


def test_label_words():
    assert label_words(["0", "1"], None) == ["negative", "positive"]
    assert label_words(["ABBR", "DESC"], None) == ["ABBR", "DESC"]
    assert label_words(["0", "1"], "bad, good") == ["bad", "good"]
    with pytest.raises(AdapterKitError, match=r"--label-words names 3 word\(s\) for 2 labels \(0, 1\)"):
        label_words(["0", "1"], "a,b,c")
    with pytest.raises(AdapterKitError, match="must be distinct and non-empty"):
        Task(DEFAULT_PROMPT, ["good", "good"])


def test_rows_become_chats_whose_answer_is_the_label_word(smollm2, tmp_path):
    _, tok = smollm2
    task = Task("Review: {text}\nSentiment?", ["negative", "positive"])
    convs = gen_classify.conversations(task, TextTable(TEXTS[:2], None, [1, 0]), "t.tsv", lines=[2, 5])
    assert [c.where for c in convs] == ["t.tsv:2", "t.tsv:5"]
    assert convs[0].messages == [{"role": "user", "content": f"Review: {TEXTS[0]}\nSentiment?"},
                                 {"role": "assistant", "content": "positive"}]
    data = render(tok, convs, 128)
    answer = [t for t, y in zip(data.ids[1], data.labels[1]) if y != -100]
    assert tok.decode(answer) == "negative<|im_end|>"
    with pytest.raises(AdapterKitError, match="single texts"):
        gen_classify.conversations(task, TextTable(TEXTS[:1], ["x"], [0]), "t.tsv")


def test_batched_rank_scores_equal_each_answer_scored_alone(smollm2):
    model, tok = smollm2
    task = Task(DEFAULT_PROMPT, ["negative", "positive"])
    scores = rank_scores(model, tok, task, TEXTS, batch_size=2)  # padded rows of unequal length, two batches
    for i, text in enumerate(TEXTS):
        prompt = tok.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT.format(text=text)}],
                                         add_generation_prompt=True)
        for j, word in enumerate(task.words):
            answer = tok(f"{word}<|im_end|>", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            expected = sum(float(logp[len(prompt) - 1 + k, t]) for k, t in enumerate(answer))
            assert float(scores[i, j]) == pytest.approx(expected, abs=2e-3)
    assert scores[0].argmax() == 1 and scores[1].argmax() == 0  # the base model already knows these two


def test_accuracy_and_exact_match_follow_their_definitions(smollm2):
    model, tok = smollm2
    task = Task(DEFAULT_PROMPT, ["negative", "positive"])
    table = TextTable(TEXTS, None, [1, 0, 1])
    result = evaluate(model, tok, task, table, batch_size=2)
    predicted = rank_scores(model, tok, task, TEXTS).argmax(1).tolist()
    assert result["accuracy"] == pytest.approx(100 * sum(p == y for p, y in zip(predicted, table.labels)) / 3)
    prompts = [tok.apply_chat_template([{"role": "user", "content": DEFAULT_PROMPT.format(text=t)}],
                                       add_generation_prompt=True) for t in TEXTS]
    said = [generate(model, tok, [p], 8)[0] for p in prompts]
    hits = sum(s.strip().lower().startswith(task.words[y]) and len(s.strip()) == len(task.words[y])
               for s, y in zip(said, table.labels))
    assert result["exact_match"] == pytest.approx(100 * hits / 3)
