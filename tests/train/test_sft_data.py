"""Instruction / chat data for SFT: reading alpaca and chat files, assistant-only labels found prefix by prefix
(end token included), truncation, and a one-line file:line error for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterkit.train.data import DataError
from adapterkit.train.sft_data import (
    IGNORE,
    Conversation,
    read_conversations,
    render,
    shipped_alpaca,
    split,
)


@pytest.fixture(scope="module")
def tok(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _labelled_text(tok, ids: list[int], labels: list[int]) -> list[str]:
    """The label spans decoded, one string per contiguous run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


def test_alpaca_labels_are_the_answer_and_its_end_token(tok, tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", [{"instruction": "Add.", "input": "2 + 2", "output": "4"},
                                         {"instruction": "Say hi.", "input": "", "output": "Hello there!"}])
    convs = read_conversations(path)
    assert convs[0].messages[0]["content"] == "Add.\n\n2 + 2" and convs[1].messages[0]["content"] == "Say hi."
    data = render(tok, convs, 512)
    assert _labelled_text(tok, data.ids[0], data.labels[0]) == ["4<|im_end|>"]
    assert _labelled_text(tok, data.ids[1], data.labels[1]) == ["Hello there!<|im_end|>"]
    # everything else is the rendered prompt: the template's text up to the generation prompt
    full = tok.apply_chat_template(convs[1].messages, tokenize=False)
    assert tok.decode(data.ids[1]) == full
    assert data.where == [f"{path}:1", f"{path}:2"] and data.truncated == 0


def test_json_array_and_chat_multi_turn(tok, tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                         {"role": "assistant", "content": "Goodbye."}]}
    path = tmp_path / "a.json"
    path.write_text("[\n  " + json.dumps(chat) + ",\n  " + json.dumps({"instruction": "x", "output": "y"}) + "\n]")
    convs = read_conversations(path)
    assert [c.where for c in convs] == [f"{path}:2", f"{path}:3"]
    data = render(tok, convs, 512)
    assert _labelled_text(tok, data.ids[0], data.labels[0]) == ["Hello.<|im_end|>", "Goodbye.<|im_end|>"]
    assert "Be brief." in tok.decode(data.ids[0])  # the user's system prompt replaces the template's default


def test_shipped_set_renders_and_splits_reproducibly(tok):
    convs = read_conversations(shipped_alpaca())
    assert len(convs) == 1173
    train, dev = split(convs, 0.05, seed=0)
    assert len(dev) == 59 and len(train) == 1114 and split(convs, 0.05, seed=0)[1] == dev
    assert split(convs, 0.05, seed=1)[1] != dev
    data = render(tok, dev, 64)
    assert data.truncated > 0 and all(len(ids) <= 64 for ids in data.ids)
    assert len(data) + len(data.dropped) == len(dev) and data.dropped  # long prompts leave nothing to learn
    assert all(any(label != IGNORE for label in labels) for labels in data.labels)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "message 1 has role 'bot'; expected one of system, user"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "message 1 (user) content is missing"),
    ({"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]},
     "message 1 (user) content is a list, not a string"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "message 2 is an empty assistant turn"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
     "the conversation has no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "the first turn after the system prompt must be the user"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"instruction": "x", "output": 3}, "alpaca field 'output' must be a string, got int"),
    ({"instruction": "x"}, "alpaca field 'output' must be a string, got nothing"),
    ({"prompt": "x", "completion": "y"}, "neither a chat example ('messages') nor an alpaca one"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_bad_examples_are_one_line_errors_naming_the_line(tmp_path, record, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "fine", "output": "ok"}, record])
    with pytest.raises(DataError) as info:
        read_conversations(path)
    text = str(info.value)
    assert text.startswith(f"{path}:2: ") and message in text and "\n" not in text


def test_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_conversations(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="is empty"):
        read_conversations(tmp_path / "e.jsonl")
    (tmp_path / "j.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"j.jsonl:2: invalid JSON"):
        read_conversations(tmp_path / "j.jsonl")
    (tmp_path / "a.json").write_text('[{"instruction": "a", "output": "b"}\n {"x": 1}]')
    with pytest.raises(DataError, match=r"a.json:2: expected ',' or ']'"):
        read_conversations(tmp_path / "a.json")


def _conv(text: str = "q", answer: str = "a") -> Conversation:
    return Conversation([{"role": "user", "content": text}, {"role": "assistant", "content": answer}], "f.jsonl:7")


def test_a_template_that_raises_is_reported(tok):
    from transformers import AutoTokenizer

    strict = AutoTokenizer.from_pretrained(tok.name_or_path)
    strict.chat_template = ("{% for m in messages %}{% if m['content'] == 'forbidden' %}"
                            "{{ raise_exception('no forbidden words') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match=r"^f.jsonl:7: the chat template rejects this conversation "
                                        r"\(no forbidden words\)$"):
        render(strict, [_conv("forbidden")], 64)


def test_a_template_without_the_prefix_property_is_refused(tok):
    from transformers import AutoTokenizer

    odd = AutoTokenizer.from_pretrained(tok.name_or_path)
    # the turn count up front: the rendering of a prefix is no prefix of the whole
    odd.chat_template = "{{ messages|length }}{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    with pytest.raises(DataError, match=r"f.jsonl:7: the tokenizer's chat template does not render this "
                                        r"conversation prefix by prefix \(turn 2\)"):
        render(odd, [_conv()], 64)
    odd.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        render(odd, [_conv()], 64)


def test_truncation_counts_drops_answerless_cuts_and_refuses_when_none_is_left(tok):
    long_answer = _conv("q", "word " * 100)
    long_prompt = Conversation(_conv("word " * 40).messages, "f.jsonl:9")
    data = render(tok, [long_answer, _conv(), long_prompt], 48)
    assert data.truncated == 2 and len(data.ids[0]) == 48 and len(data.ids[1]) < 48
    assert len(data) == 2 and data.dropped == ["f.jsonl:9"]
    assert data.labels[0][-1] != IGNORE  # the cut answer keeps its first tokens
    with pytest.raises(DataError, match=r"^cutting the examples to --max-length 30 tokens leaves none with an "
                                        r"assistant token \(f.jsonl:9's first answer starts at token \d+\)"):
        render(tok, [long_prompt], 30)


def test_longer_than_the_models_limit(tok):
    from transformers import AutoTokenizer

    short = AutoTokenizer.from_pretrained(tok.name_or_path, model_max_length=40)
    with pytest.raises(DataError, match=r"^f.jsonl:7: \d+ tokens, longer than the model's limit of 40 "
                                        r"\(the tokenizer's model_max_length\)"):
        render(short, [_conv("word " * 40)], 512)

    class Config:
        max_position_embeddings = 30

    with pytest.raises(DataError, match="limit of 30 \\(max_position_embeddings\\)"):
        render(tok, [_conv("word " * 40)], 512, Config())
    assert len(render(short, [_conv()], 512).ids) == 1  # a short one is fine
