"""pytest plugin: wrap every supported model with vtprune as soon as transformers builds it.

Loaded into transformers' own model tests (``-p vtprune_hf_plugin``, see ``run.py`` beside this file)
so that every ``LlavaForConditionalGeneration`` & co. those tests construct — directly, through
``from_pretrained`` after a save, or by ``copy.deepcopy`` — runs wrapped.  The wrap spec comes from
``VTPRUNE_HF_WRAP`` (default ``random:keep=1.0``, i.e. nothing is cut: the model must behave exactly
like the stock one).  Classes vtprune does not support (``LlavaModel``, the towers) stay unwrapped.
"""

from __future__ import annotations

import os


WRAPPED = {"count": 0}


def _spec():
    from vtprune.spec import parse_spec

    return parse_spec(os.environ.get("VTPRUNE_HF_WRAP", "random:keep=1.0"))


def pytest_configure(config):
    import transformers

    import vtprune
    from vtprune.patches import adapter_for

    methods, options = _spec()
    original = transformers.PreTrainedModel.post_init

    def post_init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        try:
            adapter_for(self)
        except TypeError:
            return
        if not vtprune.is_wrapped(self):
            vtprune.wrap(self, methods, **options)
            WRAPPED["count"] += 1

    transformers.PreTrainedModel.post_init = post_init
    config._vtprune_original_post_init = original


def pytest_unconfigure(config):
    tally = os.environ.get("VTPRUNE_HF_TALLY")
    if tally:  # one line per process (pytest-xdist workers included): the runner adds them up
        with open(tally, "a") as f:
            f.write(f"{WRAPPED['count']}\n")
    original = getattr(config, "_vtprune_original_post_init", None)
    if original is not None:
        import transformers

        transformers.PreTrainedModel.post_init = original




