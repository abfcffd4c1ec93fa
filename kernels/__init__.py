"""Gather kernels (installed as ``vtprune.kernels``).

The torch implementation below is the reference and the fallback.  ``VTPRUNE_KERNELS`` selects a
backend explicitly (``torch`` is the only one in this release; fused Triton kernels are planned).
"""

from __future__ import annotations

import os

from .gather import gather_cut

BACKENDS = ("torch",)


def backend() -> str:
    """Name of the active gather backend (``VTPRUNE_KERNELS`` overrides the automatic choice)."""
    wanted = os.environ.get("VTPRUNE_KERNELS", "").strip().lower()
    if wanted and wanted not in BACKENDS:
        raise ValueError(f"VTPRUNE_KERNELS={wanted!r} is not available; choose one of {BACKENDS}")
    return "torch"


__all__ = ["BACKENDS", "backend", "gather_cut"]
