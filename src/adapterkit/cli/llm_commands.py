"""`adapterkit train` and `eval` for causal LMs: supervised fine-tuning on instruction / chat data, and evaluation.

Placeholder wiring: the helper that owns this file replaces the bodies.
"""

from __future__ import annotations

import argparse
from typing import Any

from adapterkit.core.errors import AdapterKitError


def wants_causal_lm(args: argparse.Namespace) -> bool:
    """Whether `adapterkit train` should fine-tune a causal LM: ``--task causal-lm``, or a causal LM as --model."""
    task = getattr(args, "task", "auto")
    if task != "auto":
        return bool(task == "causal-lm")
    if not args.model:
        return False
    from adapterkit.models import is_causal_lm, resolve

    return is_causal_lm(resolve(args.model))


def cmd_train_lm(args: argparse.Namespace) -> int:
    raise AdapterKitError("causal-LM training is not wired yet")


def cmd_eval_lm(args: argparse.Namespace, record: dict[str, Any]) -> int:
    raise AdapterKitError("causal-LM evaluation is not wired yet")
