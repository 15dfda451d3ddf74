"""The learned combiners of ``Mix`` blocks, one file each; importing the package imports every file, and each
registers itself.

Every combiner's spec class is an attribute here (``adapterkit.compose.Fusion(...)``); ``available()`` lists the
registered combiner names.
"""

from adapterkit.core.namespace import fill as _fill
from adapterkit.core.registry import combiners as available

__all__ = _fill(__name__, __path__, available)
