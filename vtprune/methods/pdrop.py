"""PyramidDrop (Xing et al., CVPR 2025, arXiv 2410.17247) — its config: visual tokens leave in stages.

The language model is split into stages at ``layer_list`` (default the quarter points, layers 8,
16 and 24 of a 32-layer model, as the PyramidDrop scripts set); before each stage's first layer the
visual tokens still in the sequence are ranked by the attention the last instruction token pays
them, and a share ``ratio`` (λ, default 0.5) of those that entered the LLM survives each stage:
λ, λ², λ³ of a sample's visual tokens.  The cut is vtprune's in-LLM exit (``vtprune.runtime.exit``),
one stage after the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import attention_probs
from ..budget import tokens_to_keep
from ..errors import OutOfRange
from .base import LayerMethod, indices, register


@register("pdrop")
@dataclass
class PDrop(LayerMethod):
    """Visual tokens leave in stages: before each layer of ``layer_list`` only the ``ratio`` (λ) share of
    them the last instruction token attends to most goes on (PyramidDrop, CVPR 2025).

    Score: the post-softmax attention of the prompt's last token to each visual token in the layer
    before the stage, averaged over heads (FastV's score, read from that layer's own q/k through the
    routed attention).  Stage s keeps ``round(ratio**s * n)`` of a sample's n visual tokens.
    Differences from the PyramidDrop code: it recomputes the *next* layer's query and key for the
    score, vtprune reads the layer that just ran (no second attention pass); positions stay
    original (the code renumbers them after each drop).  ``layer_list=None`` gives the quarter
    points of the model's depth (8, 16, 24 of 32).
    """

    paper: ClassVar[str] = "PyramidDrop: Xing et al., CVPR 2025, arXiv 2410.17247"
    ranges: ClassVar[dict] = {"layer": "not an option of pdrop: the stages start at layer_list", "layer_list": "list of decoder layers (1 .. layers-1) starting each stage; None: "
                                            "the quarter points", "ratio": "float in (0, 1): λ, the share kept per stage"}
    needs_attention: ClassVar[bool] = True
    layer: int | None = None  # not an option of pdrop: its stages start at ``layer_list``
    layer_list: list | None = None
    ratio: float = 0.5

    def validate(self):
        if self.layer is not None:
            raise ValueError("pdrop has no single 'layer': its stages start at layer_list=[...]")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio < 1.0:
            raise ValueError(f"pdrop ratio (λ) must lie in (0, 1), got {self.ratio!r}")
        if self.layer_list is not None:
            self.layer_list = indices(self.layer_list)
            if not self.layer_list:
                raise ValueError("pdrop layer_list must name at least one decoder layer")

    def stage_layers(self, n_layers):
        layers = self.layer_list if self.layer_list is not None else \
            sorted({max(1, n_layers * q // 4) for q in (1, 2, 3)})
        bad = [j for j in layers if not 1 <= j < n_layers]
        if bad:
            raise OutOfRange(f"pdrop layer_list {bad} must lie in [1, {n_layers - 1}] (the language model has "
                                f"{n_layers} decoder layers)")
        return layers

    def first_layer(self, n_layers):
        return self.stage_layers(n_layers)[0]

    def observe(self, view, query, key, mask, scaling):
        """[B, L]: the attention the prompt's last token pays each token, mean over heads (FastV's score)."""
        return attention_probs(query, key, mask, scaling, last_only=True)[:, 0]

    def drop(self, view, visual):
        stage = view.stage_layers.index(view.stage) + 1
        scores = view.scores.to(visual.device).masked_fill(~visual, float("-inf"))
        entered = view.visual.sum(1)
        drop = visual.clone()
        for b in range(visual.shape[0]):
            k = min(int(visual[b].sum()), tokens_to_keep(self.ratio ** stage, int(entered[b])))
            drop[b, torch.sort(scores[b], descending=True, stable=True).indices[:k]] = False
        return drop
