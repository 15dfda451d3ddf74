"""Every registered combiner has conformance cases in one of the combiner conformance files."""

from __future__ import annotations

import adapterkit as ak
from tests.compose import test_combiners, test_combiners_fuse, test_combiners_route


def test_every_registered_combiner_has_cases() -> None:
    covered = set(test_combiners.CASES) | set(test_combiners_fuse.CASES) | set(test_combiners_route.CASES)
    assert sorted(covered) == ak.compose.available()
