"""What differs between the transformers releases vtprune supports (5.18 to the newest 5.x), in one place.

* The KV cache argument and output field: ``cache`` since 5.24 (``past_key_values`` still accepted,
  with a deprecation warning, until 5.40), ``past_key_values`` before.  It reaches our hooks as
  a keyword of the language model's ``forward``, of ``generate``'s ``prepare_inputs_for_generation``
  and ``create_masks_for_generate``, and as a field of their outputs.

* Activation (gradient) checkpointing: ``activation_checkpointing_enable`` since 5.23,
  ``gradient_checkpointing_enable`` (deprecated since) before.

Nothing else differs for vtprune between 5.18 and 5.25 (``scripts/compat.sh`` runs the suite on the
floor, the pinned and the newest release).
"""

from __future__ import annotations

CACHE_KEYS = ("cache", "past_key_values")


def cache_of(kwargs: dict):
    """The KV cache passed to a call, under either name (None when there is none)."""
    for key in CACHE_KEYS:
        cache = kwargs.get(key)
        if cache is not None:
            return cache
    return None


def cache_of_output(output):
    """The KV cache a call returned (None when there is none), read without the deprecated alias."""
    for key in CACHE_KEYS:
        cache = output.get(key) if isinstance(output, dict) else getattr(output, key, None)
        if cache is not None:
            return cache
    return None


def enable_checkpointing(model):
    """Turn on activation checkpointing under the name the installed release gives it."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
