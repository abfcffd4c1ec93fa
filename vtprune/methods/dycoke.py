"""DyCoke (Tao et al., CVPR 2025, arXiv 2411.15024) — its two stages: ``dycoke`` before the LLM, ``pdkv``
while decoding.  The published method is the two together: ``vtprune.wrap(model, ["dycoke", "pdkv"])``
(``"dycoke+pdkv"`` on the command line).

``dycoke`` — temporal token merging (TTM).  A clip's temporal slices go in windows of four: the
first of a window stays whole; the second and the third keep the ``int(keep n)`` tokens least similar
(cosine, same cell) to the first, the fourth those least similar to the third (``keep`` = 1 - DyCoke's
K, default 0.3: a window keeps (1 + 3 keep) / 4 of its tokens).  Differences from the code: kept tokens
stay in their original order and positions (the code concatenates them in similarity order and
renumbers); every whole window prunes its third slice (the code's ``range(0, T - 4, 4)`` leaves the
last window's whole); a clip's last slices that do not fill a pair or window are treated as the start
of one (the code drops an odd last frame).  No tokens are averaged: the "merging" keeps the first
occurrence.

``pdkv`` — dynamic KV-cache pruning while decoding.  At every decode step, layer ``layer - 1``'s
attention of the new token (averaged over heads) over the visual tokens in the cache is compared with
the previous step's (cosine); where it moved (below ``threshold``, and at the first step) the
``int(keep v)`` most attended of the ``v`` visual tokens are chosen, and from layer ``layer`` on the
new token attends to the text and those visual tokens only.  The cache keeps every token (a later step
may choose others).  Where the attention did not move, the code (as written) attends to every visual
token that step; ``similar="reuse"`` (the default here) keeps the last choice instead, as the paper
describes it; ``similar="full"`` is the code's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..attention import additive_mask, attention_probs
from ..compat import cache_of
from ..errors import NotApplicable, OutOfRange
from ..runtime.stage import StageRuntime
from .base import Method, register
from .temporal import ClipSelector, slices


def ttm_references(slices_: int) -> dict:
    """``{slice: the slice it is compared with}`` for every pruned slice (the rest stay whole)."""
    out = {}
    for start in range(0, slices_, 4):
        window = range(start, min(start + 4, slices_))
        for offset, ref in ((1, 0), (2, 0), (3, 2)):
            if offset < len(window):
                out[start + offset] = start + ref
    return out


@register("dycoke")
@dataclass
class DyCoke(ClipSelector):
    """DyCoke's temporal token merging: in windows of four slices the first stays whole and the others keep
    their ``keep`` share of tokens least like the window's reference slice (see ``pdkv`` for its decode
    stage)."""

    paper: ClassVar[str] = "DyCoke: Tao et al., CVPR 2025, arXiv 2411.15024"
    ranges: ClassVar[dict] = {"keep": "float in (0, 1]: the share of each compared slice's tokens kept (DyCoke's "
                                      "1 - K); int >= 1: tokens per compared slice"}
    keep: float = 0.3

    def per_slice(self, n: int) -> int:
        return int(n * self.keep) if isinstance(self.keep, float) else min(int(self.keep), n)

    def count(self, per_slice, slices_):
        pruned = len(ttm_references(slices_))
        return (slices_ - pruned) * per_slice + pruned * self.per_slice(per_slice)

    def score(self, ctx):
        out = []
        for layout, features in self.clips(ctx):
            parts = slices(layout)
            s = torch.zeros(layout.n)
            for f, part in enumerate(parts):
                s[part] = 2.0  # whole slices first
            for f, ref in ttm_references(len(parts)).items():
                sim = F.cosine_similarity(features[parts[f].to(features.device)].float(),
                                          features[parts[ref].to(features.device)].float(), dim=-1).cpu()
                keep = torch.sort(sim, stable=True).indices[:self.per_slice(parts[f].numel())]
                s[parts[f]] = 0.0
                s[parts[f][keep]] = 1.0 - sim[keep].clamp(-1, 1) / 4  # in (0.5, 1.5): after whole slices
            out.append(s)
        return out


@register("pdkv")
@dataclass
class PDKV(Method):
    """DyCoke's dynamic KV pruning in decoding: from decoder layer ``layer`` on, each new token attends to
    the ``keep`` share of visual tokens that layer ``layer - 1`` attended to most, re-chosen whenever that
    attention moves (cosine < ``threshold``)."""

    stage: ClassVar[str] = "attention"
    paper: ClassVar[str] = "DyCoke: Tao et al., CVPR 2025, arXiv 2411.15024 (its decode stage)"
    ranges: ClassVar[dict] = {"layer": "int: the first decoder layer that attends to the chosen visual tokens (>= 1); "
                                       "None: DyCoke's 3, or the last layer of a shallower model",
                              "keep": "float in (0, 1]: share of the cache's visual tokens a decode step attends to",
                              "threshold": "float: re-choose when the attention's cosine to the last step's is below",
                              "similar": "'reuse' (keep the last choice when the attention did not move) or 'full' "
                                         "(attend to every visual token that step, as DyCoke's code does)"}
    layer: int | None = None
    keep: float = 0.3
    threshold: float = 0.9
    similar: str = "reuse"

    def validate(self):
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1):
            raise ValueError(f"pdkv layer must be an int >= 1 (it reads the layer before), got {self.layer!r}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, float) or not 0 < self.keep <= 1:
            raise ValueError(f"pdkv keep must be a float in (0, 1], got {self.keep!r}")
        if self.similar not in ("reuse", "full"):
            raise ValueError(f"pdkv similar must be 'reuse' or 'full', got {self.similar!r}")

    def runtime(self, model, layers, route):
        return DecodeKV(self, len(layers), route)


class DecodeKV(StageRuntime):
    """The visual tokens of the cache (from the prefill), and at each decode step the ones attended to."""

    def __init__(self, method, n_layers, route):
        self.layer = method.layer if method.layer is not None else max(1, min(3, n_layers - 1))
        if not 1 <= self.layer < n_layers:
            raise OutOfRange(f"pdkv layer={self.layer} must lie in [1, {n_layers - 1}] (the language model has "
                                f"{n_layers} decoder layers)")
        if "flash" in route.original:
            raise NotApplicable("pdkv masks keys in the attention, which flash attention does not take; load the "
                                "model with attn_implementation='sdpa' or 'eager'")
        self.method = method
        self.route = route
        self.n_layers = n_layers
        self.visual = None  # [B, slots] bool: the visual tokens among the cache's slots
        self.previous = None  # [B, v] the last decode step's attention over them
        self.chosen = None  # [B, slots] bool: the visual slots the current step attends to (None: all)
        self.active = False
        self.steps = self.chosen_steps = 0
        self.followed = None  # the KV cache whose reorder_cache (beam search) also reorders the rows' state

    def install(self) -> list:
        self.route.observe(self.layer - 1, self._observe)
        for j in range(self.layer, self.n_layers):
            self.route.mask(j, self._mask)
        return []

    def begin_call(self, call):
        q = call.embeds.shape[1]
        if call.visual is not None and call.fresh:  # a prefill with visual tokens: where they are in the cache
            visual = call.visual.detach()
            before = torch.zeros(visual.shape[0], call.past, dtype=torch.bool, device=visual.device)
            self.visual, self.previous, self.chosen = torch.cat([before, visual], 1), None, None
            self._follow(cache_of(call.kwargs))
        self.active = self.visual is not None and q == 1 and not call.fresh \
            and call.embeds.shape[0] == self.visual.shape[0]

    def end_call(self, call, output):
        self.active = False
        return None

    def remove(self):
        self._follow(None)

    def _follow(self, cache):
        """Beam search reorders the cache's rows between steps (``cache.reorder_cache(beam_idx)``): reorder each
        row's state with them, through an instance attribute on that cache (removed for the next cache)."""
        if self.followed is not None and "reorder_cache" in vars(self.followed):
            del self.followed.reorder_cache
        self.followed = None
        if cache is None or not hasattr(cache, "reorder_cache"):
            return
        original = cache.reorder_cache

        def reorder_cache(beam_idx, *args, **kwargs):
            out = original(beam_idx, *args, **kwargs)
            for name in ("visual", "previous", "chosen"):
                state = getattr(self, name)
                if state is not None:
                    setattr(self, name, state.index_select(0, beam_idx.to(state.device)))
            return out

        cache.reorder_cache = reorder_cache
        self.followed = cache

    def _observe(self, module, query, key, mask, scaling):
        if not self.active:
            return
        probs = attention_probs(query, key, mask, scaling, last_only=True)[:, 0]  # [B, kv]
        slots = self.visual.shape[1]
        vis = self.visual.to(probs.device)
        now = probs[:, :slots].masked_fill(~vis, 0.0)
        moved = torch.ones(now.shape[0], dtype=torch.bool, device=now.device)
        if self.previous is not None:
            moved = F.cosine_similarity(now, self.previous.to(now.device), dim=-1) < self.method.threshold
        self.previous = now
        self.steps += 1
        chosen = self.chosen if self.chosen is not None else vis.clone()
        if self.method.similar == "full":
            chosen = vis.clone()
        for b in moved.nonzero().squeeze(1).tolist():
            v = int(vis[b].sum())
            k = int(v * self.method.keep)
            top = torch.sort(now[b].masked_fill(~vis[b], -1.0), descending=True, stable=True).indices[:k]
            chosen[b] = False
            chosen[b, top] = True
        self.chosen_steps += int(moved.sum())
        self.chosen = chosen

    def _mask(self, module, query, key, mask):
        if not self.active or self.chosen is None:
            return mask
        kv = key.shape[2]
        blocked = torch.zeros(query.shape[0], kv, dtype=torch.bool, device=query.device)
        slots = self.visual.shape[1]
        blocked[:, :slots] = self.visual.to(query.device) & ~self.chosen.to(query.device)
        base = additive_mask(mask, query, key)
        return base.masked_fill(blocked[:, None, None, :], torch.finfo(base.dtype).min)

    def stats(self) -> dict:
        return {"pdkv": {"method": "pdkv", "layer": self.layer, "decode_steps": self.steps,
                         "choices": self.chosen_steps}}
