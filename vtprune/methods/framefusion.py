"""FrameFusion (Fu et al., ICCV 2025, arXiv 2501.01986) — its config: inside the LLM, video tokens that repeat
the same cell of the previous frame are merged into it, layer after layer, then the least attended are pruned.

As the FrameFusion code (``thu-nics/FrameFusion``, ``framefusion/main.py``) computes it, per sample:

* **merging**, before layer 0 (on the input embeddings) and after each later layer while it goes on: every
  visual token is compared with the token of the same cell (``patch_type``: its spatial index in a frame) in
  the latest earlier frame that is still in the sequence, ``cos(x, x_prev)``.  Tokens at or above
  ``similarity_lower_bound`` (0.6) leave, and a run of them over consecutive frames is averaged into the token
  before the run: ``(x_anchor + x_1 + ... + x_r) / (r + 1)``.  ``ρ`` = merged / visual tokens present;
  while ``ρ`` stays below ``s_max`` (the next bullet) the merge is applied and recorded, and merging ends once
  ``ρ < ratio_lower_bound`` (0.1); otherwise only the ``int(s_max n)`` most similar tokens merge and
  FrameFusion ends (no pruning).
* **the budget**: ``cost`` (0.3) is the mean share of visual tokens a decoder layer sees; after layers with
  merge ratios ``s_1 .. s_l``, ``s_max`` solves ``sum_i prod_{j<=i} (1 - s_j) + (L - l) prod_j (1 - s_j)
  (1 - s_max) = L cost`` (0 when no sparsity is needed);
* **pruning**, one layer after merging ended: the attention of the prompt's last token in that layer, mean
  over heads, ranks the visual tokens; the top ``round(n (1 - s_max))`` stay.

Positions of kept tokens stay original (the code gathers cos/sin alike).

Differences from the code, all from running in vtprune's in-LLM exit (``vtprune.runtime.exit``):
* the code merges *between* a layer's attention and its MLP (the layer's MLP runs on the merged token); vtprune
  merges the layer's outputs before the next layer (each token's MLP ran on its own state).  The keys and
  values of that layer hold every token in both.
* ``L`` is the model's depth (the code hard-codes 28, Qwen2-7B's); layers before ``layer`` (deepstack
  families: those that take visual features) count as layers with nothing merged.
* batches: each sample merges and prunes on its own (the code asserts batch 1); several clips in a sample merge
  within each clip (the code's cells run over the whole sample); a still image's tokens each have a cell of
  their own, so images only meet the pruning step.
* the capped branch ranks only tokens that have an earlier token in their cell (the code's top-k may take a
  cell's first token and merge it into the previous cell's last); where the code raises "The cost is too
  small" once merges alone overspend ``cost``, every remaining visual token leaves at the pruning step.
* similarities and averages are computed in fp32 (the code: in the model's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..attention import attention_probs
from ..errors import OutOfRange
from .base import LayerMethod, register


def pruning_ratio(sparsity: list, cost: float, n_layers: int) -> float:
    """The sparsity the next layer needs so that the mean share of visual tokens over ``n_layers`` layers is
    ``cost``, after layers whose merge ratios were ``sparsity`` (FrameFusion's ``_compute_pruning_ratio``);
    1 when the layers so far spent the budget already."""
    kept, spent = 1.0, 0.0
    for s in sparsity:
        kept *= 1.0 - s
        spent += kept
    left = n_layers * cost - spent
    layers = n_layers - len(sparsity)
    if left < 0 or layers <= 0 or kept <= 0:
        return 1.0
    share = left / (layers * kept)
    return 0.0 if share > 1 else 1.0 - share


@dataclass
class _Row:
    """One sample's progress through FrameFusion in the current prefill."""

    sparsity: list
    merging: bool = True
    pruned: bool = False


@register("framefusion")
@dataclass
class FrameFusion(LayerMethod):
    """Similar tokens of consecutive frames merge inside the LLM, layer after layer, then the least attended
    video tokens are pruned (FrameFusion, ICCV 2025).

    ``cost`` is the mean share of visual tokens a decoder layer sees (0.3: 70% fewer token-layers);
    ``similarity_lower_bound`` the cosine from which a token merges into the same cell of the previous frame;
    ``ratio_lower_bound`` the merge ratio under which merging ends and pruning follows; ``layer`` the first
    decoder layer before which tokens may merge (0: on the input embeddings, as the code does; families that
    add visual features inside the LLM, like Qwen3-VL's deepstack, need a later one); ``last_layer`` the last
    before which tokens may leave (default the model's last; Gemma 4's layers that reuse earlier keys need an
    earlier one).
    """

    paper: ClassVar[str] = "FrameFusion: Fu et al., ICCV 2025, arXiv 2501.01986"
    ranges: ClassVar[dict] = {
        "cost": "float in (0, 1]: the mean share of visual tokens a decoder layer sees",
        "similarity_lower_bound": "float in [-1, 1]: cosine with the same cell of the previous frame from which a "
                                  "token merges",
        "ratio_lower_bound": "float in [0, 1): merge ratio under which merging ends and pruning follows",
        "layer": "int decoder layer: the first before which tokens may merge (0: on the input embeddings)",
        "last_layer": "int decoder layer or None: the last before which tokens may leave (None: the model's last; "
                      "Gemma 4: before the layers that reuse keys)"}
    needs_attention: ClassVar[bool] = True  # the pruning step reads the previous layer's last-query attention
    needs_cells: ClassVar[bool] = True  # reads view.cells (each visual token's cell)
    layer: int = 0
    cost: float = 0.3
    similarity_lower_bound: float = 0.6
    ratio_lower_bound: float = 0.1
    last_layer: int | None = None

    def validate(self):
        super().validate()
        for name, inside, interval in (("cost", lambda v: 0.0 < v <= 1.0, "(0, 1]"),
                                       ("similarity_lower_bound", lambda v: -1.0 <= v <= 1.0, "[-1, 1]"),
                                       ("ratio_lower_bound", lambda v: 0.0 <= v < 1.0, "[0, 1)")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"framefusion {name} must be a number, got {value!r}")
            if not inside(value):
                raise ValueError(f"framefusion {name} must lie in {interval}, got {value!r}")
            setattr(self, name, float(value))
        if self.last_layer is not None and (isinstance(self.last_layer, bool) or not isinstance(self.last_layer, int)
                                            or self.last_layer < self.layer):
            raise ValueError(f"framefusion last_layer must be an int >= layer ({self.layer}) or None, got "
                             f"{self.last_layer!r}")

    def first_layer(self, n_layers):
        if not 0 <= self.layer < n_layers:
            raise OutOfRange(f"framefusion layer={self.layer} must lie in [0, {n_layers - 1}] (the language model has "
                             f"{n_layers} decoder layers)")
        if n_layers * self.cost < self.layer:
            raise OutOfRange(f"framefusion cost={self.cost} is a mean of {n_layers * self.cost:.2f} layers' visual "
                             f"tokens, less than the {self.layer} layers before layer={self.layer} see in full; "
                             f"raise cost to at least {self.layer / n_layers:.3f}")
        return self.layer

    def stage_layers(self, n_layers):
        last = n_layers - 1 if self.last_layer is None else self.last_layer
        if last >= n_layers:
            raise OutOfRange(f"framefusion last_layer={last} must lie in [{self.layer}, {n_layers - 1}] (the language "
                             f"model has {n_layers} decoder layers)")
        return list(range(self.first_layer(n_layers), last + 1))

    def observe(self, view, query, key, mask, scaling):
        """[B, L]: the attention the prompt's last token pays each token, mean over heads."""
        return attention_probs(query, key, mask, scaling, last_only=True)[:, 0]

    def drop(self, view, visual):
        rows = view.memo.setdefault("framefusion", [_Row([0.0] * view.stage_layers[0]) for _ in range(visual.shape[0])])
        cells = view.cells.to(visual.device)
        if view.index is not None:
            cells = cells.gather(1, view.index.to(visual.device))
        drop = torch.zeros_like(visual)
        merges = []
        for b, row in enumerate(rows):
            current = visual[b].nonzero().squeeze(1)
            if row.pruned or current.numel() == 0:
                continue
            if not row.merging:  # merging ended before the previous layer: prune by its last-query attention
                ratio = pruning_ratio(row.sparsity, self.cost, view.n_layers)
                score = view.scores[b].to(visual.device)[current].float()
                kept = torch.sort(score, descending=True, stable=True).indices[:round(current.numel() * (1 - ratio))]
                drop[b, current] = True
                drop[b, current[kept]] = False
                row.pruned = True
                continue
            merges += self._merge(view, b, row, current, cells[b], drop)
        return drop, merges

    def _merge(self, view, b, row, current, cells, drop) -> list:
        """Sample ``b``'s merge at this stage (``drop`` marked): ``[(row, anchor, mean feature, members)]``."""
        limit = pruning_ratio(row.sparsity, self.cost, view.n_layers)
        n = current.numel()
        order = torch.sort(cells[current], stable=True).indices  # by cell, then by position (time)
        tokens = current[order]
        key = cells[tokens]
        hidden = view.hidden[b, tokens.to(view.hidden.device)].float()
        has_prev = torch.zeros(n, dtype=torch.bool, device=tokens.device)
        has_prev[1:] = key[1:] == key[:-1]
        sim = torch.full((n,), -2.0, device=hidden.device)
        sim[1:] = F.cosine_similarity(hidden[1:], hidden[:-1], dim=-1)
        sim = sim.masked_fill(~has_prev.to(sim.device), -2.0).to(tokens.device)
        merge = has_prev & (sim >= self.similarity_lower_bound)
        ratio = int(merge.sum()) / n
        if ratio < limit:
            row.sparsity.append(ratio)
            row.merging = ratio >= self.ratio_lower_bound
        else:  # capped: the most similar int(limit n) merge, and FrameFusion ends
            merge = torch.zeros_like(merge)
            ranked = torch.sort(sim.masked_fill(~has_prev, float("-inf")), descending=True, stable=True).indices
            merge[ranked[:min(int(limit * n), int(has_prev.sum()))]] = True  # (a cell's first token has no run)
            row.merging, row.pruned = False, True
        if not bool(merge.any()):
            return []
        # each merged token joins the latest unmerged token before it in its cell (the anchor of its run)
        slot = torch.arange(n, device=tokens.device)
        anchor = torch.where(merge, torch.zeros_like(slot), slot).cummax(0).values
        drop[b, tokens[merge]] = True
        out = []
        for a in anchor[merge].unique().tolist():
            members = (anchor == a).nonzero().squeeze(1)  # the anchor and its run
            out.append((b, int(tokens[a]), hidden[members.to(hidden.device)].mean(0), tokens[members]))
        return out
