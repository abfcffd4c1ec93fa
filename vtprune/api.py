"""The public one-liners: ``wrap``, ``unwrap``, ``wrapped``, ``last_kept``, ``stats``."""

from __future__ import annotations

import contextlib

from vtprune.patches import adapter_for

from .methods import resolve
from .runtime.session import ATTR as _ATTR
from .runtime.session import Session


def _session(model) -> Session:
    session = getattr(model, _ATTR, None)
    if session is None:
        raise ValueError(f"this {type(model).__name__} is not wrapped by vtprune; call vtprune.wrap(model, ...) first")
    return session


def is_wrapped(model) -> bool:
    return getattr(model, _ATTR, None) is not None


def wrap(model, method=None, **options):
    """Patch ``model`` in place so that it prunes visual tokens; returns the same model.

    ``method`` is a registered name (see ``vtprune.methods.available()``), a config object, or a
    list of them; ``options`` (e.g. ``keep=0.1``) go to every named method that accepts them.  There is
    no default method: without one, ``TypeError`` lists them.
    Raises ``TypeError`` for an unsupported model, a missing method or an unknown option, ``ValueError``
    for a bad value or a model that is already wrapped; the model is unchanged in every error case.
    """
    if method is None:
        from .methods import available

        raise TypeError(f"vtprune.wrap needs a method, e.g. vtprune.wrap(model, 'fastervlm', keep=0.25); "
                        f"registered: {', '.join(available())} (vtprune info --method NAME describes one)")
    if is_wrapped(model):
        raise ValueError("this model is already wrapped by vtprune; call vtprune.unwrap(model) before wrapping again")
    adapter = adapter_for(model)
    configs = resolve(method, options)
    session = Session(model, adapter, configs, rewrap=wrap)
    try:
        session.install()
    except Exception:
        session.remove()
        raise
    setattr(model, _ATTR, session)
    return model


def unwrap(model):
    """Remove every hook and patch ``wrap`` installed; the model behaves exactly as before. Returns it."""
    session = _session(model)
    session.remove()
    delattr(model, _ATTR)
    return model


@contextlib.contextmanager
def wrapped(model, method=None, **options):
    """``with vtprune.wrapped(model, "random", keep=0.25) as m: ...`` — unwrapped on exit."""
    wrap(model, method, **options)
    try:
        yield model
    finally:
        unwrap(model)


def last_kept(model) -> list:
    """For the last forward pass with images or videos: per sample, per image or clip (in prompt order), the
    kept token indices.

    Indices point into the image's (clip's) visual-token sequence as the stock model feeds it to the LLM
    (LLaVA-NeXT newline tokens included; a clip's slices one after another), ascending; every token for
    methods that cut nothing before the LLM.  Samples without images or videos get ``[]``.
    """
    return [list(images) for images in record(model).kept]


def record(model):
    """The typed record (``vtprune.runtime.records.Forward``) of the last forward pass with images.

    ``kept``/``layouts`` per sample and image, ``scores`` per image (the selector's), ``cut`` (the
    pre-LLM ``(index, real)`` over the language model's input, None when nothing was cut),
    ``length``/``llm_length``, ``visual_llm`` per sample, ``tower_layers`` the selector read, and
    ``exit`` (``vtprune.runtime.records.ExitRecord``: the layer, the tokens that left as a mask over the language
    model's input, per-sample counts, fastv's scores, dynamic exit layers) for in-LLM methods.
    """
    out = _session(model).record()
    if out is None:
        raise ValueError("the wrapped model has not run a forward pass with images yet")
    return out


def stats(model) -> dict:
    """What the wrapped model did in its last forward with images, and in total since ``wrap``.

    ``method`` names every wrapped method (``"fastervlm+vhr"``; ``methods`` lists them). Per sample
    (``samples``) and image (``images``) or clip (``videos``, each with ``frames``: its temporal slices'
    tokens in and out): visual tokens in and out of the pre-LLM cut, and per sample
    ``visual_tokens_per_layer``, the visual tokens each decoder layer saw (less than ``tokens_out``
    after an in-LLM exit).  ``llm_flops_saved``: the share of the language model's per-token work
    (every linear layer; attention's quadratic term not counted) that the forward did not spend
    compared with the stock model on the same prompt — the pre-LLM cut and in-LLM exits together.
    ``kv_bytes_saved``: the KV-cache bytes that forward did not store.  ``exit`` and the attention
    methods' entries (``vhr``, ``var``, ...) describe their own stage, each with its ``method``.

    ``totals`` adds up every language-model call with images since ``wrap``: ``forwards``,
    ``samples`` (rows with visual tokens), ``visual_tokens_in`` / ``visual_tokens_out`` (before and
    after the pre-LLM cut), ``visual_tokens_llm`` (visual tokens averaged over the LLM's layers),
    ``text_tokens``, ``exits`` (in-LLM exits taken) and ``llm_flops_saved`` over all of them.
    """
    return _session(model).stats()


def methods_of(model) -> list:
    """The method configs a wrapped model runs."""
    return list(_session(model).configs)
