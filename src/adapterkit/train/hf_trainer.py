"""Training with transformers' ``Trainer``: checkpoints that hold the adapters only, and resuming from them.

A plain ``Trainer`` writes the whole model into every ``checkpoint-N/`` (``save_pretrained``: the frozen base again
each time, plus ``.adapterkit.`` keys that ``from_pretrained`` drops with a warning). ``AdapterTrainer`` writes what
training changes instead, in the ``adapterkit.save`` format (``adapter.json`` + safetensors): the trained adapters
and the modules trained beside them (a classification head), and reads them back *in place* for
``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` -- in place because the optimizer holds
references to those very parameters. The rest of a checkpoint (optimizer, scheduler, RNG, trainer state) is the
Trainer's own, so a resumed run continues exactly where the interrupted one stopped.

Why a mixin and not a ``TrainerCallback``: the Trainer writes the model in ``_save`` and reads it in
``_load_from_checkpoint`` / ``_load_best_model``, outside every callback event. A callback could only delete the
full-model file after it was written, and on resume the Trainer refuses a folder without a model weights file
before any callback runs. So those three methods are overridden, in a mixin that goes before any Trainer subclass::

    class AdapterSFTTrainer(AdapterTrainerMixin, trl.SFTTrainer): ...

Causal LMs train the same way (tests/train/test_hf_trainer_llm.py: SmolLM2 with ``Trainer`` and with TRL's
``SFTTrainer``). TRL's ``SFTConfig`` defaults to ``bf16=True``; accelerate then replaces the model's ``forward`` with
an autocast one (``Accelerator.prepare_model``) that stays after training, so outputs compared with a fresh model
differ by bf16 rounding: pass ``bf16=False`` where they must match exactly.

Layout: one adapter is saved straight into the checkpoint folder (``ak.load(model, "out/checkpoint-500")``
works); several go to one sub-folder each, named after the adapter. A checkpoint without ``adapter.json`` (written
by a plain Trainer) is loaded the Trainer's way. Single process and DDP (``torchrun``); FSDP and DeepSpeed, whose
sharded state the Trainer saves and loads through other paths, are refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from adapterkit.core.errors import AdapterKitError, StateError
from adapterkit.core.host import HOST_ATTR
from adapterkit.inject.engine import adapter_names, placements
from adapterkit.inject.record import RECORD
from adapterkit.inject.state import load, save

logger = logging.getLogger(__name__)

if TYPE_CHECKING:  # the mixin's methods override Trainer's; at run time it derives from object, to mix in anywhere
    from transformers import Trainer as _TrainerBase
else:
    _TrainerBase = object


def trained_adapters(model: nn.Module) -> list[str]:
    """Attached adapters with a parameter that requires grad (all attached ones if none does)."""
    names = adapter_names(model)
    if not names:
        raise StateError("AdapterTrainer: the model has no adapter attached; call ak.attach before training")
    trained = [n for n in names if any(p.requires_grad for _, _, host in placements(model, n)
                                       for p in host.adapter(n).parameters())]
    return trained or names


def trained_modules(model: nn.Module) -> list[str]:
    """Exact-path targets (``re:<path>``) of the modules outside the adapters that own a trainable parameter:
    ``train_only``'s ``also`` modules, or ones made trainable by hand; every tensor the optimizer changes is saved."""
    paths: list[str] = []
    for pname, param in model.named_parameters():
        if not param.requires_grad or HOST_ATTR in pname.split("."):
            continue
        owner = pname.rpartition(".")[0]
        if not owner:
            raise StateError(f"AdapterTrainer: trainable parameter {pname!r} sits on the model itself, not in a "
                             "module, and cannot be saved beside an adapter")
        if owner not in paths:
            paths.append(owner)
    return [f"re:{re.escape(path)}" for path in paths]


