"""peft's LoRA format (adapter_config.json + adapter_model.safetensors): the format vLLM, LoRAX and mergekit read.

Keys are ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight`` (``lora_embedding_A`` / ``_B``
for embeddings, ``lora_magnitude_vector`` for DoRA); modules saved with the adapter are stored under
``base_model.model.<module path>.<param>``. LoRA, rsLoRA and DoRA round-trip, with a rank and alpha per module
(peft's ``rank_pattern`` / ``alpha_pattern``); other methods have no peft form here.

An import checks the whole folder before it changes the model: a missing or misshapen tensor, a config key of the
wrong type, a peft option adapterkit cannot reproduce is a one-line ``StateError`` naming the file. Our exports also
carry, in the weights file's header, a sha256 of the tensors and the config values they were written with, so a
flipped byte or a config left by an export killed between the two files is refused, not loaded as garbage.

An export of a causal LM's adapter names ``task_type: CAUSAL_LM`` (``PeftModel.from_pretrained`` then builds a
``PeftModelForCausalLM``, whose ``generate`` is the base model's), and warns, one ``VllmWarning`` line each, about
what vLLM refuses or reads otherwise than peft (``vllm_notes``).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
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
from adapterkit.inject.record import tensors_sha256
from adapterkit.inject.state import module_tensors
from adapterkit.methods.dora import DoRA
from adapterkit.methods.lora import LoRA

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_CHECKED = "adapterkit_check"  # header entry of our exports: tensors' sha256 and the config values written with them
_COMPUTES = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")
# peft options that change what the adapter computes and have no adapterkit form: refused when set, never ignored
_UNSUPPORTED = ("lora_bias", "use_qalora", "layer_replication", "target_parameters", "trainable_token_indices",
                "alora_invocation_tokens", "use_bdlora", "arrow_config", "kasa_config", "monteclora_config",
                "velora_config")
# vLLM's --max-lora-rank: its default and the values it accepts (vllm/config/lora.py, ``MaxLoRARanks``)
VLLM_DEFAULT_MAX_RANK, VLLM_MAX_RANKS = 16, (1, 8, 16, 32, 64, 128, 256, 320, 512)
_LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)")


@dataclass(frozen=True)
class _EachModule(AdapterSpec):
    """Attaches one adapter with its own spec at each module (``paths`` and ``specs`` in model order, the order
    ``attach`` builds in): how peft's per-module ranks and alphas come in. Each built adapter holds its own spec."""

    paths: tuple[str, ...] = ()
    specs: tuple[AdapterSpec, ...] = ()

    def check_target(self, base: nn.Module, path: str) -> None:
        self.specs[self.paths.index(path)].check_target(base, path)

    def build_all(self, bases: list[nn.Module]) -> list[nn.Module]:
        return [spec.build(base) for spec, base in zip(self.specs, bases, strict=True)]


class VllmWarning(UserWarning):
    """An exported adapter that vLLM refuses, or that needs a vLLM option to load (see ``vllm_notes``)."""


