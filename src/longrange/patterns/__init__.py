"""Which (query, key) pairs may attend: small composable pieces. See `Pattern` for the protocol.

    >>> from longrange.patterns import Window, Global
    >>> p = Window(2) | Global([0])
    >>> p.to_dense(6).sum().item()
    30
"""

from longrange.patterns.band import Band, BlockWindow, Causal, Dilated, Full, Segments, Window
from longrange.patterns.base import Complement, Intersection, Pattern, Union
from longrange.patterns.global_ import Global, global_blocks
from longrange.patterns.random_ import RandomBlocks
from longrange.patterns.strided import StridedColumns, SummaryColumns, fixed, strided


class Empty(Complement):
    """No pair."""

    def __init__(self):
        super().__init__(Full())

    def __repr__(self):
        return "Empty()"


__all__ = [
    "Band", "BlockWindow", "Causal", "Complement", "Dilated", "Empty", "Full", "Global", "Intersection",
    "Pattern", "RandomBlocks", "Segments", "StridedColumns", "SummaryColumns", "Union", "Window",
    "fixed", "global_blocks", "strided",
]
