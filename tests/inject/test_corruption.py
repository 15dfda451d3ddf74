"""Damaged saves: adapters (ak.save), peft folders (export_peft and peft's save_pretrained) and training checkpoints,
truncated at many points, bytes flipped in the JSON and in the safetensors header and data, JSON keys of every wrong
type, keys missing and extra, shapes that disagree, a weights name pointing elsewhere, an empty file, a folder in a
file's place, and the files a killed save leaves (the cases: corruption_cases.py; the damage: corruption.py).

Every failure is an AdapterKitError whose message is one line and names the folder, never another exception; a failed
load leaves the model as it was and the folder's files untouched; after a killed save the previous good save loads
(or the newer one, where it was complete). Deterministic: the byte flips are seeded."""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import adapterkit as ak
from adapterkit.interop.peft_format import export_peft, import_peft
from adapterkit.train.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import logits, make_tiny, randomize, tokens
from tests.inject.corruption_cases import CASES

IDS = tokens()


def _parts(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """What a training checkpoint restores: a model with a frozen layer, AdamW, a LambdaLR."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))


def _trainable(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _peft_save(peft: Any, base: torch.nn.Module, folder: Path) -> torch.Tensor:
    """peft's own save of a LoRA with per-module ranks and alphas and the classifier; returns its logits."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], rank_pattern={"value": 3},
                             alpha_pattern={"layer.1.attention.self.query": 6}, modules_to_save=["classifier"])
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    theirs.save_pretrained(folder)
    return logits(theirs.eval(), IDS)


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """The pristine saves ``<subject>-<tag>`` and what loading each must give (logits, or trained parameters)."""
    root = tmp_path_factory.mktemp("pristine")
    base = make_tiny("bert")
    refs: dict[str, Any] = {"base": base}

    def adapted(spec: ak.LoRA, seed: int) -> torch.nn.Module:
        model = copy.deepcopy(base)
        ak.attach(model, "a", spec, ["query", "value"])
        randomize(model, "a", seed=seed)
        with torch.no_grad():
            model.classifier.weight.add_(0.1 * seed)  # the head is saved too: loading must restore it
        return model

    for tag, seed in (("old", 3), ("new", 4)):
        model = adapted(ak.LoRA(r=2), seed)
        ak.save(model, root / f"ak-{tag}", modules=("classifier",))
        refs[f"ak-{tag}"] = logits(model, IDS)
    for tag, seed, alpha in (("old", 3, 4.0), ("new", 4, 6.0), ("same", 5, 4.0)):
        model = adapted(ak.DoRA(r=2, alpha=alpha), seed)
        export_peft(model, "a", root / f"peft_ours-{tag}", modules=("classifier",))
        refs[f"peft_ours-{tag}"] = logits(model, IDS)
    try:
        import peft
    except ImportError:  # the peft_theirs cases skip
        peft = None
    if peft is not None:
        refs["peft_theirs-old"] = _peft_save(peft, base, root / "peft_theirs-old")
    for tag, steps in (("old", 2), ("new", 3)):
        model, optimizer, scheduler = _parts(0)
        for _ in range(steps):
            model(torch.randn(3, 4)).sum().backward()
            optimizer.step()
            scheduler.step()
        history = {"step": list(range(1, steps + 1)), "loss": [0.5] * steps, "epoch": [], "epoch_step": [],
                   "dev_accuracy": []}
        progress = {"step": steps, "epoch": 1, "batch": steps, "seconds": 0.5, "history": history}
        save_checkpoint(root / f"ckpt-{tag}" / "checkpoint.safetensors", model, optimizer, scheduler, progress,
                        torch.Generator().manual_seed(steps).get_state())
        refs[f"ckpt-{tag}"] = _trainable(model)
    return root, refs


def _attempt(subject: str, folder: Path, refs: dict[str, Any]
             ) -> tuple[Callable[[], Any], Callable[[], bool]]:
    """The load of ``folder`` (returning what to compare with the reference) and a check that a refused load
    changed nothing."""
    if subject == "ckpt":
        model, optimizer, scheduler = _parts(1)
        before = [p.detach().clone() for p in model.parameters()]
        rng = torch.get_rng_state()

        def run_checkpoint() -> Any:
            load_checkpoint(folder / "checkpoint.safetensors", model, optimizer, scheduler)
            return _trainable(model)

        return run_checkpoint, lambda: (all(map(torch.equal, before, model.parameters())) and not optimizer.state
                                        and torch.equal(rng, torch.get_rng_state()))
    base = refs["base"]
    model = copy.deepcopy(base)

    def run_adapter() -> Any:
        if subject == "ak":
            ak.load(model, folder)
        else:
            import_peft(model, folder, name="a")
        return logits(model, IDS)

    state = base.state_dict()
    return run_adapter, lambda: ak.adapters(model) == [] and all(
        torch.equal(value, state[key]) for key, value in model.state_dict().items())


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damage_is_refused_in_one_line_or_loads_as_saved(case, saves, tmp_path) -> None:
    root, refs = saves
    subject = case.split("-")[0]
    if f"{subject}-old" not in refs:
        pytest.skip(f"no {subject} save (peft is not installed)")
    folder = tmp_path / "damaged"
    shutil.copytree(root / f"{subject}-old", folder)
    outcome = CASES[case](folder, root / f"{subject}-old")
    files = _snapshot(folder)
    run, unchanged = _attempt(subject, folder, refs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys warn; that is tested elsewhere
            result = run()
    except ak.AdapterKitError as exc:
        message = str(exc)
        assert outcome in ("error", "either"), f"refused a save that must load: {message}"
        assert message and "\n" not in message, f"not one line: {message!r}"
        assert str(folder) in message, f"does not name the folder: {message}"
        assert unchanged(), "a refused load changed the model"
    else:
        assert outcome != "error", "loaded a damaged save"
        if outcome.startswith("load") and outcome != "load:any":
            expected = refs[f"{subject}-{outcome.partition(':')[2] or 'old'}"]
            if subject == "ckpt":
                assert all(map(torch.equal, result, expected))
            else:
                torch.testing.assert_close(result, expected, atol=1e-6, rtol=1e-6)
    assert _snapshot(folder) == files, "loading changed the folder"
