"""The size bias: a kept visual token that stands for ``size`` tokens weighs as ``size`` copies of itself.

Selectors with ``summary > 0`` or ``size_bias=True`` (``vtprune.summary``) give each kept token a
size; the pre-LLM cut stores ``log(size)`` per cache entry (``CacheState.bias``: the key lives in
the KV cache, so decode steps see it too).  This runtime adds that column bias to the attention
logits of every query in the chosen decoder layers (``bias_layers``; default all) through the
wrap's attention route: the routed mask becomes an additive float mask (SDPA and eager take it;
flash attention takes no float mask, so ``wrap`` raises there).  A call whose cache holds no
biased key runs untouched.  Past an in-LLM exit (``vtprune.runtime.exit``) a layer's keys are the kept
tokens only: the biases follow that cut.
"""

from __future__ import annotations

import functools

import torch

from ..attention import additive_mask, allowed_keys, pick_layers
from ..errors import NotApplicable
from .stage import StageRuntime


class SizeBias(StageRuntime):
    def __init__(self, selector, layers, route, exit_plan=lambda layer: None):
        self.selector = selector
        self.route = route
        self.active = None  # [B, cache entries] the biases of the last call's sequence (kept for a backward
        # pass that recomputes the layers: gradient checkpointing)
        self.exit_plan = exit_plan  # layer -> the in-LLM exit's cut where it applies to that layer's keys
        self.layer_ids = pick_layers(f"{selector.name} bias", selector.bias_layers, lambda n: list(range(n)), len(layers),
                                     layers)
        if "flash" in route.original:
            raise NotApplicable(f"{selector.name} summary/size_bias adds a bias to the attention mask, which flash "
                                "attention does not take; load the model with attn_implementation='sdpa' or 'eager'")
        self.biased_calls = 0

    def install(self) -> list:
        for j in self.layer_ids:
            self.route.mask(j, functools.partial(self._bias, j))
        return []

    def begin_call(self, call):
        self.active = call.state.bias
        if self.active is not None:
            self.biased_calls += 1

    def stats(self) -> dict:
        return {"size_bias": {"layers": list(self.layer_ids), "biased_calls": self.biased_calls}}

    def _bias(self, layer, module, query, key, mask):
        bias = self.active
        if bias is None:
            return mask
        plan = self.exit_plan(layer)
        if plan is not None:  # past an in-LLM exit the layer's cache holds the kept prefill tokens only
            length, index, real = plan["length"], plan["index"], plan["real"]
            bias = bias.to(index.device)
            bias = torch.cat([bias[:, :length].expand(index.shape[0], -1).gather(1, index) * real, bias[:, length:]
                              .expand(index.shape[0], -1)], 1)
        b, _, q, _ = query.shape
        kv = key.shape[2]
        if bias.shape[1] > kv or bias.shape[0] not in (1, b):
            raise RuntimeError(f"vtprune: layer {layer} attends to {kv} keys of {b} rows; the size bias covers "
                               f"{bias.shape[1]} of {bias.shape[0]}")
        columns = query.new_zeros(b, kv)
        columns[:, :bias.shape[1]] = bias.to(query.dtype)
        allowed = allowed_keys(mask, q, kv, query.device)
        return additive_mask(mask, query, key) + columns[:, None, None, :] * allowed