def is_causal_lm_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers causal LM, by the class-name rule of ``models.is_causal_lm``."""
    return type(model).__name__.endswith(("ForCausalLM", "LMHeadModel"))


def vllm_notes(config: dict[str, Any]) -> list[str]:
    """One line per thing vLLM refuses, or needs told, to serve the peft LoRA that ``config`` describes.

    Checked against vLLM's code (vllm-project/vllm, vllm/lora/peft_helper.py ``PEFTHelper._validate_features`` /
    ``validate_legal`` / ``__post_init__``, vllm/config/lora.py ``LoRAConfig``): it raises for DoRA ("vLLM does not
    yet support DoRA.") and for any ``modules_to_save`` ("vLLM only supports modules_to_save being None."); it
    raises when ``r`` exceeds ``--max-lora-rank`` (default 16, one of 1, 8, 16, 32, ..., 512); and ``PEFTHelper``
    has no ``rank_pattern`` / ``alpha_pattern`` field, so it scales every module by ``lora_alpha / r`` (or
    ``/ sqrt(r)`` with rsLoRA) of the config, whatever the patterns say. (``bias`` is always "none" here.)
    """
    notes = []
    if config.get("use_dora"):
        notes.append("vLLM refuses DoRA adapters (\"vLLM does not yet support DoRA\"); serve this one with peft or "
                     "transformers, or merge it")
    if config.get("modules_to_save"):
        notes.append(f"vLLM refuses adapters with modules_to_save ({', '.join(config['modules_to_save'])}): it "
                     "loads LoRA factors only; export without those modules, or merge")
    rank = int(config["r"])
    if rank > VLLM_DEFAULT_MAX_RANK:
        flag = next(v for v in VLLM_MAX_RANKS if v >= rank) if rank <= VLLM_MAX_RANKS[-1] else None
        notes.append(f"vLLM loads rank {rank} only with --max-lora-rank {flag} or more (its default is "
                     f"{VLLM_DEFAULT_MAX_RANK})" if flag else
                     f"vLLM refuses rank {rank}: its --max-lora-rank is at most {VLLM_MAX_RANKS[-1]}")

    def scale(r: int, alpha: float) -> float:
        return alpha / (math.sqrt(r) if config.get("use_rslora") else r)

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    default = scale(rank, float(config["lora_alpha"]))
    odd = [key for key in dict.fromkeys([*ranks, *alphas])
           if not math.isclose(scale(ranks.get(key, rank), float(alphas.get(key, config["lora_alpha"]))), default)]
    if odd:
        notes.append(f"vLLM ignores rank_pattern / alpha_pattern and scales every module by lora_alpha/r = "
                     f"{default:g}: {len(odd)} module(s) (first {odd[0]!r}) would be scaled wrongly there")
    return notes


def export_peft(model: nn.Module, name: str, out: str | Path, modules: tuple[str, ...] = (),
                base_model_name_or_path: str | None = None) -> Path:
    """Write adapter ``name`` of ``model`` (and the named extra modules) in peft's LoRA format; warn
    (``VllmWarning``, one line each) about what vLLM would refuse or read differently."""
    folder = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    where = placements(model, name)
    specs: dict[str, LoRA] = {}
    for path, module, host in where:
        adapter = host.adapter(name)
        spec = adapter.spec
        if not isinstance(spec, LoRA):
            raise StateError(f"export: adapter {name!r} is {spec.method}; peft's LoRA format holds lora and dora only")
        if getattr(spec, "init", None) in ("pissa", "olora", "residual") or str(getattr(spec, "init", "")).startswith(
                "pissa_niter"):  # its base holds a residual: on the original model the exported factors are wrong
            raise StateError(f"export: adapter {name!r} was initialised from its base weights ({spec.init}); turn it "
                             "into a LoRA of the original model first (arith.residual_lora.residual_to_lora)")
        specs[path] = spec
        lora = adapter.lora if isinstance(spec, DoRA) else adapter
        stem, suffix = ("lora_embedding_", "") if layer_info(module).kind == "embedding" else ("lora_", ".weight")
        tensors[f"{PREFIX}{path}.{stem}A{suffix}"] = lora.lora_a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{path}.{stem}B{suffix}"] = lora.lora_b.detach().cpu().contiguous()
        if isinstance(spec, DoRA):
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = adapter.magnitude.detach().cpu().contiguous()
    first = next(iter(specs.values()))
    for path, spec in specs.items():  # peft holds one value of each of these for all modules
        if (type(spec), spec.dropout, spec.scaling) != (type(first), first.dropout, first.scaling):
            raise StateError(f"export: adapter {name!r} mixes methods, dropouts or scalings across modules ({path}); "
                             "peft's format holds one of each")
    tensors.update(module_tensors(model, modules, PREFIX)[1])
    longest_first = sorted(specs, key=len, reverse=True)  # peft takes the first pattern that matches a path's tail
    config = {
        "peft_type": "LORA", "r": first.r, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
        "rank_pattern": {re.escape(p): specs[p].r for p in longest_first if specs[p].r != first.r},
        "alpha_pattern": {re.escape(p): specs[p].alpha for p in longest_first if specs[p].alpha != first.alpha},
        "use_rslora": first.scaling == "rslora", "use_dora": isinstance(first, DoRA), "bias": "none",
        "target_modules": list(specs), "modules_to_save": sorted(set(modules)) or None,
        "fan_in_fan_out": any(is_conv1d(module) for _, module, _ in where),
        "init_lora_weights": True, "inference_mode": True,
        "task_type": "CAUSAL_LM" if is_causal_lm_model(model) else None,
        "base_model_name_or_path": base_model_name_or_path,
    }
    check = json.dumps({"tensors_sha256": tensors_sha256(tensors), **{k: config[k] for k in _COMPUTES}})
    atomic_write(folder / WEIGHTS, save_bytes(tensors, metadata={"format": "pt", _CHECKED: check}))
    atomic_write(folder / CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    for note in vllm_notes(config):
        warnings.warn(note, VllmWarning, stacklevel=2)
    return folder


def import_peft(model: nn.Module, folder: str | Path, name: str = "default") -> str:
    """Attach the peft LoRA/DoRA checkpoint in ``folder`` to ``model`` as ``name``, with its saved modules.

    Everything is checked before the model changes; the random stream is left as it was."""
    folder = Path(folder)
    config, tensors = _read(folder)
    cfg, weights = folder / CONFIG, folder / WEIGHTS
    named = dict(model.named_modules())
    factors, saved = _split(weights, tensors, named)
    missing = sorted(p for p in factors if p not in named or HOST_ATTR in p.split("."))
    if missing:
        raise StateError(f"{weights}: adapter targets {missing[0]!r}, which this model does not have "
                         "(another base model?)")
    paths = [p for p in named if p in factors]  # model order: the order attach builds in
    specs = {p: _module_spec(cfg, config, p) for p in paths}
    for path in paths:
        embedding = layer_info(named[path]).kind == "embedding"
        wanted = {"lora_embedding_A", "lora_embedding_B"} if embedding else {"lora_A.weight", "lora_B.weight"}
        wanted |= {"lora_magnitude_vector"} if isinstance(specs[path], DoRA) else set()
        if set(factors[path]) != wanted:
            odd = sorted(set(factors[path]) ^ wanted)[0]
            raise StateError(f"{weights}: {path}.{odd} is {'missing' if odd in wanted else 'unexpected'} for a "
                             f"{specs[path].method} adapter on this {type(named[path]).__name__}")
        try:
            specs[path].check_target(named[path], path)
        except AdapterKitError as exc:
            raise StateError(f"{cfg}: {exc}") from None
    spec = specs[paths[0]] if len(set(specs.values())) == 1 else _EachModule(tuple(paths), tuple(specs.values()))
    cuda = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda):  # the init is overwritten at once: leave the caller's stream alone
        attach(model, name, spec, [f"re:{re.escape(p)}" for p in paths])
    try:
        _copy_factors(weights, model, name, factors)
    except BaseException:
        detach(model, name)
        raise
    with torch.no_grad():
        for _, target, value in saved:
            target.copy_(value)
    beside = list(dict.fromkeys(path for path, _, _ in saved))  # saved with the adapter by ak.save, as if trained
    for _, _, host in placements(model, name):
        host.beside[name] = beside
    return name


def _read(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The folder's config and tensors, both checked (types, our export's checksum)."""
    cfg, weights = folder / CONFIG, folder / WEIGHTS
    if not cfg.exists():
        raise StateError(f"{folder}: no {CONFIG} here; is this a peft adapter folder?")
    if not weights.exists() and (folder / "adapter_model.bin").exists():
        raise StateError(f"{folder}: holds adapter_model.bin, a pickle, which adapterkit never loads; re-save it "
                         "with safetensors (peft's save_pretrained(..., safe_serialization=True))")
    try:
        config = json.loads(cfg.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise StateError(f"{cfg}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, RecursionError) as exc:
        raise StateError(f"{cfg}: invalid JSON ({str(exc).splitlines()[0]})") from None
    try:
        blob = weights.read_bytes()
        tensors = load_bytes(blob)
    except OSError as exc:
        raise StateError(f"{weights}: cannot read ({exc.strerror or type(exc).__name__})") from None
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StateError(f"{weights}: not a valid safetensors file ({(str(exc).splitlines() or ['?'])[0]})") from None
    _check_config(cfg, config)
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])  # well formed: load_bytes parsed it
    check = (header.get("__metadata__") or {}).get(_CHECKED)
    if check is not None:
        try:
            written = json.loads(check)
            same_tensors = written["tensors_sha256"] == tensors_sha256(tensors)
            changed = [k for k in _COMPUTES if written[k] != config.get(k)]
        except (ValueError, KeyError, TypeError):
            raise StateError(f"{weights}: the {_CHECKED!r} entry of its header is corrupt") from None
        if not same_tensors:
            raise StateError(f"{weights}: contents do not match the sha256 in its header (truncated or corrupted)")
        if changed:
            raise StateError(f"{cfg}: {', '.join(changed)} differ from the values {WEIGHTS} was exported with "
                             "(a config of another export, or an export killed between the two files)")
    return config, tensors


def _check_config(cfg: Path, config: Any) -> None:
    def expect(key: str, ok: bool, wanted: str) -> None:
        if not ok:
            raise StateError(f"{cfg}: {key} must be {wanted}, got {json.dumps(config.get(key))[:60]}")

    if not isinstance(config, dict):
        raise StateError(f"{cfg}: must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise StateError(f"{cfg}: peft_type {config.get('peft_type')!r}; only LORA checkpoints import")
    expect("r", _positive_int(config.get("r")), "a positive integer")
    expect("lora_alpha", _number(config.get("lora_alpha")), "a number")
    expect("lora_dropout", config.get("lora_dropout") is None or _number(config.get("lora_dropout")), "a number")
    for key in ("use_rslora", "use_dora"):
        expect(key, config.get(key) is None or isinstance(config.get(key), bool), "true or false")
    for key, check, wanted in (("rank_pattern", _positive_int, "positive integers"),
                               ("alpha_pattern", _number, "numbers")):
        pattern = {} if config.get(key) is None else config[key]
        expect(key, isinstance(pattern, dict) and all(map(check, pattern.values())), f"an object of {wanted}")
        for regex in pattern:
            try:
                re.compile(regex)
            except re.error as exc:
                raise StateError(f"{cfg}: {key} key {regex!r} is not a valid regular expression ({exc})") from None
    used = [key for key in _UNSUPPORTED if config.get(key)]
    if used:
        raise StateError(f"{cfg}: {used[0]} is set; adapterkit cannot reproduce that peft option")


def _module_spec(cfg: Path, config: dict[str, Any], path: str) -> LoRA:
    """The spec peft builds at ``path``: the first ``rank_pattern`` / ``alpha_pattern`` key matching the path's tail
    (peft's ``get_pattern_key``), else ``r`` / ``lora_alpha``."""
    def pick(pattern: dict[str, Any] | None, default: Any) -> Any:
        for key, value in (pattern or {}).items():
            if re.match(rf"(.*\.)?({key})$", path):
                return value
        return default

    cls = DoRA if config.get("use_dora") else LoRA
    try:
        return cls(r=pick(config.get("rank_pattern"), config["r"]),
                   alpha=float(pick(config.get("alpha_pattern"), config["lora_alpha"])),
                   dropout=float(config.get("lora_dropout") or 0.0),
                   scaling="rslora" if config.get("use_rslora") else "lora")
    except AdapterKitError as exc:  # e.g. alpha 0 or dropout 1: the spec's own message, with the file
        raise StateError(f"{cfg}: {path}: {exc}") from None


def _split(weights: Path, tensors: dict[str, torch.Tensor], named: dict[str, nn.Module]
           ) -> tuple[dict[str, dict[str, torch.Tensor]], list[tuple[str, torch.Tensor, torch.Tensor]]]:
    """The LoRA factors per module path, and (module path, target, value) for the saved modules' tensors, all
    checked."""
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise StateError(f"{weights}: tensor {key!r} is not under {PREFIX!r} (not a peft model's adapter?)")
        found = _LORA_KEY.fullmatch(key[len(PREFIX):])
        if found:
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise StateError(f"{weights}: tensor {key} is {value.dtype} with non-finite or non-float values")
            factors.setdefault(found.group(1), {})[found.group(2)] = value
            continue
        path, _, pname = key[len(PREFIX):].rpartition(".")
        path = path.removesuffix(".base_layer")  # peft saves a targeted embedding's own weight there (vocab resizes)
        module = named.get(path)
        own = None if module is None or HOST_ATTR in path.split(".") else {
            **dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}.get(pname)
        if own is None:
            raise StateError(f"{weights}: saved tensor {key!r} names no parameter of this model")
        if tuple(own.shape) != tuple(value.shape):
            raise StateError(f"{weights}: saved tensor {key!r} has shape {tuple(value.shape)}, this model's "
                             f"{tuple(own.shape)}")
        saved.append((path, own, value))
    if not factors:
        raise StateError(f"{weights}: no lora_A tensors here")
    return factors, saved


def _copy_factors(weights: Path, model: nn.Module, name: str, factors: dict[str, dict[str, torch.Tensor]]) -> None:
    with torch.no_grad():
        for path, _, host in placements(model, name):
            adapter = host.adapter(name)
            lora = adapter.lora if isinstance(adapter.spec, DoRA) else adapter
            pairs = [(lora.lora_a, "A"), (lora.lora_b, "B")]
            for ours, theirs in pairs:
                value = factors[path].get(f"lora_{theirs}.weight", factors[path].get(f"lora_embedding_{theirs}"))
                assert value is not None  # import_peft checked the keys
                if tuple(value.shape) != tuple(ours.shape):
                    raise StateError(f"{weights}: {path} lora_{theirs} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(ours.shape)} for rank {adapter.spec.r} (r / rank_pattern in {CONFIG})")
                ours.copy_(value)
            if isinstance(adapter.spec, DoRA):
                value = factors[path]["lora_magnitude_vector"]
                if tuple(value.shape) != tuple(adapter.magnitude.shape):
                    raise StateError(f"{weights}: {path} lora_magnitude_vector has shape {tuple(value.shape)}, "
                                     f"expected {tuple(adapter.magnitude.shape)}")
                adapter.magnitude.copy_(value)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
