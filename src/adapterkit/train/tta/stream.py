"""An unlabeled test stream: domains in the order they arrive, each a tensor of inputs cut into batches.

A test-time method reads inputs only. A labelled domain (``Examples``, an ``(inputs, labels)`` pair, a dict with
labels) is refused with one line; labels for scoring are split off by ``TestStream.from_labelled`` and handed to
the loop apart from the stream, which never passes them to a method.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from adapterkit.train.continual.stream import Examples, StreamError


@dataclass(frozen=True)
class Domain:
    """One domain of the stream: a name and its inputs (N, ...), one row per example."""

    name: str
    inputs: Tensor


@dataclass(frozen=True)
class Step:
    """One domain as it arrives: round r (0-based) of domain ``name``."""

    round: int
    name: str


class TestStream:
    """Domains in order, repeated ``rounds`` times, cut into batches of ``batch_size`` in a fixed order.

    Args:
        domains: ``Domain``s or ``(name, inputs)`` pairs; inputs are a tensor with one row per example.
        batch_size: examples per batch (the last batch of a domain may be smaller).
        rounds: how many times the whole sequence of domains is seen (continual TTA's rounds).
    """

    __test__ = False  # not a pytest class

    def __init__(self, domains: Sequence[Domain | tuple[str, Any]], batch_size: int = 64, rounds: int = 1) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise StreamError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise StreamError(f"rounds must be a positive integer, got {rounds!r}")
        if not domains:
            raise StreamError("a test stream needs at least one domain")
        self.domains: list[Domain] = []
        for i, item in enumerate(domains):
            where = f"domain {i + 1} of {len(domains)}"
            domain = item if isinstance(item, Domain) else _as_domain(item, where)
            where = f"domain {domain.name!r} ({i + 1} of {len(domains)})"
            _refuse_labels(domain.inputs, where)
            if not isinstance(domain.inputs, Tensor) or domain.inputs.dim() < 1:
                raise StreamError(f"{where}: inputs must be a tensor with one row per example, got "
                                  f"{type(domain.inputs).__name__}")
            if len(domain.inputs) == 0:
                raise StreamError(f"{where} has no inputs")
            if any(d.name == domain.name for d in self.domains):
                raise StreamError(f"{where}: the name is used by an earlier domain")
            self.domains.append(domain)
        self.batch_size, self.rounds = batch_size, rounds
        self.steps = [Step(r, d.name) for r in range(rounds) for d in self.domains]
        self._by_name = {d.name: d for d in self.domains}

    def __len__(self) -> int:
        return len(self.steps)

    def domain(self, name: str) -> Domain:
        return self._by_name[name]

    def batches(self, name: str) -> Iterator[Tensor]:
        """Domain ``name``'s inputs in order, ``batch_size`` rows at a time."""
        inputs = self._by_name[name].inputs
        for start in range(0, len(inputs), self.batch_size):
            yield inputs[start:start + self.batch_size]

    def num_batches(self) -> int:
        return sum(-(-len(self._by_name[s.name].inputs) // self.batch_size) for s in self.steps)

    def digest(self) -> str:
        """Names, sizes, batch size, rounds and a sample of the inputs: a resumed run checks it continues this one."""
        from adapterkit.inject.fingerprint import tensor_digest

        h = hashlib.sha256(f"{self.batch_size}:{self.rounds}".encode())
        for d in self.domains:
            h.update(f"{d.name}:{tuple(d.inputs.shape)}:{tensor_digest(d.inputs)}".encode())
        return h.hexdigest()[:16]

    @classmethod
    def from_labelled(cls, domains: Sequence[tuple[str, Examples]], batch_size: int = 64,
                      rounds: int = 1) -> tuple[TestStream, dict[str, Tensor]]:
        """Split labelled domains into the unlabeled stream and the labels for scoring, kept apart."""
        stream = cls([Domain(name, examples.inputs) for name, examples in domains], batch_size, rounds)
        return stream, {name: examples.labels for name, examples in domains}


def check_labels(stream: TestStream, labels: Mapping[str, Tensor]) -> None:
    """The scoring labels fit the stream: one label per input of every domain."""
    for d in stream.domains:
        if d.name not in labels:
            raise StreamError(f"labels: no labels for domain {d.name!r} (labels are given for {sorted(labels)})")
        found = labels[d.name]
        if not isinstance(found, Tensor) or found.shape != (len(d.inputs),):
            shape = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
            raise StreamError(f"labels for domain {d.name!r}: expected a tensor of shape ({len(d.inputs)},), got "
                              f"{shape}")


def _as_domain(item: Any, where: str) -> Domain:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return Domain(item[0], item[1])
    _refuse_labels(item, where)
    raise StreamError(f"{where}: expected a Domain or a (name, inputs) pair, got {type(item).__name__}")


def _refuse_labels(value: Any, where: str) -> None:
    labelled = (isinstance(value, Examples) or (isinstance(value, Mapping) and "labels" in value)
                or (isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, Tensor) for v in value)))
    if labelled:
        raise StreamError(f"{where} carries labels ({type(value).__name__}); a test-time stream is unlabeled: pass "
                          "inputs only, and labels for scoring to run_tta(labels=...) (TestStream.from_labelled "
                          "splits them)")

