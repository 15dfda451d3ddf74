"""peft's formats for VeRA, LoHa, LoKr, OFT and AdaLoRA (adapter_config.json + adapter_model.safetensors), both
ways.

Keys are peft's saved names: ``base_model.model.<module path>.<peft name>``, with ``vera_lambda_b`` /
``vera_lambda_d``, ``hada_w1_a`` ... ``hada_w2_b``, ``lokr_w1`` / ``lokr_w1_a`` ... ``lokr_w2_b``, ``oft_R.weight``
and ``lora_A`` / ``lora_E`` / ``lora_B``. A VeRA export also holds the shared projections as ``base_model.vera_A`` /
``base_model.vera_B`` (``save_projection: true``), which an import checks against the ones its seed draws. peft
stores only the AdaLoRA triplets its ``rank_pattern`` keeps: an export of a pruned adapter writes the kept rows and
the pattern, an import puts them back at their places in the full ``init_r`` (the others zero); ``ranknum`` is not
stored (it is init_r). Options adapterkit cannot reproduce (rank / alpha patterns, effective conv, COFT, block
sharing, biases, saved modules) are refused with a one-line ``StateError`` naming the file; training-time dropouts
peft has and adapterkit's forms lack are dropped with a warning (they do not change what the adapter computes).
Everything is checked before the model changes.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import nn

from adapterkit.core.errors import AdapterKitError, StateError
from adapterkit.core.files import atomic_write
from adapterkit.core.host import HOST_ATTR
from adapterkit.core.layers import is_conv1d, layer_info
from adapterkit.core.spec import AdapterSpec
from adapterkit.inject.engine import attach, detach, placements
from adapterkit.interop.peft_format import CONFIG, PREFIX, WEIGHTS, is_causal_lm_model
from adapterkit.methods.adalora import AdaLoRA
from adapterkit.methods.loha import LoHa
from adapterkit.methods.lokr import LoKr
from adapterkit.methods.oft import OFT
from adapterkit.methods.vera import VeRA, projections

# method -> (peft_type, our parameter name -> peft's key suffix)
NAMES: dict[str, tuple[str, dict[str, str]]] = {
    "vera": ("VERA", {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d"}),
    "loha": ("LOHA", {n: f"hada_{n}" for n in ("w1_a", "w1_b", "w2_a", "w2_b")}),
    "lokr": ("LOKR", {n: f"lokr_{n}" for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}),
    "oft": ("OFT", {"oft_r": "oft_R.weight"}),
    "adalora": ("ADALORA", {"lora_a": "lora_A", "lora_e": "lora_E", "lora_b": "lora_B"}),
}
PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")
_SUFFIX = re.compile(r"(.+)\.(vera_lambda_[bd]|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?|oft_R\.weight|lora_[AEB])")
# (peft key, value meaning "off"): options that change what peft computes and adapterkit has no form of
_REFUSED: tuple[tuple[str, Any], ...] = (
    ("rank_pattern", {}), ("alpha_pattern", {}), ("use_effective_conv2d", False), ("coft", False),
    ("block_share", False), ("bias", "none"), ("modules_to_save", None), ("rank_dropout_scale", False))
_DROPPED = ("rank_dropout", "module_dropout")  # training-time only


def _method_config(spec: AdapterSpec, conv1d: bool) -> dict[str, Any]:
    if isinstance(spec, VeRA):
        return {"peft_type": "VERA", "r": spec.r, "projection_prng_key": spec.seed, "save_projection": True,
                "vera_dropout": spec.dropout, "d_initial": spec.d_initial, "fan_in_fan_out": conv1d, "bias": "none"}
    if isinstance(spec, LoHa | LoKr):
        config = {"peft_type": NAMES[spec.method][0], "r": spec.r, "alpha": spec.alpha, "rank_dropout": 0.0,
                  "module_dropout": 0.0, "use_effective_conv2d": False, "rank_pattern": {}, "alpha_pattern": {}}
        if isinstance(spec, LoKr):
            config.update(decompose_both=spec.decompose_both, decompose_factor=spec.decompose_factor or -1,
                          rank_dropout_scale=False)
        return config
    if isinstance(spec, AdaLoRA):  # a total_step peft accepts; it steers training only, not what the adapter computes
        return {"peft_type": "ADALORA", "init_r": spec.init_r, "target_r": spec.target_r, "lora_alpha": spec.alpha,
                "lora_dropout": spec.dropout, "tinit": spec.tinit, "tfinal": spec.tfinal, "deltaT": spec.deltaT,
                "beta1": spec.beta1, "beta2": spec.beta2, "orth_reg_weight": spec.orth_reg_weight,
                "total_step": spec.total_step or spec.tinit + spec.tfinal + 1, "fan_in_fan_out": conv1d,
                "bias": "none", "use_rslora": False, "use_dora": False, "rank_pattern": None, "alpha_pattern": {}}
    assert isinstance(spec, OFT)
    return {"peft_type": "OFT", "r": spec.r, "oft_block_size": spec.block_size, "module_dropout": 0.0,
            "fan_in_fan_out": False, "bias": "none", "coft": False, "eps": 6e-5, "block_share": False,
            "use_cayley_neumann": spec.cayley == "neumann", "num_cayley_neumann_terms": spec.neumann_terms,
            "peft_version": "0.18.0"}  # the Cayley-Neumann series as peft computes it since 0.18.0


def export_peft_tuner(model: nn.Module, name: str, out: str | Path, base_model_name_or_path: str | None = None
                      ) -> Path:
    """Write adapter ``name`` (VeRA, LoHa, LoKr, OFT or AdaLoRA) of ``model`` in peft's format;
    ``PeftModel.from_pretrained`` loads it and computes the same outputs."""
    where = placements(model, name)
    spec = where[0][2].adapter(name).spec
    if spec.method not in NAMES:
        raise StateError(f"export: adapter {name!r} is {spec.method}; this peft format holds {', '.join(NAMES)} "
                         "(lora and dora: interop.peft_format)")
    tensors: dict[str, torch.Tensor] = {}
    for path, module, host in where:
        adapter = host.adapter(name)
        if adapter.spec != spec:
            raise StateError(f"export: adapter {name!r} has another spec at {path}; peft's config holds one")
        if is_conv1d(module) and spec.method not in ("vera", "adalora"):
            raise StateError(f"export: {path} is a GPT-2 Conv1D, which peft's {spec.method} cannot adapt")
        for pname, param in adapter.named_parameters():
            tensors[f"{PREFIX}{path}.{NAMES[spec.method][1][pname]}"] = param.detach().cpu().contiguous()
    if isinstance(spec, VeRA):  # the shared matrices peft draws for the same targets, saved so no draw is trusted
        infos = [layer_info(module) for _, module, _ in where]
        shared = projections(spec.seed, spec.r, max(i.in_features for i in infos), max(i.out_features for i in infos))
        tensors.update(zip(PROJECTIONS, shared, strict=True))
    config = {**_method_config(spec, any(is_conv1d(m) for _, m, _ in where)),
              **({"rank_pattern": _kept_only(tensors, name, where)} if isinstance(spec, AdaLoRA) else {}),
              "target_modules": [path for path, _, _ in where], "modules_to_save": None,
              **({"init_lora_weights": True} if isinstance(spec, AdaLoRA) else {"init_weights": True}),
              "inference_mode": True,
              "task_type": "CAUSAL_LM" if is_causal_lm_model(model) else None,
              "base_model_name_or_path": base_model_name_or_path}
    folder = Path(out)
    atomic_write(folder / WEIGHTS, save_bytes(tensors, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return folder


def _kept_only(tensors: dict[str, torch.Tensor], name: str, where: list[tuple[str, nn.Module, Any]]
               ) -> dict[str, list[bool]] | None:
    """peft's AdaLoRA form: when a triplet is pruned, only the kept rows of each layer and the pattern (by module
    path); None (all tensors whole) while nothing is."""
    masks = {path: host.adapter(name).rank_mask.cpu() for path, _, host in where}
    if all(bool(mask.all()) for mask in masks.values()):
        return None
    for path, keep in masks.items():
        for key, rows in (("lora_A", keep), ("lora_E", keep), ("lora_B", (slice(None), keep))):
            tensors[f"{PREFIX}{path}.{key}"] = tensors[f"{PREFIX}{path}.{key}"][rows].contiguous()
    return {f"{path}.lora_E": keep.tolist() for path, keep in masks.items()}


def import_peft_tuner(model: nn.Module, folder: str | Path, name: str = "default") -> str:
    """Attach the peft VeRA / LoHa / LoKr / OFT / AdaLoRA checkpoint in ``folder`` to ``model`` as ``name``."""
    folder = Path(folder)
    cfg, weights = folder / CONFIG, folder / WEIGHTS
    config, tensors = _read(folder)
    spec = _spec(cfg, config)
    named = dict(model.named_modules())
    found: dict[str, dict[str, torch.Tensor]] = {}
    shared = {key: tensors.pop(key) for key in PROJECTIONS if key in tensors}
    for key, value in tensors.items():
        match = _SUFFIX.fullmatch(key[len(PREFIX):]) if key.startswith(PREFIX) else None
        if match is None:
            raise StateError(f"{weights}: tensor {key!r} is not a {spec.method} tensor of peft's format")
        if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
            raise StateError(f"{weights}: tensor {key} is {value.dtype} with non-finite or non-float values")
        found.setdefault(match.group(1), {})[match.group(2)] = value
    if not found:
        raise StateError(f"{weights}: no {spec.method} tensors here")
    missing = sorted(p for p in found if p not in named or HOST_ATTR in p.split("."))
    if missing:
        raise StateError(f"{weights}: adapter targets {missing[0]!r}, which this model does not have")
    paths = [p for p in named if p in found]  # model order: the order attach builds in
    for path in paths:
        try:
            spec.check_target(named[path], path)
        except AdapterKitError as exc:
            raise StateError(f"{cfg}: {exc}") from None
    cuda = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda):  # the init is overwritten at once: leave the caller's stream alone
        attach(model, name, spec, [f"re:{re.escape(p)}" for p in paths])
    try:
        _copy(weights, model, name, spec, found, shared, _pattern(cfg, config) if isinstance(spec, AdaLoRA) else {})
    except BaseException:
        detach(model, name)
        raise
    return name


def _copy(weights: Path, model: nn.Module, name: str, spec: AdapterSpec, found: dict[str, dict[str, torch.Tensor]],
          shared: dict[str, torch.Tensor], pattern: dict[str, list[bool]]) -> None:
    renames = NAMES[spec.method][1]
    stray = sorted(set(pattern) - set(found))
    if stray:
        raise StateError(f"{weights}: rank_pattern names {stray[0]!r}, which holds no adapter tensors here")
    with torch.no_grad():
        for path, _, host in placements(model, name):
            adapter = host.adapter(name)
            ours = dict(adapter.named_parameters())
            wanted = {renames[p] for p in ours}
            if set(found[path]) != wanted:
                odd = sorted(set(found[path]) ^ wanted)[0]
                raise StateError(f"{weights}: {path}.{odd} is {'missing' if odd in wanted else 'unexpected'} for "
                                 f"this {spec.method} spec (r, decompose_* or block sizes in {CONFIG})")
            if isinstance(spec, AdaLoRA):
                _scatter(weights, path, adapter, found[path], pattern.get(path, [True] * spec.init_r))
                continue
            for pname, param in ours.items():
                value = found[path][renames[pname]]
                if tuple(value.shape) != tuple(param.shape):
                    raise StateError(f"{weights}: {path}.{renames[pname]} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(param.shape)}")
                param.copy_(value)
            if isinstance(spec, VeRA) and shared:  # our slices must be the file's: else outputs would differ
                for key, mine in zip(PROJECTIONS, (adapter.vera_a, adapter.vera_b), strict=True):
                    theirs = shared[key][: mine.shape[0], : mine.shape[1]] if key in shared else None
                    if theirs is None or not torch.equal(theirs.to(mine), mine):
                        raise StateError(f"{weights}: {key} differs from the matrix projection_prng_key "
                                         f"{spec.seed} draws here (or is missing); adapterkit cannot load it")


def _pattern(cfg: Path, config: dict[str, Any]) -> dict[str, list[bool]]:
    """An AdaLoRA config's rank_pattern by module path (keys ``<path>.lora_E``, or peft's in-training
    ``<path>.lora_E.<adapter>``)."""
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        raise StateError(f"{cfg}: rank_pattern must be an object of '<module>.lora_E': [bools]")
    out = {}
    for key, keep in pattern.items():
        path, found, _ = key.partition(".lora_E")
        if not found or not isinstance(keep, list) or not all(isinstance(k, bool) for k in keep):
            raise StateError(f"{cfg}: rank_pattern entry {key[:60]!r} is not '<module>.lora_E': [bools]")
        out[path] = keep
    return out


def _scatter(weights: Path, path: str, adapter: Any, theirs: dict[str, torch.Tensor], keep: list[bool]) -> None:
    """Copy peft's kept AdaLoRA triplets into the rows ``keep`` marks of the full-rank adapter; the rest zero."""
    mask = torch.tensor(keep, dtype=torch.bool)
    if mask.numel() != adapter.lora_e.shape[0]:
        raise StateError(f"{weights}: rank_pattern of {path} has {mask.numel()} entries, init_r is "
                         f"{adapter.lora_e.shape[0]}")
    kept = int(mask.sum())
    for key, param, rows in (("lora_A", adapter.lora_a, mask), ("lora_E", adapter.lora_e, mask),
                             ("lora_B", adapter.lora_b, (slice(None), mask))):
        value = theirs[key]
        want = param[rows].shape
        if tuple(value.shape) != tuple(want):
            raise StateError(f"{weights}: {path}.{key} has shape {tuple(value.shape)}, expected {tuple(want)} "
                             f"({kept} of {mask.numel()} triplets kept)")
        param.zero_()
        param[rows] = value.to(param)
    adapter.rank_mask.copy_(mask)


