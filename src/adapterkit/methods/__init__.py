"""The adapter methods, one file each; importing the package imports every file, and each registers itself.

Every method's spec class is an attribute here (``adapterkit.methods.LowBit(...)``); ``available()`` lists the
registered method names.
"""

from adapterkit.core.namespace import fill as _fill
from adapterkit.core.registry import methods as available

__all__ = _fill(__name__, __path__, available)
