"""A stream of tasks for continual learning: each task's training and test examples, checked once.

Class-incremental streams bring new classes in every task and are scored without task ids (one prediction over
every class seen so far); domain-incremental streams keep the classes and change the inputs. Labels are global
class ids throughout; the learner's heads map them to columns.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from adapterkit.core.errors import AdapterKitError

SETTINGS = ("class", "domain")


class StreamError(AdapterKitError, ValueError):
    """A stream that cannot be learned as given: an empty task, a class seen twice in a class-incremental stream,
    labels that do not fit, a resume that does not match."""


@dataclass(frozen=True)
class Examples:
    """Inputs (a list of token-id lists, or a tensor with one row per example) and their global class ids."""

    inputs: Any
    labels: Tensor

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.labels):
            raise StreamError(f"{len(self.inputs)} inputs but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: Sequence[int] | Tensor) -> Examples:
        index = torch.as_tensor(rows, dtype=torch.long)
        if isinstance(self.inputs, Tensor):
            return Examples(self.inputs[index], self.labels[index])
        return Examples([self.inputs[i] for i in index.tolist()], self.labels[index])

    def where(self, classes: Sequence[int]) -> Examples:
        """The examples whose label is one of ``classes``."""
        keep = torch.isin(self.labels, torch.as_tensor(list(classes), dtype=self.labels.dtype))
        return self.subset(keep.nonzero().flatten())

    @staticmethod
    def join(parts: Sequence[Examples]) -> Examples:
        labels = torch.cat([p.labels for p in parts])
        if parts and isinstance(parts[0].inputs, Tensor):
            return Examples(torch.cat([p.inputs for p in parts]), labels)
        return Examples([x for p in parts for x in p.inputs], labels)


@dataclass(frozen=True)
class Task:
    """One step of the stream."""

    name: str
    train: Examples
    test: Examples

    @property
    def classes(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.train.labels.tolist())))


class Stream:
    """Tasks in the order they arrive, checked: every task has training and test examples, a class-incremental
    task brings only new classes, and a task's test labels are among its training classes."""

    def __init__(self, tasks: Sequence[Task], setting: str = "class") -> None:
        if setting not in SETTINGS:
            raise StreamError(f"setting={setting!r}: use 'class' (class-incremental) or 'domain' (domain-incremental)")
        if not tasks:
            raise StreamError("a stream needs at least one task")
        self.tasks = list(tasks)
        self.setting = setting
        seen: dict[int, str] = {}
        names = set()
        for t, task in enumerate(self.tasks):
            where = f"task {task.name!r} ({t + 1} of {len(self.tasks)})"
            if task.name in names:
                raise StreamError(f"{where}: the name is used by an earlier task")
            names.add(task.name)
            if len(task.train) == 0:
                raise StreamError(f"{where} has no training examples")
            if len(task.test) == 0:
                raise StreamError(f"{where} has no test examples")
            stray = sorted(set(task.test.labels.tolist()) - set(task.classes))
            if stray:
                raise StreamError(f"{where}: test labels {stray} are not among its training classes "
                                  f"{list(task.classes)}")
            if setting == "class":
                again = [c for c in task.classes if c in seen]
                if again:
                    raise StreamError(f"{where}: classes {again} were already seen in task {seen[again[0]]!r}; a "
                                      "class-incremental stream brings new classes in every task (setting='domain' "
                                      "keeps the classes and changes the inputs)")
            for c in task.classes:
                seen.setdefault(c, task.name)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, t: int) -> Task:
        return self.tasks[t]

    def classes_up_to(self, t: int) -> list[int]:
        """Global class ids seen in tasks 0..t, in the order they first arrived."""
        return list(dict.fromkeys(c for task in self.tasks[:t + 1] for c in task.classes))

    def task_of_class(self, t: int) -> dict[int, int]:
        """Class id -> index of the task that brought it (class-incremental), over tasks 0..t."""
        found: dict[int, int] = {}
        for i, task in enumerate(self.tasks[:t + 1]):
            for c in task.classes:
                found.setdefault(c, i)
        return found

    def digest(self) -> str:
        """Names, setting, inputs and labels of every task: a resumed run checks it is continuing the same stream."""
        h = hashlib.sha256(self.setting.encode())
        for task in self.tasks:
            h.update(task.name.encode())
            for part in (task.train, task.test):
                h.update(part.labels.numpy().tobytes())
                if isinstance(part.inputs, Tensor):
                    h.update(part.inputs.detach().cpu().contiguous().numpy().tobytes())
                else:
                    h.update(json.dumps(part.inputs).encode())
        return h.hexdigest()[:16]

    @classmethod
    def class_incremental(cls, train: Examples, test: Examples, groups: Sequence[Sequence[int]],
                          names: Sequence[str] | None = None) -> Stream:
        """Split one labelled set into tasks by class groups, e.g. ``[[0, 1], [2, 3], [4, 5]]``."""
        names = list(names) if names is not None else ["-".join(map(str, g)) for g in groups]
        if len(names) != len(groups):
            raise StreamError(f"{len(names)} names for {len(groups)} class groups")
        return cls([Task(n, train.where(g), test.where(g)) for n, g in zip(names, groups)], "class")
