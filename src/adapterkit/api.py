"""The small public surface that is not a spec class (implemented in inject/use.py, re-exported here)."""

from adapterkit.inject.use import activate, adapters, use

__all__ = ["activate", "adapters", "use"]
