"""The server as the official ``openai`` Python client sees it (a real uvicorn server at 127.0.0.1): completions for
several adapters at once, equal to each request served alone, and the error cases as the client's typed errors.

Chat, streaming and sampling are tested in test_openai_generation.py. The client retries 409s and 5xx answers by
default; the server marks the ones a retry cannot fix (409, 500) with ``x-should-retry: false``, so each is sent
once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from adapterkit.serve.runners import Row  # noqa: E402
from adapterkit.serve.server import Running  # noqa: E402
from tests.serve.client import LIMIT, counted, server  # noqa: E402
from tests.serve.fixtures import ADAPTERS, WORDS  # noqa: E402


@pytest.fixture(scope="module")
def lm(folders) -> Iterator[Running]:
    with server(folders["lm"], folders["lm_adapters"], max_batch=16, max_queue=12, max_wait_ms=20,
                max_tokens=8) as running:
        yield running


def _client(running: Running, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", timeout=LIMIT, **options)


def test_concurrent_completions_over_several_adapters_equal_each_alone(lm) -> None:
    runner, metrics = lm.server.config.app.state.runner, lm.server.config.app.state.metrics
    requests = [(f"ad{i % ADAPTERS}" if i % 5 else "base", " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in
                                                                      range(2 + i % 4)), 2 + i % 5) for i in range(24)]
    batches_before, rows_before = metrics.batch_size.count, metrics.batch_size.total

    async def go() -> list:
        # 24 requests at once, 12 queue slots: some may get a 503, which the client retries after its Retry-After
        client = openai.AsyncOpenAI(base_url=f"{lm.url}/v1", api_key="unused", timeout=LIMIT, max_retries=5)
        async with client:
            return await asyncio.gather(*(client.completions.create(model=m, prompt=p, max_tokens=n)
                                          for m, p, n in requests))

    answers = asyncio.run(go())
    rows = metrics.batch_size.total - rows_before
    assert rows / (metrics.batch_size.count - batches_before) > 1.5  # requests really shared decode steps
    for (model, prompt, max_tokens), answer in zip(requests, answers):
        alone = runner([Row(None if model == "base" else model, runner.encode(prompt), max_tokens)])[0]
        choice = answer.choices[0]
        assert (choice.text, choice.finish_reason) == (alone["text"], alone["finish_reason"])
        assert answer.model == model and answer.object == "text_completion"
        assert answer.usage.completion_tokens == alone["completion_tokens"]
        assert answer.usage.prompt_tokens == len(runner.encode(prompt))
    assert len({a.choices[0].text for a in answers}) > ADAPTERS // 2  # adapters and prompts change the answers
    listed = [m.id for m in _client(lm).models.list()]
    assert listed == ["base", *[f"ad{i}" for i in range(ADAPTERS)]]


def test_a_list_prompt_gets_one_choice_per_prompt(lm) -> None:
    answer = _client(lm, max_retries=0).completions.create(model="ad2", prompt=["the cat", "a dog ran"], max_tokens=3)
    assert [c.index for c in answer.choices] == [0, 1]


def _raises(kind: type, status: int, words: tuple[str, ...], call) -> None:
    with pytest.raises(kind) as caught:
        call()
    assert caught.value.status_code == status
    assert caught.value.body["code"] == status and all(w in caught.value.body["message"] for w in words), \
        caught.value.body


def test_errors_arrive_as_the_clients_typed_errors(lm) -> None:
    client = _client(lm, max_retries=0)
    create = client.completions.create
    _raises(openai.BadRequestError, 400, ("max_tokens", "integer", '"8"'),
            lambda: create(model="ad0", prompt="a", max_tokens="8"))
    _raises(openai.BadRequestError, 400, ("max_tokens", "integer", "true"),
            lambda: create(model="ad0", prompt="a", max_tokens=True))
    _raises(openai.BadRequestError, 400, ("max_tokens", "integer", "8.0"),
            lambda: create(model="ad0", prompt="a", max_tokens=8.0))
    _raises(openai.BadRequestError, 400, ("max_tokens: at most 8",), lambda: create(model="ad0", prompt="a",
                                                                                     max_tokens=9))
    _raises(openai.BadRequestError, 400, ("temperature", "less than or equal to 2"),
            lambda: create(model="ad0", prompt="a", temperature=2.5))
    _raises(openai.BadRequestError, 400, ("best_of", "unknown field"),
            lambda: create(model="ad0", prompt="a", best_of=2))
    _raises(openai.BadRequestError, 400, ("invalid",), lambda: create(model="../ad0", prompt="a"))
    _raises(openai.NotFoundError, 404, ("'nope' is not loaded",), lambda: create(model="nope", prompt="a"))
    _raises(openai.NotFoundError, 404, ("POST /v1/embeddings", "no such endpoint"),
            lambda: client.embeddings.create(model="ad0", input="hi"))
    _raises(openai.APIStatusError, 413, ("13 items", "the queue holds at most 12"),
            lambda: create(model="ad0", prompt=["a"] * 13))
    _raises(openai.NotFoundError, 404, ("no such adapter folder",),
            lambda: client.post("/adapters", body={"name": "nowhere"}, cast_to=object))


def test_the_client_does_not_resend_a_409_or_a_500(lm) -> None:
    """With the client's default retries: a second load of a loaded name (409) and a server fault (500) are each
    sent once (x-should-retry: false), where the client would otherwise resend them twice."""
    client = _client(lm)  # default max_retries
    assert client.max_retries >= 1
    before = counted(lm.url, "/v1/adapters", 409)
    _raises(openai.ConflictError, 409, ("'ad1' is already loaded",),
            lambda: client.post("/adapters", body={"name": "ad1"}, cast_to=object))
    assert counted(lm.url, "/v1/adapters", 409) == before + 1
    runner = lm.server.config.app.state.runner

    def broken(text: str) -> tuple[int, ...]:
        raise RuntimeError("tokenizer fell over")

    runner.encode = broken  # an instance attribute: deleted below, the class's method serves again
    try:
        _raises(openai.InternalServerError, 500, ("RuntimeError: tokenizer fell over",),
                lambda: client.completions.create(model="ad0", prompt="a"))
    finally:
        del runner.encode
    assert counted(lm.url, "/v1/completions", 500) == 1
