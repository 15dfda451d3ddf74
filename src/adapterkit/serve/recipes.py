"""Virtual adapters: a combination recipe over loaded adapters, built once and then served under its own name.

``POST /v1/adapters {"name": "mix1", "combine": {"sources": ["a", "b"], "weights": [0.5, 0.5], "how": "cat"}}``
combines the loaded sources with ``arith.combine.combine`` (the same call as ``ak.combine``, every type peft's
``add_weighted_adapter`` defines) into a new LoRA. LoRAX merges its mixes per request; here the mix is made once,
read back through the library's save / read path, and stored as an ordinary entry, so it is served like any loaded
adapter: evicted and re-attached from host memory, mixed with other adapters in one batch. The sources stay loaded
and may be unloaded later: the entry holds tensors of its own. A classifier's combination answers with the first
source's head and labels (as ``adapterkit combine`` saves the first run's head).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from adapterkit.arith.combine import combine
from adapterkit.core.errors import AdapterKitError
from adapterkit.inject.engine import detach, set_active
from adapterkit.inject.record import read
from adapterkit.inject.state import save
from adapterkit.serve.requests import _STRICT, ApiError, _field_error, _json_type
from adapterkit.serve.store import BASE_NAME, AdapterStore, BadNameError, Entry, check_name


class Recipe(BaseModel):
    """A combination of loaded adapters: the arguments of ``ak.combine`` but the model and the new name."""

    model_config = _STRICT
    sources: list[str]
    weights: list[float]
    how: str
    density: float | None = None
    majority_sign_method: str = "total"
    rank: int | None = None
    seed: int = 0


class RecipeError(AdapterKitError, ValueError):
    """A recipe that cannot be built from what is loaded (answered with 400)."""


def parse_recipe(data: Any) -> Recipe:
    """The ``combine`` field of a load request as a Recipe; a one-line 400 naming the bad field otherwise."""
    if not isinstance(data, dict):
        raise ApiError(400, f"combine: must be an object (sources, weights, how, ...), got {_json_type(data)}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ApiError(400, f"combine.{_field_error(exc, Recipe)}") from None


def add_combined(store: AdapterStore, name: str, recipe: Recipe) -> Entry:
    """Build adapter ``name`` from ``recipe`` over the store's loaded adapters and keep it like a loaded one.

    Raises:
        BadNameError: an invalid or reserved name.
        AlreadyLoadedError: ``name`` is loaded already.
        RecipeError: a source that is not loaded, or more distinct sources than can be attached at once.
        SpecError: what ``combine`` refuses (unknown type, bad weights, density or rank, unequal ranks, ...).
    """
    check_name(name)
    if name == BASE_NAME:
        raise BadNameError(f"adapter name {BASE_NAME!r} is reserved for the base model")
    with store.lock:  # the sources must stay attached, and the model unchanged, while the mix is made
        store.check_new(name)
        for source in recipe.sources:
            if check_name(source) not in store.entries:
                raise RecipeError(f"combine: source {source!r} is not loaded (GET /v1/adapters lists the loaded "
                                  "ones)")
        distinct = list(dict.fromkeys(recipe.sources))
        if len(distinct) > store.max_resident:  # combining reads every source from the model at once
            raise RecipeError(f"combine: {len(distinct)} sources must be attached at once, but at most "
                              f"{store.max_resident} can be resident")
        store.ensure_resident(distinct)
        model = store.model
        combine(model, recipe.sources, recipe.weights, recipe.how, name, density=recipe.density,
                majority_sign_method=recipe.majority_sign_method, rank=recipe.rank, seed=recipe.seed)
        try:
            # through the one save / read path: the entry is exactly what a saved folder of the mix would hold
            with tempfile.TemporaryDirectory() as tmp:
                save(model, tmp, name, modules=())
                record, tensors = read(Path(tmp))
        finally:
            detach(model, name)  # re-attached below as a store entry, so residency counts it
            set_active(model, [])
        first = store.entries[recipe.sources[0]]
        entry = Entry(name, first.folder, record, {k: v for k, v in tensors.items() if k.startswith("adapter.")},
                      first.modules, first.labels, recipe=recipe.model_dump())
        return store.insert(entry)
