"""Which gather runs a cut (re-exported by ``vtprune.kernels``), before the LLM and inside it.

The torch implementations in ``gather.py`` are the reference and the fallback.  Fused Triton
kernels (``triton_gather.py``) are used automatically on CUDA tensors when ``triton`` is
importable.  ``VTPRUNE_KERNELS=torch|triton`` overrides the choice; ``triton`` on CPU tensors runs
the kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests them.
"""

from __future__ import annotations

import functools
import os

import torch

from . import gather as _torch

BACKENDS = ("torch", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def backend(device: str | None = None) -> str:
    """The active backend (for tensors on ``device``; None = this machine's default device)."""
    wanted = os.environ.get("VTPRUNE_KERNELS", "").strip().lower()
    if wanted and wanted not in BACKENDS:
        raise ValueError(f"VTPRUNE_KERNELS={wanted!r} is not a backend; choose one of {BACKENDS}")
    if wanted == "triton":
        if not triton_available():
            raise ValueError("VTPRUNE_KERNELS=triton but triton is not importable (pip install 'vtprune[triton]')")
        return "triton"
    if wanted == "torch":
        return "torch"
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "triton" if str(device).startswith("cuda") and triton_available() else "torch"


def gather_cut(embeds, index, real, mask=None, positions=None):
    """Cut embeddings, mask and positions along the sequence (see ``gather.gather_cut``)."""
    if backend(embeds.device.type) == "triton":
        from .triton_gather import gather_cut_triton

        return gather_cut_triton(embeds, index, real, mask, positions)
    return _torch.gather_cut(embeds, index, real, mask, positions)


def gather_positions(positions, index):
    """Position ids ``[B, L]`` / ``[P, B, L]`` of the kept positions ``index`` [B, L'] (``gather.gather_positions``)."""
    return _torch.gather_positions(positions, index)


def gather_seq(t, index):
    """Rows of ``t`` [B|1, L, ...] along its sequence dimension (1) by a per-row ``index`` [B, L'] — the
    in-LLM exit's hidden states and position embeddings, through the same kernel as the pre-LLM cut."""
    batch, width = index.shape
    if t.shape[0] != batch:
        t = t.expand(batch, *t.shape[1:])
    flat = t.reshape(batch, t.shape[1], -1)
    real = torch.ones(batch, width, dtype=torch.bool, device=index.device)
    return gather_cut(flat, index.to(t.device), real)[0].reshape(batch, width, *t.shape[2:])


__all__ = ["BACKENDS", "backend", "gather_cut", "gather_positions", "gather_seq", "triton_available"]
