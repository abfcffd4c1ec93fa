"""One attention router per wrap: the language model's attention goes through vtprune, without
copying modelling code.

A per-wrap attention function is registered in transformers' ``AttentionInterface`` (with the
original implementation's mask builder in ``AttentionMaskInterface``, or padding would be ignored)
and selected for the text config only.  Stage runtimes add interceptors per decoder layer, run in
the order added: mask transforms bias the logits (``zerotuning``), observers see the layer's query
and key (RoPE applied, cache included) and final mask (``fastv``, ``dart``), the original
implementation runs (SDPA, eager, flash), and modifiers rewrite that layer's output (``var``
recomputes a few query rows).  ``remove`` switches the text config back and unregisters the names
(the one private transformers attribute vtprune touches, in ``_unregister``; a test fails when
transformers renames it).
"""

from __future__ import annotations

import itertools
import sys

import torch

from .errors import NotApplicable, OutOfRange

_COUNTER = itertools.count()


def pick_layers(name, chosen, default, n_layers, layers=None) -> list:
    """The decoder layers an attention intervention acts on: ``chosen`` or ``default(n)``, checked.  With the
    decoder ``layers``, only those that attend (a ``self_attn``): a default skips the others (Qwen3.5's
    linear-attention layers), a choice naming one raises."""
    ids = chosen if chosen is not None else default(n_layers)
    bad = [j for j in ids if not 0 <= j < n_layers]
    if bad:
        raise OutOfRange(f"{name} layers {bad} do not exist: the language model has {n_layers} decoder layers")
    if layers is not None:
        attending = [j for j in range(n_layers) if hasattr(layers[j], "self_attn")]
        if chosen is None:
            return [j for j in ids if j in attending]
        linear = [j for j in ids if j not in attending]
        if linear:
            raise ValueError(f"{name} layers {linear} have no attention heads (linear-attention layers): choose among "
                             f"{attending}")
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


def attention_probs(query, key, mask, scaling, last_only: bool = False):
    """[B, rows, kv] post-softmax attention of a routed call's query rows (only the last with ``last_only``),
    averaged over heads, in fp32 (grouped key heads repeated; rows with no allowed key give 0)."""
    heads, kv_heads = query.shape[1], key.shape[1]
    key = key.float().repeat_interleave(heads // kv_heads, dim=1)
    n = key.shape[2]
    q = query.float()[:, :, -1:] if last_only else query.float()
    logits = (q @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    allowed = allowed_keys(mask, n, n, query.device)
    if last_only:
        allowed = allowed[..., -1:, :]
    return logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0).mean(1)


def additive_mask(mask, query, key):
    """The routed mask as an additive float mask [B, 1|H, q, kv] in the query's dtype (0 = may attend,
    the dtype's minimum = blocked); causal where SDPA passed none."""
    b, _, q, _ = query.shape
    kv = key.shape[2]
    allowed = allowed_keys(mask, q, kv, query.device).expand(b, -1, q, kv)
    if mask is not None and mask.dtype != torch.bool:
        return mask[..., :kv].expand(b, -1, q, kv).to(query.dtype)
    return torch.zeros(allowed.shape, device=query.device, dtype=query.dtype).masked_fill(
        ~allowed, torch.finfo(query.dtype).min)


def _unregister(name):
    """Take a registered attention function and mask builder out again (transformers has no public way)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface._global_mapping.pop(name, None)
    AttentionMaskInterface._global_mapping.pop(name, None)


class AttentionRoute:
    def __init__(self, model):
        self.model = model
        self.original = text_config(model)._attn_implementation or "sdpa"
        self.name = f"vtprune_{next(_COUNTER)}"
        self.masks = {}  # layer_idx -> [fn(module, query, key, attention_mask) -> attention_mask]
        self.observers = {}  # layer_idx -> [fn(module, query, key, attention_mask, scaling)]
        self.modifiers = {}  # layer_idx -> [fn(module, query, key, value, attention_mask, kwargs, output) -> output]
        self.installed = False

    def mask(self, layer, fn):
        self.masks.setdefault(layer, []).append(fn)

    def observe(self, layer, fn):
        self.observers.setdefault(layer, []).append(fn)

    def modify(self, layer, fn):
        self.modifiers.setdefault(layer, []).append(fn)

    @property
    def needed(self) -> bool:
        return bool(self.masks or self.observers or self.modifiers)

    def install(self):
        from transformers import AttentionInterface, AttentionMaskInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        original = self.original
        if original not in ALL_MASK_ATTENTION_FUNCTIONS:
            raise NotApplicable(f"vtprune cannot route attention implementation {original!r}; use sdpa, eager or flash")

        def attention(module, query, key, value, attention_mask, **kwargs):
            layer = getattr(module, "layer_idx", None)
            for transform in self.masks.get(layer, ()):
                attention_mask = transform(module, query, key, attention_mask)
            for observer in self.observers.get(layer, ()):
                observer(module, query, key, attention_mask, kwargs.get("scaling"))
            if original in ALL_ATTENTION_FUNCTIONS and original != "eager":
                impl = ALL_ATTENTION_FUNCTIONS[original]
            else:
                impl = sys.modules[type(module).__module__].eager_attention_forward
            output = impl(module, query, key, value, attention_mask, **kwargs)
            for modifier in self.modifiers.get(layer, ()):
                output = modifier(module, query, key, value, attention_mask, kwargs, output)
            return output

        AttentionInterface.register(self.name, attention)
        AttentionMaskInterface.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS[original])
        self.model.set_attn_implementation({"text_config": self.name})
        self.installed = True

    def remove(self):
        if self.installed:
            self.model.set_attn_implementation({"text_config": self.original})
            self.installed = False
        _unregister(self.name)
