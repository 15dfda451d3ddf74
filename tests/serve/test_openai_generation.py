"""Chat, streaming and sampling as the official ``openai`` client sees them, against a real uvicorn server at
127.0.0.1 serving the tiny Llama (given a chat template) with continuous batching: every answer equals the same
request run alone; streams concatenate to the plain answer; stop, seed, usage, the model list; the 400s as the
client's BadRequestError; a short request finishes while a long one is still streaming; an adapter unloaded under a
stream ends it with an error event."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from adapterkit.serve.runners import Row, Sampling  # noqa: E402
from adapterkit.serve.server import Running  # noqa: E402
from tests.serve.client import LIMIT, server  # noqa: E402
from tests.serve.fixtures import ADAPTERS, WORDS  # noqa: E402

# words of the tiny vocabulary stand for the roles; a system message anywhere but first is refused by the template
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
            "{{ raise_exception('a system message must come first') }}{% endif %}"
            "{{ {'system': 'open', 'user': 'hello', 'assistant': 'yes'}[m['role']] }} {{ m['content'] }} "
            "{% endfor %}{% if add_generation_prompt %}right{% endif %}")
CHAT = [{"role": "system", "content": "be good"}, {"role": "user", "content": "the cat sat"},
        {"role": "assistant", "content": "a dog ran"}, {"role": "user", "content": "one two three"}]


@pytest.fixture(scope="module")
def chat_model(folders) -> Path:
    from transformers import AutoTokenizer

    folder = folders["root"] / "lm_chat"
    shutil.copytree(folders["lm"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm(chat_model, folders) -> Iterator[Running]:
    with server(chat_model, folders["lm_adapters"], max_resident=ADAPTERS, max_batch=16, max_wait_ms=10,
                max_tokens=100, max_input_tokens=200) as running:
        yield running


def _client(running: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", timeout=LIMIT, max_retries=0)


def _alone(running: Running, adapter: str, ids: tuple[int, ...], max_tokens: int, **sampling) -> dict:
    runner = running.server.config.app.state.runner
    return runner([Row(None if adapter == "base" else adapter, ids, max_tokens, Sampling(**sampling))])[0]


def _chat_ids(running: Running, messages: list[dict]) -> tuple[int, ...]:
    tokenizer = running.server.config.app.state.runner.tokenizer
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("right")  # the generation prompt is there
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt(i: int) -> str:
    return " ".join(WORDS[(5 * i + 3 * k) % len(WORDS)] for k in range(2 + i % 5))


def test_chat_answers_as_the_assistant_equal_to_the_conversation_run_alone(lm) -> None:
    answer = _client(lm).chat.completions.create(model="ad1", messages=CHAT, max_tokens=6)
    alone = _alone(lm, "ad1", _chat_ids(lm, CHAT), 6)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.model == "ad1" and answer.id.startswith("chatcmpl-")
    assert (choice.message.role, choice.message.content, choice.finish_reason) == \
        ("assistant", alone["text"], alone["finish_reason"])
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(_chat_ids(lm, CHAT)),
                                                                             alone["completion_tokens"])
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    newer = _client(lm).chat.completions.create(model="ad1", messages=CHAT, max_completion_tokens=6)
    assert newer.choices[0].message.content == alone["text"]


def test_streams_concatenate_to_the_plain_answer(lm) -> None:
    client = _client(lm)
    plain = client.completions.create(model="ad3", prompt="the cat sat", max_tokens=9)
    chunks = list(client.completions.create(model="ad3", prompt="the cat sat", max_tokens=9, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # text really came in pieces

    plain_chat = client.chat.completions.create(model="ad0", messages=CHAT, max_tokens=7)
    stream = list(client.chat.completions.create(model="ad0", messages=CHAT, max_tokens=7, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in stream)
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == plain_chat.choices[0].message.content
    assert [c.choices[0].finish_reason for c in stream] == [None] * (len(stream) - 1) + \
        [plain_chat.choices[0].finish_reason]
    assert all(c.usage is None for c in stream)  # no usage chunk unless asked for


def test_stop_cuts_before_the_stop_string_in_plain_and_streamed_answers(lm) -> None:
    client = _client(lm)
    model, prompt = _long_request(lm)  # 12 tokens, no end-of-text among them
    full = client.completions.create(model=model, prompt=prompt, max_tokens=12).choices[0].text
    words = full.split()
    stop = f"{words[1][-1]} {words[2][:2]}"  # spans two tokens
    expected = full[:full.index(stop)]
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=12, stop=["zz", stop])
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (expected, "stop")
    streamed = list(client.completions.create(model=model, prompt=prompt, max_tokens=12, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_a_seed_gives_the_same_text_alone_and_in_a_crowd(lm) -> None:
    client = _client(lm)
    ask = dict(model="ad4", prompt="one two", max_tokens=10, temperature=1.0, seed=1234)
    alone = client.completions.create(**ask).choices[0].text
    results: dict[int, str] = {}

    def crowd(i: int) -> None:
        if i == 3:
            results[i] = client.completions.create(**ask).choices[0].text
        else:
            results[i] = client.completions.create(model=f"ad{i % ADAPTERS}", prompt=_prompt(i), max_tokens=4 + i,
                                                   temperature=0.8, seed=i).choices[0].text
    threads = [threading.Thread(target=crowd, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[3] == alone
    others = {client.completions.create(**{**ask, "seed": seed}).choices[0].text for seed in (1, 2, 3)}
    assert others - {alone}  # other seeds draw other text
    assert alone == _alone(lm, "ad4", tuple(lm.server.config.app.state.runner.encode("one two")), 10,
                           temperature=1.0, seed=1234)["text"]


def test_the_model_list_in_openais_shape(lm) -> None:
    models = _client(lm).models.list()
    assert [m.id for m in models] == ["base", *[f"ad{i}" for i in range(ADAPTERS)]]
    assert all(m.object == "model" and isinstance(m.created, int) and m.owned_by == "adapterkit" for m in models)


def test_concurrent_clients_mixed_adapters_and_lengths_equal_each_alone(lm) -> None:
    client = _client(lm)
    metrics = lm.server.config.app.state.metrics
    before = (metrics.batch_size.count, metrics.batch_size.total)
    asks = [(f"ad{i % ADAPTERS}" if i % 4 else "base", i % 3 == 0, 2 + (7 * i) % 13) for i in range(12)]
    answers: dict[int, tuple[str, str]] = {}

    def ask(i: int) -> None:
        model, chat, max_tokens = asks[i]
        if chat:
            reply = client.chat.completions.create(model=model, max_tokens=max_tokens,
                                                   messages=[{"role": "user", "content": _prompt(i)}])
            answers[i] = (reply.choices[0].message.content, reply.choices[0].finish_reason)
        else:
            done = client.completions.create(model=model, prompt=_prompt(i), max_tokens=max_tokens)
            answers[i] = (done.choices[0].text, done.choices[0].finish_reason)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    runner = lm.server.config.app.state.runner
    for i, (model, chat, max_tokens) in enumerate(asks):
        ids = _chat_ids(lm, [{"role": "user", "content": _prompt(i)}]) if chat else runner.encode(_prompt(i))
        alone = _alone(lm, model, ids, max_tokens)
        assert answers[i] == (alone["text"], alone["finish_reason"]), asks[i]
    steps, rows = metrics.batch_size.count - before[0], metrics.batch_size.total - before[1]
    assert rows / steps > 1.5  # requests really shared decode steps


def _long_request(lm) -> tuple[str, str]:
    """A prompt and adapter that run the full 100 tokens (no end-of-text) alone."""
    runner = lm.server.config.app.state.runner
    for i in range(20):
        model = f"ad{i % ADAPTERS}"
        if _alone(lm, model, runner.encode(_prompt(i)), 100)["finish_reason"] == "length":
            return model, _prompt(i)
    pytest.fail("no long-running request found")


def test_a_short_request_finishes_while_a_long_one_streams(lm) -> None:
    client = _client(lm)
    model, prompt = _long_request(lm)
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=100, stream=True)
    pieces = iter(stream)
    next(pieces)  # the long row runs
    short = client.completions.create(model="ad1", prompt="the cat", max_tokens=2)
    assert short.usage.completion_tokens >= 1
    assert lm.server.config.app.state.batcher.running == 1  # answered while the long row still decodes
    rest = list(pieces)
    assert rest and rest[-1].choices[0].finish_reason == "length"  # the long one was still going


def test_an_adapter_unloaded_under_a_stream_ends_it_with_an_error(lm) -> None:
    client = _client(lm)
    model, prompt = _long_request(lm)
    stream = iter(client.completions.create(model=model, prompt=prompt, max_tokens=100, stream=True))
    next(stream)
    client.delete(f"/adapters/{model}", cast_to=object)
    try:
        with pytest.raises(openai.APIError, match="unloaded"):
            list(stream)
    finally:
        client.post("/adapters", body={"name": model}, cast_to=object)
    assert client.completions.create(model=model, prompt=prompt, max_tokens=2).choices[0].finish_reason


def _bad(call, *words: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    message = caught.value.body["message"]
    assert "\n" not in message and all(w in message for w in words), message


def test_bad_chat_and_generation_requests_are_400s(lm, folders) -> None:
    client = _client(lm)
    chat, create = client.chat.completions.create, client.completions.create
    user = {"role": "user", "content": "hi"}
    _bad(lambda: chat(model="ad0", messages=[]), "messages: empty")
    _bad(lambda: chat(model="ad0", messages=[user, {"role": "tool", "content": "x"}]), "messages[1].role", "tool")
    _bad(lambda: chat(model="ad0", messages=[{"role": "user"}]), "messages[0].content", "required")
    _bad(lambda: chat(model="ad0", messages=[{"role": "user", "content": ["a"]}]), "messages[0].content",
         "string", "array")
    _bad(lambda: chat(model="ad0", messages=[{"role": "user", "content": 3}]), "messages[0].content", "integer")
    _bad(lambda: chat(model="ad0", messages=["hi"]), "messages[0]", "object")
    _bad(lambda: chat(model="ad0", messages=[user, {"role": "system", "content": "late"}]), "template rejects",
         "a system message must come first")
    _bad(lambda: chat(model="ad0", messages=[user], max_tokens=2, max_completion_tokens=2), "give one")
    _bad(lambda: create(model="ad0", prompt="cat " * 130, max_tokens=1), "130 tokens", "context of 128")
    _bad(lambda: create(model="ad0", prompt="cat " * 125, max_tokens=8), "+ max_tokens (8)", "context of 128")
    _bad(lambda: create(model="ad0", prompt="a", max_tokens=0), "max_tokens", "greater than or equal to 1")
    _bad(lambda: create(model="ad0", prompt="a", max_tokens=101), "max_tokens: at most 100")
    _bad(lambda: create(model="ad0", prompt="a", stop=["a", "b", "c", "d", "e"]), "stop: at most 4")
    _bad(lambda: create(model="ad0", prompt="a", stop=""), "stop", "empty")
    _bad(lambda: create(model="ad0", prompt="a", top_p=0), "top_p", "greater than 0")
    _bad(lambda: create(model="ad0", prompt="a", n=2), "n", "less than or equal to 1")
    _bad(lambda: create(model="ad0", prompt="a", stream_options={"include_usage": True}), "stream=true")
    with server(folders["lm"], None, max_wait_ms=1) as plain:  # a tokenizer without a chat template
        _bad(lambda: _client(plain).chat.completions.create(model="base", messages=[user]), "no chat template",
             "/v1/completions")


def test_request_level_batching_gives_the_same_answers(chat_model, folders, lm) -> None:
    continuous = _client(lm)
    with server(chat_model, folders["lm_adapters"], max_resident=ADAPTERS, batching="request",
                max_wait_ms=1) as running:
        client = _client(running)
        for model, prompt, n in (("ad5", "the cat", 5), ("base", "a dog ran fast", 8)):
            expected = continuous.completions.create(model=model, prompt=prompt, max_tokens=n).choices[0].text
            assert client.completions.create(model=model, prompt=prompt, max_tokens=n).choices[0].text == expected
            streamed = client.completions.create(model=model, prompt=prompt, max_tokens=n, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == expected
        reply = client.chat.completions.create(model="ad2", messages=CHAT, max_tokens=4)
        assert reply.choices[0].message.content == \
            continuous.chat.completions.create(model="ad2", messages=CHAT, max_tokens=4).choices[0].message.content
