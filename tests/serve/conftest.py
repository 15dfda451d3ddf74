"""Model and adapter folders for the serving tests, built once per test module (a module may add folders)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve.fixtures import ADAPTERS, causal_adapters, causal_dir, classifier_adapters, classifier_dir


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama with ADAPTERS LoRA adapters, and a tiny BERT classifier with three run folders (2, 4, 3
    labels)."""
    root = tmp_path_factory.mktemp("serve")
    causal_dir(root / "lm")
    causal_adapters(root / "lm", root / "lm_adapters", ADAPTERS)
    classifier_dir(root / "cls")
    classifier_adapters(root / "cls", root / "cls_runs", [2, 4, 3])
    return {"root": root, "lm": root / "lm", "lm_adapters": root / "lm_adapters", "cls": root / "cls",
            "cls_runs": root / "cls_runs"}
