"""One exception type per kind of user mistake, each carrying a one-line message."""

from __future__ import annotations


class AdapterKitError(Exception):
    """Base class: every error adapterkit raises on bad input is one of these."""


class SpecError(AdapterKitError, ValueError):
    """A spec field is invalid (bad rank, unknown activation, ...)."""


class UnknownMethodError(AdapterKitError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class TargetError(AdapterKitError, ValueError):
    """Targets that match nothing, or a module that a method cannot adapt."""


class NameInUseError(AdapterKitError, ValueError):
    """An adapter name that is already attached, or an invalid name."""


class StateError(AdapterKitError, ValueError):
    """A saved adapter that cannot be loaded here: corrupt, truncated, newer, or for another base model."""
