"""Combination recipes in the store: a virtual adapter built once with ak.combine and served like a loaded one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import adapterkit as ak
from adapterkit.inject.record import read
from adapterkit.serve.recipes import Recipe, add_combined
from adapterkit.serve.runners import CompletionRunner, Row
from adapterkit.serve.store import AdapterStore
from tests.serve.fixtures import causal_adapters, causal_dir

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.serve.client import LIMIT, server  # noqa: E402
from tests.serve.client import expect_error as _error  # noqa: E402

IDS = tuple(range(4, 12))


@pytest.fixture(scope="module")
def causal(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("recipes")
    causal_dir(root / "model")
    causal_adapters(root / "model", root / "adapters", 4)  # ad0 r2 q/v, ad1 r4 q/o/down, ad2 r6, ad3 r2 q/o/down
    return root / "model", root / "adapters"


def _model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _by_hand(model_dir: Path, adapters: Path, sources: list[str], weights: list[float], how: str,
             **options) -> Any:
    """A fresh model with the sources loaded from their folders and ak.combine's "mix" attached."""
    model = _model(model_dir)
    for source in sources:
        ak.load(model, adapters / source)
    ak.combine(model, sources, weights, how, "mix", **options)
    return model


@torch.no_grad()
def _generate(model: Any, name: str | None, steps: int = 6) -> list[int]:
    with ak.use(model, *([name] if name else [])):
        out = model.generate(torch.tensor([IDS]), max_new_tokens=steps, do_sample=False, pad_token_id=0)
    tokens = out[0, len(IDS):].tolist()
    return tokens[:tokens.index(1)] if 1 in tokens else tokens  # the runner stops at <eos>


@pytest.mark.parametrize("how,options", [("cat", {}), ("svd", {"rank": 3}), ("ties_svd", {"rank": 4, "density": 0.5})])
def test_recipe_equals_the_combination_built_by_hand_also_in_a_mixed_batch(causal, tmp_path, how, options) -> None:
    model_dir, adapters = causal
    model = _model(model_dir)
    store = AdapterStore(model, adapters, max_resident=3)
    store.load_all()
    sources, weights = ["ad0", "ad1"], [0.7, -0.4]
    entry = add_combined(store, "mix", Recipe(sources=sources, weights=weights, how=how, **options))
    assert entry.recipe is not None and entry.recipe["how"] == how
    assert list(store.resident) == ["ad0", "ad1", "mix"]  # the mix counts like any adapter (ad3 was evicted)
    hand = _by_hand(model_dir, adapters, sources, weights, how, **options)
    ak.save(hand, tmp_path / "mix", "mix", modules=())
    _, saved = read(tmp_path / "mix")
    assert sorted(saved) == sorted(entry.tensors)
    assert all(torch.equal(saved[k], entry.tensors[k]) for k in saved)  # the same factors, bit for bit
    runner = CompletionRunner(model, _tokenizer(model_dir), store)
    rows = [Row("mix", IDS, 6), Row("ad3", IDS, 6), Row(None, IDS, 6), Row("ad0", IDS, 6)]  # ad3 comes back
    got = [r["token_ids"] for r in runner(rows)]
    plain = _model(model_dir)
    ak.load(plain, adapters / "ad3")
    ak.load(plain, adapters / "ad0")
    assert got == [_generate(hand, "mix"), _generate(plain, "ad3"), _generate(plain, None), _generate(plain, "ad0")]
    store.remove("ad0")  # the mix holds tensors of its own: a source may go
    assert runner([Row("mix", IDS, 6)])[0]["token_ids"] == got[0]
    assert [row["id"] for row in store.describe()] == ["ad1", "ad2", "ad3", "mix"]
    assert store.describe()[-1]["recipe"]["sources"] == sources


def _tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def lm(causal) -> Iterator[str]:
    with server(causal[0], causal[1], max_resident=3) as running:
        yield running.url


