"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417) — its config: text-guided sparsification inside
the LLM, in stages, with recycling of the pruned tokens.

As the SparseVLM code (v1.5, the ICML release) computes it, per sample:

* raters, once per prefill: the text tokens after the image whose relevance
  ``softmax_text(H_v H_t^T)`` averaged over the visual tokens (input embeddings) exceeds the mean;
* after each layer of ``pruning_loc`` (default 2, 6, 15 of 32), the visual tokens still in the
  sequence are scored by that layer's attention probabilities from the raters (mean over heads
  and raters) and the top ``k`` stay: ``k`` from the code's table for ``retain`` (192, 128, 96 or 64
  tokens on average over the layers of LLaVA-1.5's 576), scaled to the image's token count, at most
  the current count - 1;
* recycling: of the tokens that left, the ``int(0.3 n) + 1`` best scored are clustered by density
  peaks (DPC-kNN, ``int(r / 10) + 1`` clusters, on their hidden states) and each cluster's mean
  hidden state goes on as one token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import attention_probs
from ..errors import OutOfRange
from .base import LayerMethod, indices, register

TABLE = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}  # kept per stage of 576
DEFAULT_LOC = (2, 6, 15)  # of 32 layers


def dpc_knn(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """Cluster of every row of ``x`` [n, C] by density peaks with k nearest neighbours (TCFormer's DPC-kNN, as
    SparseVLM uses it; without its random tie-break): density exp(-mean squared distance to the k nearest,
    itself included, k = clusters), centres the top ``clusters`` by density x distance to a denser token."""
    n = x.shape[0]
    clusters = min(clusters, n)
    dist = torch.cdist(x.float(), x.float()) / math.sqrt(x.shape[1])
    near = dist.topk(min(clusters, n), largest=False, dim=-1).values
    density = (-(near ** 2).mean(-1)).exp()
    denser = density[None, :] > density[:, None]
    parent = torch.where(denser, dist, dist.max()).min(-1).values
    centres = torch.sort(parent * density, descending=True, stable=True).indices[:clusters]
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(clusters, device=x.device)
    return centres, assign


@register("sparsevlm")
@dataclass
class SparseVLM(LayerMethod):
    """Text raters score the visual tokens after each of ``pruning_loc``; the best stay, the pruned are recycled
    into a few merged tokens (SparseVLM, ICML 2025).

    ``pruning_loc`` (default 2, 6, 15 of a 32-layer model, scaled to the model's depth) are the layers
    whose attention decides; the tokens leave before the next layer.  ``retain`` picks the code's table of
    per-stage counts (192, 128, 96, 64: the average visual tokens per layer on LLaVA-1.5), scaled to each
    sample's visual tokens.  ``recycle=False`` drops without merging (as SparseVLM v2.0 does).
    Differences from the SparseVLM code: batches (raters, counts and merges per sample; the code runs
    batch 1); a merged token takes the slot of its cluster's centre at that token's original position
    (the code appends the merged tokens after the kept ones and renumbers all positions); no random
    tie-break in the clustering; decode positions stay original.
    """

    paper: ClassVar[str] = "SparseVLM: Zhang et al., ICML 2025, arXiv 2410.04417"
    ranges: ClassVar[dict] = {"layer": "not an option of sparsevlm: the stages follow pruning_loc", "pruning_loc": "list of decoder layers whose attention decides (tokens leave "
                                             "after them); None: 2, 6, 15 of 32 scaled to the depth",
                              "retain": "192, 128, 96 or 64: the code's table of per-stage counts",
                              "recycle": "bool: merge the best pruned tokens into a few (v1)"}
    needs_attention: ClassVar[bool] = True
    layer: int | None = None  # not an option: the stages follow ``pruning_loc``
    pruning_loc: list | None = None
    retain: int = 192
    recycle: bool = True

    def validate(self):
        if self.layer is not None:
            raise ValueError("sparsevlm has no single 'layer': it prunes after each layer of pruning_loc=[...]")
        if self.retain not in TABLE:
            raise ValueError(f"sparsevlm retain must be one of {sorted(TABLE)}, got {self.retain!r}")
        if not isinstance(self.recycle, bool):
            raise TypeError(f"sparsevlm recycle must be True or False, got {self.recycle!r}")
        if self.pruning_loc is not None:
            self.pruning_loc = indices(self.pruning_loc)
            if not self.pruning_loc or len(self.pruning_loc) > 3:
                raise ValueError("sparsevlm pruning_loc names one to three decoder layers")

    def locations(self, n_layers) -> list:
        if self.pruning_loc is not None:
            return list(self.pruning_loc)
        scaled = sorted({min(n_layers - 2, round(loc * n_layers / 32)) for loc in DEFAULT_LOC})
        return [j for j in scaled if j >= 0]

    def stage_layers(self, n_layers):
        layers = [j + 1 for j in self.locations(n_layers)]
        bad = [j - 1 for j in layers if not 1 <= j < n_layers]
        if bad or not layers:
            raise OutOfRange(f"sparsevlm pruning_loc {bad or layers} must lie in [0, {n_layers - 2}] (the "
                                f"language model has {n_layers} decoder layers; tokens leave after each)")
        return layers

    def first_layer(self, n_layers):
        return self.stage_layers(n_layers)[0]

    def observe(self, view, query, key, mask, scaling):
        """[B, rows, L]: the layer's attention probabilities (mean over heads) of every row."""
        return attention_probs(query, key, mask, scaling)

    def raters(self, view, b) -> torch.Tensor:
        """Bool [L] over the prefill: sample ``b``'s raters (text after its last visual token, relevance > mean)."""
        visual, text = view.visual[b], view.text[b].to(view.visual.device)
        after = text & (torch.arange(visual.numel(), device=visual.device) > visual.nonzero().max())
        embeds = view.embeds[b].float()
        relevance = (embeds[visual] @ embeds[after].T).softmax(-1).mean(0)
        out = torch.zeros_like(visual)
        out[after.nonzero().squeeze(1)[relevance > relevance.mean()]] = True
        return out

    def drop(self, view, visual):
        index = view.index
        merges = []
        stage = view.stage_layers.index(view.stage)
        entered = view.visual.sum(1)
        probs = view.scores  # [B, L', L']
        drop = visual.clone()
        for b in range(visual.shape[0]):
            current = visual[b].nonzero().squeeze(1)
            if current.numel() <= 1:
                drop[b] = False
                continue
            raters = self.raters(view, b)
            if index is not None:
                raters = raters[index[b].to(raters.device)] & view.real[b].to(raters.device)
            rows = raters.to(probs.device).nonzero().squeeze(1)
            if rows.numel() == 0:
                rows = torch.tensor([probs.shape[1] - 1], device=probs.device)  # no rater: the last token
            score = probs[b][rows][:, current.to(probs.device)].mean(0)
            k = min(max(1, round(TABLE[self.retain][stage] * int(entered[b]) / 576)), current.numel() - 1)
            order = torch.sort(score, descending=True, stable=True).indices
            drop[b, current[order[:k]]] = False
            gone = order[k:]
            if self.recycle and gone.numel():
                merges += self._recycle(view, b, current, score, gone, drop)
        return drop, merges

    def _recycle(self, view, b, current, score, gone, drop) -> list:
        """The best ``int(0.3 n) + 1`` pruned tokens, clustered; each cluster's mean takes its centre's slot:
        ``[(row, position, feature, member positions)]``."""
        gone = torch.sort(gone).values  # ascending, as the code lists the deleted tokens
        r = min(int(0.3 * gone.numel()) + 1, gone.numel())
        best = gone[torch.sort(score[gone], descending=True, stable=True).indices[:r]]
        c = int(r / 10) + 1
        positions = current[best.to(current.device)]
        hidden = view.hidden[b, positions.to(view.hidden.device)].float()
        centres, assign = dpc_knn(hidden, c)
        merges = []
        for j, centre in enumerate(centres.tolist()):
            members = positions[(assign == j).nonzero().squeeze(1).to(positions.device)]
            drop[b, positions[centre]] = False
            merges.append((b, int(positions[centre]), hidden[(assign == j)].mean(0), members))
        return merges
