"""ZeroTuning (Han et al., arXiv 2505.11739) — its config and runtime: rescale the attention to the first token.

In the chosen layers and heads, every query row's post-softmax attention to the sequence's first
real token (BOS; per row, after any left padding) is multiplied by ``gamma`` and the row is
renormalised. That equals adding ``log(gamma)`` to that column's logit, so it runs on SDPA (and
eager) as a float bias in the attention mask — no probabilities are materialised. Flash
attention takes no float mask: ``wrap`` raises there. ``gamma = 1`` changes nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import additive_mask, allowed_keys, pick_layers, text_config
from ..errors import NotApplicable, OutOfRange
from ..runtime.stage import StageRuntime
from .base import Method, indices, register


@register("zerotuning")
@dataclass
class ZeroTuning(Method):
    """Rescale the attention every row pays to the first token by ``gamma`` (ZeroTuning, arXiv 2505.11739).

    In ``layers`` (default: all) and ``heads`` (default: all), a row's attention to the sequence's
    first real token (BOS) is multiplied by ``gamma`` and the row renormalised — the same as adding
    log(gamma) to that logit, so it runs on SDPA as a mask bias. The paper tunes ``gamma``, layers
    and heads per task (some heads want the sink up, some down); there is no universal value, so
    ``gamma`` has no effect until set (``gamma=1`` is the stock model).
    """

    stage: ClassVar[str] = "attention"
    composes_with_exit: ClassVar[bool] = True  # a mask bias: indifferent to tokens leaving mid-way
    composes_with_weights: ClassVar[bool] = True  # adds to the size bias in the same mask
    paper: ClassVar[str] = "ZeroTuning: Han et al. 2025, arXiv 2505.11739"
    ranges: ClassVar[dict] = {"gamma": "float > 0 (1 = no change)", "layers": "list of decoder layers; None: all",
                              "heads": "list of heads; None: all"}
    gamma: float = 1.0
    layers: list | None = None
    heads: list | None = None

    def validate(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not self.gamma > 0:
            raise ValueError(f"zerotuning gamma must be > 0, got {self.gamma!r}")
        if self.layers is not None:
            self.layers = indices(self.layers)
        if self.heads is not None:
            self.heads = indices(self.heads)

    def runtime(self, model, layers, route):
        return SinkScaling(model, self, layers, route)


class SinkScaling(StageRuntime):
    def __init__(self, model, method, layers, route):
        self.method = method
        n = len(layers)
        self.layer_ids = pick_layers("zerotuning", method.layers, lambda n: list(range(n)), n, layers)
        heads = text_config(model).num_attention_heads
        bad = [h for h in (method.heads or []) if not 0 <= h < heads]
        if bad:
            raise OutOfRange(f"zerotuning heads {bad} do not exist: the language model has {heads} heads")
        self.route = route
        if "flash" in self.route.original:
            raise NotApplicable("zerotuning biases the attention mask, which flash attention does not take; "
                             "load the model with attn_implementation='sdpa' or 'eager'")

    def install(self) -> list:
        if self.method.gamma != 1.0:
            for j in self.layer_ids:
                self.route.mask(j, functools.partial(self._bias, j))
        return []

    def _bias(self, layer, module, query, key, mask):
        """The layer's mask as a float bias [B, 1|H, q, kv] with log(gamma) on each row's first token."""
        b, h, q, _ = query.shape
        kv = key.shape[2]
        device, dtype = query.device, query.dtype
        allowed = allowed_keys(mask, q, kv, device).expand(b, -1, q, kv)
        base = additive_mask(mask, query, key)
        first = allowed[:, 0, -1].float().argmax(-1)  # each row's first real token (after left padding)
        column = torch.zeros(b, 1, 1, kv, device=device, dtype=torch.bool)
        column[torch.arange(b, device=device), 0, 0, first] = True
        bias = (column & allowed[:, :1]).to(dtype) * math.log(self.method.gamma)
        if self.method.heads:
            chosen = torch.zeros(1, h, 1, 1, device=device, dtype=dtype)
            chosen[0, list(self.method.heads)] = 1
            bias = bias * chosen
        return base + bias
