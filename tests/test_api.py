"""The public surface: under 40 names with one name per concept, namespaces for the catalogue, and the first
release's names still working (with a DeprecationWarning that names the new spelling)."""

from __future__ import annotations

import types

import pytest

import adapterkit as ak
from adapterkit.core.registry import combiners, methods


def test_the_top_level_is_small_and_every_name_exists() -> None:
    assert len(ak.__all__) <= 38
    assert len(set(ak.__all__)) == len(ak.__all__)
    for name in ak.__all__:
        getattr(ak, name)


def test_methods_and_compose_are_the_packages_and_export_every_spec() -> None:
    assert isinstance(ak.methods, types.ModuleType) and ak.methods.__name__ == "adapterkit.methods"
    assert ak.methods.available() == methods() and ak.compose.available() == combiners()
    exported = {getattr(ak.methods, n).method for n in ak.methods.__all__ if n != "available"}
    assert exported == set(methods())
    assert {getattr(ak.compose, n).method for n in ak.compose.__all__ if n != "available"} == set(combiners())
    assert ak.methods.LoRA is ak.LoRA


@pytest.mark.parametrize("old,new", [("Fuse", "ak.Mix"), ("TaskRoute", "ak.Mix"), ("Fusion", "ak.compose.Fusion"),
                                     ("LowBit", "ak.methods.LowBit"), ("attach_poly", "poly_tools.attach_poly"),
                                     ("combiners", "ak.compose.available"), ("spec_class", "registry.spec_class")])
def test_first_release_names_still_work_with_a_warning(old: str, new: str) -> None:
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.").replace("(", r"\(")):
        assert getattr(ak, old) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        ak.Nothing  # noqa: B018


def test_calling_the_methods_namespace_still_lists_them_with_a_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"methods\.available\(\)"):
        assert ak.methods() == methods()  # type: ignore[operator]


def test_one_learned_block_serves_every_combiner_and_round_trips() -> None:
    block = ak.Stack("lang", ak.Mix("a", "b", name="fusion"))
    assert ak.block_from_dict(block.to_dict()) == block
    old = ak.block_from_dict({"block": "fuse", "children": ["a", "b"], "name": "fusion"})  # older JSON still reads
    assert old.children == ("a", "b") and old.name == "fusion"
