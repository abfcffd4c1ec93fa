"""Route the language model's attention through vtprune without copying modelling code.

A per-wrap attention function is registered in transformers' ``AttentionInterface`` (with the
original implementation's mask builder in ``AttentionMaskInterface``, or padding would be
ignored) and selected for the text config only; it lets observers see each layer's query and key
(RoPE applied, cache included), lets mask transforms bias the logits (``zerotuning``), calls the
original implementation (SDPA, eager, flash), and lets modifiers rewrite that layer's output
(``var`` recomputes a few query rows).
``remove`` switches the text config back and unregisters the names.
"""

from __future__ import annotations

import itertools
import sys

import torch

from .errors import NotApplicable

_COUNTER = itertools.count()


def pick_layers(name, chosen, default, n_layers) -> list:
    """The decoder layers an attention intervention acts on: ``chosen`` or ``default(n)``, checked."""
    ids = chosen if chosen is not None else default(n_layers)
    bad = [j for j in ids if not 0 <= j < n_layers]
    if bad:
        raise NotApplicable(f"{name} layers {bad} do not exist: the language model has {n_layers} decoder layers")
    return ids


def text_config(model):
    """The language model's config of a composite VLM config (the config itself otherwise)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def allowed_keys(mask, q, kv, device):
    """Bool [B|1, 1|H, q, kv]: which keys each of a call's ``q`` query rows (the last ``q`` of ``kv``
    positions) may attend to — the routed attention mask as bool, or causal where SDPA passed none."""
    if mask is None:
        rows = torch.arange(q, device=device)[:, None] + (kv - q)
        return (torch.arange(kv, device=device)[None, :] <= rows)[None, None]
    mask = mask[..., :kv]
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


class AttentionRoute:
    def __init__(self, model):
        self.model = model
        self.original = text_config(model)._attn_implementation or "sdpa"
        self.name = f"vtprune_{next(_COUNTER)}"
        self.observers = {}  # layer_idx -> fn(module, query, key, attention_mask, scaling)
        # layer_idx -> fn(module, query, key, value, attention_mask, kwargs, output) -> output
        self.modifiers = {}
        # layer_idx -> fn(module, query, key, attention_mask) -> attention_mask (before the call)
        self.masks = {}
        self.installed = False

    def install(self):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        # read now: a route installed earlier in this wrap (the in-LLM exit's) is the one to call
        self.original = original = text_config(self.model)._attn_implementation or "sdpa"
        if original not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            raise NotApplicable(f"vtprune cannot route attention implementation {original!r}; use sdpa, eager or flash")

        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = getattr(module, "layer_idx", None)
            observer = self.observers.get(layer)
            if observer is not None:
                observer(module, query, key, attention_mask, kwargs.get("scaling"))
            transform = self.masks.get(layer)
            if transform is not None:
                attention_mask = transform(module, query, key, attention_mask)
            if original in ALL_ATTENTION_FUNCTIONS._global_mapping and original != "eager":
                impl = ALL_ATTENTION_FUNCTIONS[original]
            else:
                impl = sys.modules[type(module).__module__].eager_attention_forward
            output = impl(module, query, key, value, attention_mask, **kwargs)
            modifier = self.modifiers.get(layer)
            if modifier is not None:
                output = modifier(module, query, key, value, attention_mask, kwargs, output)
            return output

        AttentionInterface.register(self.name, attention)
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        self.model.set_attn_implementation({"text_config": self.name})
        self.installed = True

    def remove(self):
        from transformers import AttentionInterface, AttentionMaskInterface

        if self.installed:
            self.model.set_attn_implementation({"text_config": self.original})
            self.installed = False
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)
