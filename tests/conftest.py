import importlib
import os
import sys

import pytest
import torch

# Tiny models run fastest on one thread, and several threads thrash when other work shares the CPU.
torch.set_num_threads(1)

# Nothing in the tests may reach a model or dataset hub (lmms-eval and datasets would try).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture
def registries():
    """Afterwards the method, family, adapter and vLLM-binding registries are as they were."""
    from vtprune.families import base as families
    from vtprune.methods import base as methods
    from vtprune.patches import registry
    from vtprune.serving import bindings

    live = (methods._REGISTRY, families._FAMILIES, registry._ADAPTERS, bindings._BUILDERS)
    saved = [type(r)(r) for r in live]
    try:
        yield
    finally:
        for now, old in zip(live, saved):
            now.clear()
            now.update(old) if isinstance(old, dict) else now.extend(old)


@pytest.fixture
def extension(registries):
    """``tests/extension_example.py`` imported (a family and a selector of one's own), for one test."""
    sys.modules.pop("extension_example", None)
    try:
        yield importlib.import_module("extension_example")
    finally:
        sys.modules.pop("extension_example", None)
