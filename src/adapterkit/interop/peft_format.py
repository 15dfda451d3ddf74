"""peft's LoRA format (adapter_config.json + adapter_model.safetensors): the format vLLM, LoRAX and mergekit read.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``lora_embedding_A`` / ``_B``
for embeddings, ``lora_magnitude_vector`` for DoRA); modules saved with the adapter are stored under
``base_model.model.<module path>.<param>``. LoRA, rsLoRA and DoRA round-trip; other methods have no peft form here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from adapterkit.core.errors import StateError
from adapterkit.core.files import atomic_write
from adapterkit.core.layers import is_conv1d, layer_info
from adapterkit.inject.engine import attach, placements
from adapterkit.inject.state import module_tensors
from adapterkit.methods.dora import DoRA
from adapterkit.methods.lora import LoRA

PREFIX = "base_model.model."


def export_peft(model: nn.Module, name: str, out: str | Path, modules: tuple[str, ...] = (),
                base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` of ``model`` (and the named extra modules) in peft's LoRA format."""
    folder = Path(out)
    spec = None
    tensors: dict[str, torch.Tensor] = {}
    where = placements(model, name)
    for path, module, host in where:
        adapter = host.adapter(name)
        spec = adapter.spec
        if not isinstance(spec, LoRA):
            raise StateError(f"export: adapter {name!r} is {spec.method}; peft's LoRA format holds lora and dora only")
        lora = adapter.lora if isinstance(spec, DoRA) else adapter
        stem = "lora_embedding_" if layer_info(module).kind == "embedding" else "lora_"
        suffix = "" if stem == "lora_embedding_" else ".weight"
        tensors[f"{PREFIX}{path}.{stem}A{suffix}"] = lora.lora_a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{path}.{stem}B{suffix}"] = lora.lora_b.detach().cpu().contiguous()
        if isinstance(spec, DoRA):
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = adapter.magnitude.detach().cpu().contiguous()
    assert spec is not None
    tensors.update(module_tensors(model, modules, PREFIX)[1])
    config = {
        "peft_type": "LORA", "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "use_rslora": spec.scaling == "rslora", "use_dora": isinstance(spec, DoRA), "bias": "none",
        "target_modules": [path for path, _, _ in where], "modules_to_save": sorted(set(modules)) or None,
        "fan_in_fan_out": any(is_conv1d(module) for _, module, _ in where),
        "init_lora_weights": True, "inference_mode": True, "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    atomic_write(folder / "adapter_model.safetensors", save_bytes(tensors, metadata={"format": "pt"}))
    atomic_write(folder / "adapter_config.json", (json.dumps(config, indent=2) + "\n").encode())
    return folder


def import_peft(model: nn.Module, folder: str | Path, name: str = "default") -> str:
    """Attach the peft LoRA/DoRA checkpoint in ``folder`` to ``model`` as ``name``, with its saved modules."""
    folder = Path(folder)
    try:
        config: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_bytes((folder / "adapter_model.safetensors").read_bytes())
    except (OSError, ValueError, SafetensorError) as exc:
        raise StateError(f"{folder}: not a readable peft adapter ({exc})") from None
    if config.get("peft_type") != "LORA":
        raise StateError(f"{folder}: peft_type {config.get('peft_type')!r}; only LORA checkpoints import")
    cls = DoRA if config.get("use_dora") else LoRA
    spec = cls(r=int(config["r"]), alpha=float(config["lora_alpha"]), dropout=float(config.get("lora_dropout") or 0.0),
               scaling="rslora" if config.get("use_rslora") else "lora")
    pattern = re.compile(rf"^{re.escape(PREFIX)}(.+)\.lora_(?:embedding_)?A(?:\.weight)?$")
    paths = [m.group(1) for key in tensors if (m := pattern.match(key))]
    if not paths:
        raise StateError(f"{folder}: no lora_A tensors in adapter_model.safetensors")
    attach(model, name, spec, [f"re:{re.escape(p)}" for p in paths])
    with torch.no_grad():
        for path, _, host in placements(model, name):
            adapter = host.adapter(name)
            lora = adapter.lora if isinstance(spec, DoRA) else adapter
            for ours, theirs in (("lora_a", "A"), ("lora_b", "B")):
                value = tensors.get(f"{PREFIX}{path}.lora_{theirs}.weight",
                                    tensors.get(f"{PREFIX}{path}.lora_embedding_{theirs}"))
                getattr(lora, ours).copy_(value)
            if isinstance(spec, DoRA):
                adapter.magnitude.copy_(tensors[f"{PREFIX}{path}.lora_magnitude_vector"])
        named = dict(model.named_modules())
        lora_keys = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.weight)?$")
        for key, value in tensors.items():
            if lora_keys.search(key):
                continue
            path, _, pname = key.removeprefix(PREFIX).rpartition(".")
            if path not in named:
                raise StateError(f"{folder}: saved module {path!r} is not in this model")
            getattr(named[path], pname).copy_(value)
    return name