def saved_adapters(folder: str | os.PathLike) -> list[Path]:
    """The adapter folders of a checkpoint written by ``AdapterTrainer``: the checkpoint itself when it holds one
    adapter, else its sub-folders holding ``adapter.json``; [] for a checkpoint of a plain Trainer."""
    root = Path(folder)
    if (root / RECORD).is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(sub for sub in root.iterdir() if (sub / RECORD).is_file())


def save_adapters(model: nn.Module, folder: str | os.PathLike, adapters: Sequence[str] | None = None,
                  modules: Sequence[str] | None = None) -> list[Path]:
    """Save ``adapters`` (default: the trained ones) with ``modules`` beside each (default: every other module with a
    trainable parameter) into ``folder``, laid out as ``saved_adapters`` reads it; returns the adapter folders."""
    names = list(adapters) if adapters is not None else trained_adapters(model)
    beside = list(modules) if modules is not None else trained_modules(model)
    root = Path(folder)
    return [save(model, root if len(names) == 1 else root / name, name=name, modules=beside) for name in names]


def restore_adapters(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Copy the adapters (and the modules beside them) saved in ``folder`` into the same adapters of ``model``, in
    place; returns their names. Each must be attached already, with the spec and targets it was saved with."""
    folders = saved_adapters(folder)
    if not folders:
        raise StateError(f"{folder}: no {RECORD} here or in its sub-folders; not a checkpoint of AdapterTrainer")
    attached = adapter_names(model)
    restored = []
    for each in folders:
        name = _saved_name(each)
        if name is not None and name not in attached:
            raise StateError(f"{each}: holds adapter {name!r}, which is not attached to this model; attach it as in "
                             "the run that wrote it (same spec and targets) before resuming")
        restored.append(load(model, each, name=name, overwrite=True))
    return restored


def _saved_name(folder: Path) -> str | None:
    """The adapter name in ``folder``'s record, or None when unreadable (``load`` then says what is wrong)."""
    try:
        name = json.loads((folder / RECORD).read_text()).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None


class AdapterTrainerMixin(_TrainerBase):
    """Adapter-only checkpoints for any ``transformers.Trainer`` subclass; put it first among the bases.

    Keyword arguments, besides the Trainer's own:
        adapters: the adapters to save (a name or names); default: every attached adapter that trains.
        modules: the modules saved beside each adapter, as ``ak.save``'s ``modules`` (path suffixes or
            ``re:`` patterns); default: every module outside the adapters with a trainable parameter.
    """

    def __init__(self, *args: Any, adapters: str | Sequence[str] | None = None,
                 modules: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saved_names = [adapters] if isinstance(adapters, str) else None if adapters is None else list(adapters)
        self.saved_modules = None if modules is None else list(modules)
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise AdapterKitError("AdapterTrainer: adapter-only checkpoints do not support FSDP or DeepSpeed; use "
                                  "DDP (torchrun), or `adapterkit train --parallel fsdp`")

    def _adapted(self) -> nn.Module:
        if self.model is None:  # a Trainer built with model_init has no model until train() makes one
            raise AdapterKitError("AdapterTrainer: no model yet; attach the adapters before saving or loading")
        return self.model

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # ``state_dict`` is the full model's (only sharded engines pass one, and those are refused above): unused
        out = Path(output_dir or self.args.output_dir or ".")
        out.mkdir(parents=True, exist_ok=True)
        logger.info("Saving adapter checkpoint to %s", out)
        save_adapters(self._adapted(), out, self.saved_names, self.saved_modules)
        if self.processing_class is not None:  # as the Trainer does: the tokenizer and the arguments beside
            self.processing_class.save_pretrained(str(out))
        torch.save(self.args, out / TRAINING_ARGS_NAME)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not saved_adapters(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # a full-model checkpoint
            return
        logger.info("Loading adapters from %s", resume_from_checkpoint)
        restore_adapters(self._adapted(), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best is None or not saved_adapters(best):
            super()._load_best_model()
            return
        logger.info("Loading the best adapters from %s (score: %s)", best, self.state.best_metric)
        restore_adapters(self._adapted(), best)


class AdapterTrainer(AdapterTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold the adapters only (see the module doc)."""
