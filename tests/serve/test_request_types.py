"""Strict JSON types on every field of every endpoint (a bool is not an int, "8" is not 8, 8.0 is not 8), each a 400
naming the field; and a bounded sweep of odd values over every field that must never produce a 500."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from adapterkit.serve.server import Running  # noqa: E402
from tests.serve.client import LIMIT, counted, expect_error, server  # noqa: E402

# endpoint -> a valid body, and per field the wrongly typed values that must be refused
VALID = {"/v1/completions": {"model": "ad0", "prompt": "the cat", "max_tokens": 2, "temperature": 0, "n": 1,
                             "stream": False, "user": "u1"},
         "/v1/classify": {"model": "cls0", "input": "the cat"},
         "/v1/adapters": {"name": "late"}}
INT, FLOAT, BOOL, TEXT, TEXTS = ["8", True, 8.0, [8]], [True, "0", [0]], [1, 0, "true", None], [1, True, ["a"], {}], \
    [1, True, [1], [True], [None], {}]
WRONG = {"/v1/completions": {"model": TEXT + [None], "prompt": TEXTS + [None], "max_tokens": INT,
                             "temperature": FLOAT, "n": INT, "stream": BOOL, "user": TEXT, "top_p": FLOAT,
                             "seed": INT, "stop": TEXTS, "stream_options": [1, True, "x", []]},
         "/v1/classify": {"model": TEXT + [None], "input": TEXTS + [None]},
         "/v1/adapters": {"name": TEXT + [None]}}
CASES = [pytest.param(endpoint, field, value, id=f"{endpoint}-{field}-{value!r}")
         for endpoint, fields in WRONG.items() for field, values in fields.items() for value in values]


@pytest.fixture(scope="module")
def servers(folders) -> Iterator[dict[str, Running]]:
    with server(folders["lm"], folders["lm_adapters"], max_wait_ms=1, max_tokens=4) as lm, \
            server(folders["cls"], folders["cls_runs"], max_wait_ms=1) as cls:
        yield {"/v1/completions": lm, "/v1/classify": cls, "/v1/adapters": lm}


def test_the_valid_bodies_are_served(servers) -> None:
    for endpoint in ("/v1/completions", "/v1/classify"):
        response = httpx.post(servers[endpoint].url + endpoint, json=VALID[endpoint], timeout=LIMIT)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("endpoint,field,value", CASES)
def test_a_wrongly_typed_field_is_a_400_naming_it(servers, endpoint, field, value) -> None:
    body = {**VALID[endpoint], field: value}
    response = httpx.post(servers[endpoint].url + endpoint, json=body, timeout=LIMIT)
    message = expect_error(response, 400)
    assert message.startswith(f"{field}") and ("must be" in message or "invalid" in message), message


ODD = [None, True, False, 0, -1, 2**63, 1.5, -0.0, 1e308, "", " ", "x" * 300, "\x00", "é☃𝄞", "\u2028", "../..", [],
       [[]], [None], [""], ["x"] * 3, {}, {"a": 1}]


def test_no_value_of_any_field_gets_a_500(servers) -> None:
    """Every odd value in every field of every endpoint, and a few whole bodies: all answered below 500."""
    bodies = [(endpoint, {**VALID[endpoint], field: value})
              for endpoint, fields in WRONG.items() for field, value in itertools.product(fields, ODD)]
    bodies += [(endpoint, body) for endpoint in VALID for body in ([], "x", 1, None, {}, {"": 1})]
    statuses: dict[int, int] = {}
    with httpx.Client(timeout=LIMIT) as client:
        for endpoint, body in bodies:
            response = client.post(servers[endpoint].url + endpoint, json=body)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert response.status_code < 500, (endpoint, body, response.text)
            if response.status_code >= 400:
                expect_error(response, response.status_code)
            elif endpoint == "/v1/adapters":  # an odd value loaded something: unload it again
                client.delete(f"{servers[endpoint].url}/v1/adapters/{response.json()['loaded']}")
    assert statuses.get(400, 0) > len(bodies) // 2  # most are refused; the sweep really reached the checks
    for endpoint in ("/v1/completions", "/v1/classify"):
        assert counted(servers[endpoint].url, endpoint, 500) == 0
