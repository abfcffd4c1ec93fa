"""Keep a checkout's top-level folders from shadowing installed packages of the same name.

``patches/``, ``kernels/`` and ``eval/`` are installed as ``vtprune.patches`` / ``.kernels`` /
``.eval``.  With a checkout's root on ``sys.path`` (``python -m pytest`` or a notebook started
there), ``import kernels`` would find the folder before an installed distribution that owns the
name (Hugging Face's ``kernels``, a transformers dependency since 5.25).  Each folder's
``__init__.py`` runs this file (by path, with ``NAME`` set: nothing of the ``vtprune`` package is
imported) whenever it is imported under any name but its ``vtprune.*`` one, and the name goes to
the package found on the rest of ``sys.path``, or, when nothing else provides it, to an empty
namespace package (what Python itself makes of a folder without ``__init__.py``, which is how
transformers' availability checks recognise a shadow).  Standard library only.
"""

import importlib.machinery
import importlib.util
import os
import sys

_ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def _elsewhere(path) -> bool:
    return os.path.realpath(path or os.curdir) != _ROOT


def hand_over(name: str):
    """Put the package that owns ``name`` outside this checkout (or an empty namespace) into ``sys.modules``."""
    spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if _elsewhere(p)])
    if spec is None:  # nobody else has it
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = []
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # import returns what sys.modules holds once this folder's __init__ ends
    if spec.loader is not None:
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
    return module


if "NAME" in globals():
    hand_over(NAME)  # noqa: F821 (given by runpy.run_path)
