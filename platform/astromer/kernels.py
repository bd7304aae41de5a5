"""The compiled kernels (``_kernels.c``), where the set-up built them.

Each kernel is the compiled twin of a numpy or pyarrow step of the ingest: the header scan and the
numeric-row parser of the text readers (``astromer.surveys.base``) and the per-curve order statistics
of the quality flags (``astromer.lake.schema``). A kernel either gives exactly what its twin gives or
declines (returns False), and the caller then runs the twin; so results never depend on whether the
kernels were built, only the speed does.
"""
from __future__ import annotations

import os


def compiled_kernels():
    """The ``astromer._kernels`` module, or None where it was not built (no C compiler at set-up) or
    where ``ASTROMER_COMPILED=0`` asks for the numpy and pyarrow paths only (benchmarks, comparisons)."""
    if os.environ.get("ASTROMER_COMPILED", "1") == "0":
        return None
    try:
        from astromer import _kernels
    except ImportError:
        return None
    return _kernels


__all__ = ["compiled_kernels"]