def _spec(cfg: Path, config: dict[str, Any]) -> AdapterSpec:
    kinds = {peft_type: method for method, (peft_type, _) in NAMES.items()}
    kind = kinds.get(config.get("peft_type"))  # type: ignore[arg-type]
    if kind is None:
        raise StateError(f"{cfg}: peft_type {config.get('peft_type')!r}; this import reads {', '.join(kinds)}")
    for key, off in _REFUSED:
        if kind == "adalora" and key == "rank_pattern":  # AdaLoRA's rank_pattern: the kept triplets, read by _copy
            continue
        if config.get(key) and config[key] != off:
            raise StateError(f"{cfg}: {key} is {json.dumps(config[key])[:40]}; adapterkit cannot reproduce it")
    for key in (*_DROPPED, *(("vera_dropout",) if kind != "vera" else ())):
        if config.get(key):
            warnings.warn(f"{cfg}: ignoring {key}={config[key]} (training-time only; adapterkit's {kind} has "
                          "none)", stacklevel=3)
    try:
        if kind == "vera":
            return VeRA(r=config["r"], d_initial=float(config.get("d_initial", 0.1)),
                        dropout=float(config.get("vera_dropout") or 0.0), seed=config.get("projection_prng_key", 0))
        if kind == "loha":
            return LoHa(r=config["r"], alpha=float(config.get("alpha", 8)))
        if kind == "lokr":
            factor = config.get("decompose_factor", -1)
            return LoKr(r=config["r"], alpha=float(config.get("alpha", 8)),
                        decompose_both=config.get("decompose_both", False),
                        decompose_factor=None if factor == -1 else factor)
        if kind == "adalora":
            return AdaLoRA(init_r=config.get("init_r", 12), target_r=config.get("target_r", 8),
                           alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout") or 0.0),
                           tinit=config.get("tinit", 0), tfinal=config.get("tfinal", 0),
                           deltaT=config.get("deltaT", 1), beta1=float(config.get("beta1", 0.85)),
                           beta2=float(config.get("beta2", 0.85)),
                           orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
                           total_step=config.get("total_step"))
        return OFT(r=config.get("r", 0), block_size=config.get("oft_block_size", 32),
                   cayley="neumann" if config.get("use_cayley_neumann", True) else "exact",
                   neumann_terms=config.get("num_cayley_neumann_terms", 5))
    except KeyError as exc:
        raise StateError(f"{cfg}: {exc.args[0]} is missing") from None
    except (AdapterKitError, TypeError, ValueError) as exc:
        raise StateError(f"{cfg}: {exc}") from None


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg, weights = folder / CONFIG, folder / WEIGHTS
    if not cfg.exists() or not weights.exists():
        raise StateError(f"{folder}: needs {CONFIG} and {WEIGHTS} (safetensors; a pickled .bin is never loaded)")
    try:
        config = json.loads(cfg.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise StateError(f"{cfg}: not readable JSON ({(str(exc).splitlines() or ['?'])[0]})") from None
    if not isinstance(config, dict):
        raise StateError(f"{cfg}: must hold a JSON object, got {type(config).__name__}")
    try:
        tensors = load_bytes(weights.read_bytes())
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StateError(f"{weights}: not a valid safetensors file ({(str(exc).splitlines() or ['?'])[0]})") from None
    return config, tensors
