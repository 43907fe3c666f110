"""The maths of each approximate mechanism on [B, H, N, D] tensors, without the projections.

    import longrange as lr
    out = lr.functional.performer(q, k, v, nb_features=256, causal=True, seed=0)

Each function lives beside its module in `longrange.mechanisms.<family>`; this module gathers them.
"""

from __future__ import annotations

import importlib

#: public name -> the mechanism module that defines it
_KERNELS = {
    "performer": "longrange.mechanisms.performer",
    "linear": "longrange.mechanisms.linear",
    "linformer": "longrange.mechanisms.linformer",
    "nystrom": "longrange.mechanisms.nystrom",
    "lsh": "longrange.mechanisms.reformer",
}

__all__ = sorted(_KERNELS)


def __getattr__(name):
    if name in _KERNELS:
        return getattr(importlib.import_module(_KERNELS[name]), name)
    raise AttributeError(f"module 'longrange.functional' has no attribute {name!r}")