def _post(url: str, body: Any) -> Any:
    return httpx.post(url, json=body, timeout=LIMIT)


def test_load_a_recipe_over_http_answers_as_the_saved_combination(lm, causal) -> None:
    model_dir, adapters = causal
    recipe = {"sources": ["ad0", "ad3"], "weights": [0.5, 0.5], "how": "linear"}  # equal ranks (2): a factor mix
    loaded = _post(f"{lm}/v1/adapters", {"name": "mix1", "combine": recipe})
    assert loaded.status_code == 200 and loaded.json()["loaded"] == "mix1", loaded.text
    hand = _by_hand(model_dir, adapters, ["ad0", "ad3"], [0.5, 0.5], "linear")
    ak.save(hand, adapters / "mixref", "mix", modules=())  # the same combination, served from a folder
    assert _post(f"{lm}/v1/adapters", {"name": "mixref"}).status_code == 200
    body = {"prompt": ["the cat sat on", "a big red dog ran"], "max_tokens": 5}
    answers = [_post(f"{lm}/v1/completions", {**body, "model": m}).json()["choices"] for m in ("mix1", "mixref")]
    assert [c["text"] for c in answers[0]] == [c["text"] for c in answers[1]]
    rows = httpx.get(f"{lm}/v1/adapters", timeout=LIMIT).json()["data"]
    assert next(r for r in rows if r["id"] == "mix1")["recipe"]["sources"] == ["ad0", "ad3"]
    _error(_post(f"{lm}/v1/adapters", {"name": "mix1", "combine": recipe}), 409, "already loaded")
    assert httpx.delete(f"{lm}/v1/adapters/mix1", timeout=LIMIT).status_code == 200


@pytest.mark.parametrize("recipe,words", [
    ({"sources": ["ad0", "nope"], "weights": [1, 1], "how": "cat"}, ("source 'nope' is not loaded",)),
    ({"sources": ["ad0", "ad1"], "weights": [1], "how": "cat"}, ("2 sources need 2 weights",)),
    ({"sources": ["ad0", "ad1"], "weights": [1, "x"], "how": "cat"}, ("combine.weights[1]", "must be a number")),
    ({"sources": ["ad0", "ad1"], "weights": [1, 1], "how": "blend"}, ("unknown combination type 'blend'",)),
    ({"sources": ["ad0", "ad1"], "weights": [1, 1], "how": "ties_svd", "rank": 2, "density": 2.0},
     ("density must be in (0, 1]",)),
    ({"sources": ["ad0", "ad1"], "weights": [1, 1], "how": "ties"}, ("give density",)),
    ({"sources": ["ad0", "ad1"], "weights": [1, 1], "how": "linear"}, ("one rank",)),
    ({"sources": ["ad0", "ad1"], "weights": [1, 1], "how": "svd"}, ("give rank",)),
    ({"sources": ["ad0", "ad1", "ad2", "ad3"], "weights": [1] * 4, "how": "cat"}, ("at most 3 can be resident",)),
    ({"sources": ["ad0"], "weights": [1], "how": "cat", "alpha": 2}, ("combine.alpha: unknown field",)),
    ({"weights": [1], "how": "cat"}, ("combine.sources: required field missing",)),
    ([1, 2], ("combine: must be an object",)),
])
def test_bad_recipes_get_one_line_400s_and_change_nothing(lm, recipe, words) -> None:
    before = httpx.get(f"{lm}/v1/adapters", timeout=LIMIT).json()["data"]
    _error(_post(f"{lm}/v1/adapters", {"name": "bad", "combine": recipe}), 400, *words)
    after = httpx.get(f"{lm}/v1/adapters", timeout=LIMIT).json()["data"]
    assert [r["id"] for r in after] == [r["id"] for r in before]  # residency may move; nothing is added
    assert _post(f"{lm}/v1/completions", {"model": "bad", "prompt": "the cat"}).status_code == 404
