"""A budget per request: a request's ``mm_processor_kwargs={"vtprune": {"keep": 0.1}}`` prunes its images to that
``keep`` with the server's method; requests without it get the server's ``keep``.

vLLM hands a request's ``mm_processor_kwargs`` to the model's multimodal processor, which sizes the prompt, and
not to the model, which embeds the image.  So the processor (``budgeted``) reads the option, checks it (a
``ValueError`` before the request is scheduled: HTTP 400 from the server, raised by ``generate`` offline), sizes
the prompt by it (``kept_count`` reads ``current``) and adds to every image and video item one more field, the
item's ``keep`` as integers (``FIELD``, ``FIELD_VIDEO``: vLLM casts floating tensors to the model's dtype, which
would round 0.1); the model (``Weighing`` wraps each binding's ``embed_multimodal``) turns the fields back into
configs that ``keep_rows`` (and a clip's selection) take in order, one per item.  The option enters each image's hash, so vLLM's encoder and prefix caches keep budgets apart.

A request may keep fewer tokens than the server's ``keep``, not more: vLLM sizes its encoder cache and its
profiling run by the server's count.  The server needs vLLM's ``--trust-request-mm-kwargs`` to accept the field
(``vtprune serve --request-keep`` adds it).
"""

from __future__ import annotations

import contextvars
import functools
import json

import torch

KEY = "vtprune"  # the request's mm_processor_kwargs key
FIELD = "vtprune_keep"  # each image item's budget: [numerator, denominator, is a count]
FIELD_VIDEO = "vtprune_keep_video"  # each video item's (vtprune.serving.qwen_video)
_current = contextvars.ContextVar("vtprune_request_keep", default=None)
_served = contextvars.ContextVar("vtprune_served", default=None)
_profiling = contextvars.ContextVar("vtprune_profiling", default=False)


def parse(config, given):
    """The config a request's ``mm_processor_kwargs["vtprune"]`` asks for (None where it asks for nothing);
    ``ValueError`` naming the option and its range."""
    if given is None:
        return None
    if not isinstance(given, dict) or set(given) != {"keep"}:
        raise ValueError(f"mm_processor_kwargs['{KEY}'] takes {{'keep': K}} (a float in (0, 1] or an int >= 1, at "
                         f"most the server's keep={config.keep!r}); got {given!r}")
    return with_keep(config, given["keep"])


def with_keep(config, keep):
    """``config`` with another ``keep`` (checked)."""
    if keep == config.keep and type(keep) is type(config.keep):
        return config
    try:
        return _with_keep(json.dumps(config.to_dict()), keep)
    except (TypeError, ValueError) as err:
        raise ValueError(f"mm_processor_kwargs['{KEY}']['keep']: {err}") from None


@functools.lru_cache(maxsize=256, typed=True)  # (typed: keep=1, one token, is not keep=1.0, all of them)
def _with_keep(text: str, keep):
    from ..methods import from_dict

    return from_dict({**json.loads(text), "keep": keep})


def current(config):
    """The config of the request being processed, ``config`` (the server's) outside one or where it asks for none."""
    return _current.get() or config


def serving():
    """The server's config while a vtprune-served processor processes a request, else None."""
    return _served.get()


def profiling() -> bool:
    """Whether the request being processed is vLLM's profiling dummy (which sizes its caches), not a user's."""
    return _profiling.get()


def kept_count(config, layout) -> int:
    """What the request being processed keeps of an image on ``layout``: at most what the server keeps."""
    asked = current(config)
    n = config.kept_count(layout)
    if asked is config:
        return n
    k = asked.kept_count(layout)
    if k > n:
        raise ValueError(f"mm_processor_kwargs['{KEY}']['keep']={asked.keep!r} keeps {k} of an image's "
                         f"{layout.n_content} tokens, more than the server's keep={config.keep!r} ({n}), by which vLLM "
                         "sized its caches: ask for less, or start the server with a larger keep")
    return k


def encode(config) -> torch.Tensor:
    """[3] int64: ``config.keep`` as numerator, denominator and whether it is a count (exact for any float)."""
    keep = config.keep
    if isinstance(keep, int):
        return torch.tensor([keep, 1, 1])
    return torch.tensor([*float(keep).as_integer_ratio(), 0])


def decode(config, rows) -> list:
    """Per image, the config of the budget ``encode`` wrote (``rows``: [N, 3], or a list of [3])."""
    if rows is None:
        return []
    rows = torch.stack([torch.as_tensor(r) for r in rows]) if isinstance(rows, (list, tuple)) else rows
    out = []
    for num, den, count in rows.reshape(-1, 3).tolist():
        out.append(with_keep(config, int(num) if count else num / den))
    return out


def budgeted(Processor, config):
    """A subclass of vLLM's multimodal ``Processor`` that reads a request's ``keep`` (see the module)."""
    from vllm.multimodal.inputs import MultiModalFieldConfig

    class Budgeted(Processor):
        def apply(self, inputs, timing_ctx):
            token = _current.set(parse(config, (inputs.hf_processor_mm_kwargs or {}).get(KEY)))
            served = _served.set(config)
            try:
                return super().apply(inputs, timing_ctx)
            finally:
                _served.reset(served)
                _current.reset(token)

        def get_dummy_mm_inputs(self, *args, **kwargs):
            token = _profiling.set(True)
            try:
                return super().get_dummy_mm_inputs(*args, **kwargs)
            finally:
                _profiling.reset(token)

        def _apply_hf_processor_main(self, mm_items, hf_kwargs):
            out = super()._apply_hf_processor_main(mm_items=mm_items,
                                                   hf_kwargs={k: v for k, v in hf_kwargs.items() if k != KEY})
            for modality, field in (("image", FIELD), ("video", FIELD_VIDEO)):
                n = len(mm_items[modality]) if modality in mm_items else 0
                if n:
                    out[field] = encode(current(config)).repeat(n, 1)
            return out

        def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
            fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
            fields[FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
            fields[FIELD_VIDEO] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
            return fields

    Budgeted.__name__ = Budgeted.__qualname__ = f"Budgeted{Processor.__name__}"
    return Budgeted
