"""combine against peft 0.21.2's add_weighted_adapter on the same exported LoRAs (every combination type, rsLoRA,
different ranks and targets, negation, GPT-2's Conv1D), plus non-LoRA sources, save / load / merge and bad input."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.arith.combine import HOWS, SVD_HOWS, combine
from adapterkit.core.errors import AdapterKitError
from adapterkit.core.layers import is_conv1d, read_weight
from adapterkit.core.tree import placements
from adapterkit.interop.peft_format import export_peft
from tests.conftest import logits, make_tiny, randomize, tokens

WEIGHTS = [0.8, -0.5, 1.2]  # a negative weight: task arithmetic negation
SEED = 7
# the first source is plain LoRA: peft copies the first source's rsLoRA flag onto the combined adapter
EQUAL = [ak.LoRA(r=4, alpha=8), ak.LoRA(r=4, alpha=4, scaling="rslora"), ak.LoRA(r=4, alpha=16)]
UNEQUAL = [ak.LoRA(r=2, alpha=4), ak.LoRA(r=4, alpha=4, scaling="rslora"), ak.LoRA(r=6, alpha=3)]
TARGETS = {"llama": [["q_proj", "v_proj"], ["q_proj", "k_proj"], ["q_proj", "v_proj", "down_proj"]],
           "gpt2": [["c_attn"], ["c_attn", "c_fc"], ["c_proj"]]}


def _sources(kind: str, specs: list[ak.LoRA]) -> nn.Module:
    model = make_tiny(kind)
    for i, (spec, targets) in enumerate(zip(specs, TARGETS[kind][: len(specs)], strict=True)):
        ak.attach(model, f"s{i}", spec, targets)
        randomize(model, f"s{i}", scale=0.15, seed=10 + i)  # deltas of order 1: the 1e-5 bound means something
    return model


def _peft_combined(kind: str, model: nn.Module, tmp: Path, how: str, **options: Any) -> Any:
    """The same sources loaded into peft and combined by add_weighted_adapter (its DARE masks seeded like ours)."""
    names = [n for n in ak.adapters(model) if n.startswith("s")]
    for n in names:
        export_peft(model, n, tmp / n)
    theirs: Any = peft.PeftModel.from_pretrained(make_tiny(kind), tmp / names[0], adapter_name=names[0]).eval()
    for n in names[1:]:
        theirs.load_adapter(tmp / n, adapter_name=n)
    lora_model: Any = theirs.base_model
    inject = lora_model.inject_adapter

    def inject_then_seed(*args: Any, **kwargs: Any) -> Any:  # the new adapter's init draws from the global RNG
        out = inject(*args, **kwargs)
        torch.manual_seed(SEED)  # so peft's masks are the draws right after manual_seed, as ours from the seed
        return out

    lora_model.inject_adapter = inject_then_seed
    lora_model.add_weighted_adapter(names, WEIGHTS[: len(names)], "combo", combination_type=how, **options)
    return theirs


def _max_error(model: nn.Module, theirs: Any, paths: list[str]) -> float:
    modules = dict(theirs.base_model.model.named_modules())
    assert {p for p, m in modules.items() if "combo" in getattr(m, "lora_A", {})} == set(paths)  # union of targets
    worst = 0.0
    for path, module, host in placements(model, "combo"):
        ours = host.adapter("combo").delta_weight().detach()
        reference = modules[path].get_delta_weight("combo").detach()
        reference = reference.t() if is_conv1d(module) else reference
        assert ours.shape == reference.shape and reference.abs().max() > 1e-2
        worst = max(worst, float((ours - reference).abs().max()))
    return worst


def _options(how: str, rank: int | None = 6) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if how in SVD_HOWS:
        options["svd_rank"] = rank
    if how not in ("cat", "linear", "svd"):
        options["density"] = 0.5
    return options


def _ours(model: nn.Module, how: str, options: dict[str, Any], method: str = "total") -> list[str]:
    sources = [n for n in ak.adapters(model) if n.startswith("s")]
    return combine(model, sources, WEIGHTS[: len(sources)], how, "combo", density=options.get("density"),
                   majority_sign_method=method, rank=options.get("svd_rank"), seed=SEED)


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("how", HOWS)
def test_every_type_matches_peft_on_equal_ranks(how: str, tmp_path: Path) -> None:
    model = _sources("llama", EQUAL)
    options = _options(how)
    paths = _ours(model, how, options)
    theirs = _peft_combined("llama", model, tmp_path, how, **options)
    assert _max_error(model, theirs, paths) < 1e-5
    if how.startswith("dare"):  # the agreement comes from drawing peft's masks: another seed draws others
        ak.detach(model, "combo")
        combine(model, ["s0", "s1", "s2"], WEIGHTS, how, "combo", density=0.5, rank=options.get("svd_rank"),
                seed=SEED + 1)
        assert _max_error(model, theirs, paths) > 1e-2


@pytest.mark.parametrize("how", ["cat", *SVD_HOWS])
def test_cat_and_svd_types_take_different_ranks(how: str, tmp_path: Path) -> None:
    model = _sources("llama", UNEQUAL)
    options = _options(how, rank=5)
    paths = _ours(model, how, options)
    assert _max_error(model, _peft_combined("llama", model, tmp_path, how, **options), paths) < 1e-5
    if how == "cat":  # the concatenation is exactly the weighted delta sum, at the sum of present ranks
        q = "model.layers.0.self_attn.q_proj"
        host = next(h for p, _, h in placements(model, "combo") if p == q)
        assert host.adapter("combo").lora_a.shape[0] == 2 + 4 + 6
        expected = sum(w * host.adapter(f"s{i}").delta_weight() for i, w in enumerate(WEIGHTS))
        torch.testing.assert_close(host.adapter("combo").delta_weight(), expected, atol=1e-6, rtol=1e-5)
    ak.detach(model, "combo")
    with pytest.raises(AdapterKitError, match="needs one rank"):  # as peft: factor types need one rank
        _ours(model, "linear", {})


@pytest.mark.filterwarnings("ignore:The density")
@pytest.mark.parametrize("how", ["cat", "linear", "ties", "dare_ties", "svd", "dare_linear_svd", "ties_svd"])
def test_gpt2_conv1d_matches_peft(how: str, tmp_path: Path) -> None:
    model = _sources("gpt2", EQUAL)
    options = _options(how)
    paths = _ours(model, how, options, method="frequency")
    theirs = _peft_combined("gpt2", model, tmp_path, how, majority_sign_method="frequency", **options)
    assert _max_error(model, theirs, paths) < 1e-5


def test_negation_subtracts_a_source() -> None:
    model = _sources("llama", EQUAL[:2])
    combine(model, ["s0", "s1"], [1.0, -1.0], "cat", "diff")
    for _, _, host in placements(model, "diff"):
        present = [n for n in ("s0", "s1") if n in host.names()]
        expected = sum((1.0 if n == "s0" else -1.0) * host.adapter(n).delta_weight() for n in present)
        torch.testing.assert_close(host.adapter("diff").delta_weight(), expected, atol=1e-6, rtol=1e-5)
    ids = tokens()
    combine(model, ["s0", "s0"], [1.0, -1.0], "svd", "zero", rank=2)  # a task minus itself: the base model
    with ak.use(model, "zero"):
        torch.testing.assert_close(logits(model, ids), logits(make_tiny("llama"), ids), atol=1e-5, rtol=1e-5)


def test_linear_mixes_factors_not_deltas_and_one_source_is_a_weighted_copy() -> None:
    model = _sources("llama", EQUAL[:2])
    combine(model, ["s0", "s1"], [0.6, 0.9], "linear", "lin")
    combine(model, ["s0", "s1"], [0.6, 0.9], "cat", "sum")
    q = next(h for p, _, h in placements(model, "lin") if p.endswith("0.self_attn.q_proj"))
    gap = (q.adapter("lin").delta_weight() - q.adapter("sum").delta_weight()).abs().max()
    assert gap > 1e-2  # the cross terms B_j A_k
    combine(model, ["s1"], [-0.7], "ties_svd", "one", density=0.2, rank=1)  # peft: one source is linear
    torch.testing.assert_close(q.adapter("one").delta_weight(), -0.7 * q.adapter("s1").delta_weight())


def test_an_rslora_first_source_keeps_our_delta_the_factor_product(tmp_path: Path) -> None:
    model = make_tiny("llama")
    for i, spec in enumerate((EQUAL[1], EQUAL[0])):
        ak.attach(model, f"s{i}", spec, ["q_proj"])
        randomize(model, f"s{i}", scale=0.15, seed=i)
    paths = combine(model, ["s0", "s1"], WEIGHTS[:2], "cat", "combo")
    theirs = _peft_combined("llama", model, tmp_path, "cat")
    layer = theirs.base_model.model.get_submodule(paths[0])
    product = layer.lora_B["combo"].weight @ layer.lora_A["combo"].weight
    ours = dict((p, h) for p, _, h in placements(model, "combo"))[paths[0]].adapter("combo").delta_weight()
    torch.testing.assert_close(ours, product, atol=1e-5, rtol=0)  # the same factors
    # peft copies s0's rsLoRA flag onto the combined adapter: its layer scales that product by r / sqrt(r)
    torch.testing.assert_close(layer.get_delta_weight("combo"), product * 8**0.5, atol=1e-5, rtol=1e-5)


def test_svd_types_take_any_mergeable_source_by_its_delta() -> None:
    model = make_tiny("llama")
    ak.attach(model, "lora", ak.LoRA(r=2), ["q_proj", "down_proj"])
    ak.attach(model, "dora", ak.DoRA(r=2), ["q_proj"])
    ak.attach(model, "ia3", ak.IA3(position="input"), ["down_proj"])
    for i, n in enumerate(("lora", "dora", "ia3")):
        randomize(model, n, scale=0.2, seed=i)
    weights = {"lora": 0.5, "dora": -1.5, "ia3": 2.0}
    combine(model, list(weights), list(weights.values()), "svd", "mix", rank=64)  # full rank: exact
    for path, _, host in placements(model, "mix"):
        expected = torch.zeros(())
        for n, w in weights.items():
            if n in host.names():
                merged = copy.deepcopy(model)
                ak.merge(merged, n)
                change = read_weight(merged.get_submodule(path))[0] - read_weight(model.get_submodule(path))[0]
                expected = expected + w * change
        torch.testing.assert_close(host.adapter("mix").delta_weight(), expected, atol=2e-6, rtol=1e-5)
    with pytest.raises(AdapterKitError, match="not a LoRA"):
        combine(model, ["lora", "dora"], [1.0, 1.0], "ties", "x", density=0.5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_combined_adapter_saves_loads_and_merges(kind: str, tmp_path: Path) -> None:
    model = _sources(kind, UNEQUAL)
    combine(model, ["s0", "s1", "s2"], WEIGHTS, "dare_ties_svd", "combo", density=0.7, rank=3, seed=1)
    ids = tokens()
    with ak.use(model, "combo"):
        before = logits(model, ids)
    assert not torch.allclose(before, logits(make_tiny(kind), ids), atol=1e-3)  # it changes the model
    ak.save(model, tmp_path / "combo", name="combo")
    fresh = make_tiny(kind)
    assert ak.load(fresh, tmp_path / "combo") == "combo"
    with ak.use(fresh, "combo"):
        torch.testing.assert_close(logits(fresh, ids), before, rtol=0, atol=0)
    ak.merge(model, "combo")
    with ak.use(model, "combo"):
        torch.testing.assert_close(logits(model, ids), before, atol=1e-5, rtol=1e-5)


def test_bad_input_is_a_one_line_error() -> None:
    model = _sources("llama", UNEQUAL)
    ak.attach(model, "bn", ak.SeqBottleneck(hidden=4), ["down_proj"])
    ak.attach(model, "emb", ak.LoRA(r=2), ["embed_tokens"])
    ak.attach(model, "dora", ak.DoRA(r=2), ["v_proj"])
    ak.merge(model, "s0")  # s0 adapts v_proj: DoRA's delta there would be read off a merged weight
    two, w2 = ["s0", "s1"], [1.0, 1.0]
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(sources=two, weights=[1.0], how="cat"), "need 2 weights"),
        (dict(sources=two, weights=w2, how="average"), "unknown combination type"),
        (dict(sources=two, weights=w2, how="ties_svd", density=0.0, rank=2), r"density must be in \(0, 1\]"),
        (dict(sources=two, weights=w2, how="dare_linear_svd", density=1.5, rank=2), r"density must be in \(0, 1\]"),
        (dict(sources=two, weights=w2, how="ties_svd", rank=2), "give density"),
        (dict(sources=["s2", "bn"], weights=w2, how="svd", rank=2), "cannot be merged"),
        (dict(sources=["s0", "nope"], weights=w2, how="cat"), "no adapter named 'nope'"),
        (dict(sources=two, weights=w2, how="cat", name="s2"), "already attached"),
        (dict(sources=two, weights=w2, how="svd"), "give rank"),
        (dict(sources=two, weights=w2, how="cat", rank=2), "rank must be a positive integer"),
        (dict(sources=two, weights=w2, how="linear"), "needs one rank"),
        (dict(sources=two, weights=w2, how="ties_svd", density=0.5, rank=2, majority_sign_method="mean"),
         "majority_sign_method"),
        (dict(sources=[], weights=[], how="cat"), "at least one source"),
        (dict(sources=["s0", "emb"], weights=w2, how="svd", rank=2), "Linear / Conv1D layers only"),
        (dict(sources=["dora", "s1"], weights=w2, how="svd", rank=2), "unmerge first"),
    ]
    for kwargs, message in cases:
        kwargs.setdefault("name", "new")
        with pytest.raises(AdapterKitError, match=message) as info:
            combine(model, **kwargs)
        assert "\n" not in str(info.value)
    assert "new" not in ak.adapters(model)  # nothing was attached by a refused call
