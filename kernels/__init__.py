"""Gather kernels (installed as ``vtprune.kernels``): every cut, before the LLM and inside it.

The torch implementations in ``gather.py`` are the reference and the fallback.  Fused Triton
kernels (``triton_gather.py``) are used automatically on CUDA tensors when ``triton`` is
importable.  ``VTPRUNE_KERNELS=torch|triton`` overrides the choice; ``triton`` on CPU tensors runs
the kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which is how CI tests them.
"""

if __name__ == "vtprune.kernels":
    from .dispatch import BACKENDS, backend, gather_cut, gather_positions, gather_seq, triton_available

    __all__ = ["BACKENDS", "backend", "gather_cut", "gather_positions", "gather_seq", "triton_available"]
else:  # a checkout's root on sys.path, imported as a top-level `kernels`: the name is not ours
    import runpy, pathlib  # noqa: E401

    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "vtprune" / "toplevel.py"), {"NAME": __name__})
