"""Visual tokens leaving inside the LLM: exit, FastV, DART, DyVTE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import attention_probs
from ..budget import check_keep, tokens_to_keep
from ..errors import NotApplicable
from .base import LayerMethod, register

@register("exit")
@dataclass
class Exit(LayerMethod):
    """Every visual token leaves the LLM before decoder layer ``layer`` (default 2); the text goes on."""

    def drop(self, view, visual):
        return visual


@register("fastv")
@dataclass
class FastV(LayerMethod):
    """At decoder layer ``layer`` (default 2) keep the visual tokens the previous layer attended to most (FastV).

    Score: the post-softmax attention paid to each visual token in layer ``layer - 1`` by the last
    token of the prompt (``query="last"``, FastV's choice) or averaged over all text tokens
    (``query="text"``), averaged over heads; read from that layer's own q/k (RoPE applied) through
    a routed attention function, no eager attention.  ``keep`` is a fraction (or an int count) of
    each sample's visual tokens in the LLM; the rest leave as in ``exit``.
    """

    paper: ClassVar[str] = "FastV: Chen et al., ECCV 2024, arXiv 2403.06764"
    ranges: ClassVar[dict] = {"keep": "float in (0, 1] or int >= 1: the visual tokens each sample keeps from layer "
                                      "`layer` on", "query": "'last' (the last prompt token) or 'text' (all text)"}
    needs_attention: ClassVar[bool] = True
    keep: float = 0.5
    query: str = "last"

    def validate(self):
        super().validate()
        self.keep = check_keep(self.keep)
        if self.query not in ("last", "text"):
            raise ValueError(f"fastv query must be 'last' or 'text', got {self.query!r}")

    def observe(self, view, query, key, mask, scaling):
        """[B, L]: the attention paid to each token by the last prompt token (or the text rows), mean over heads."""
        probs = attention_probs(query, key, mask, scaling, last_only=self.query == "last")  # [B, rows, n]
        if self.query == "last":
            return probs[:, 0]
        weights = view.text.to(probs.device).float()
        return (probs * weights[:, :, None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)

    def drop(self, view, visual):
        scores = view.scores.to(visual.device).masked_fill(~visual, float("-inf"))
        drop = visual.clone()
        for b in range(visual.shape[0]):
            n = int(visual[b].sum())
            k = tokens_to_keep(self.keep, n)
            top = torch.sort(scores[b], descending=True, stable=True).indices[:k]
            drop[b, top] = False
        return drop


@register("dart")
@dataclass
class DART(LayerMethod):
    """Duplication-aware pruning at decoder layer ``layer`` (DART, arXiv 2502.11494).

    As the DART code (K-norm variant) does, per sample: pivots are the ``pivot_image`` visual
    tokens and the ``pivot_text`` text tokens after the image with the largest L1 norm of their
    layer ``layer - 1`` keys (RoPE applied); for each pivot, the remaining visual tokens *least*
    cosine-similar to it in layer ``layer - 1``'s output (after the final norm) are kept, an equal
    quota per pivot (the remainder to the first pivots, so exactly ``keep`` of the sample's visual
    tokens stay), and near-duplicates of what is kept leave as in ``exit``.
    """

    paper: ClassVar[str] = "DART: Wen et al. 2025, arXiv 2502.11494"
    ranges: ClassVar[dict] = {"keep": "float in (0, 1] or int >= 1: the visual tokens each sample keeps",
                              "pivot_image": "int >= 1", "pivot_text": "int >= 0"}
    needs_attention: ClassVar[bool] = True
    keep: float = 0.25
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self):
        super().validate()
        self.keep = check_keep(self.keep)
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise ValueError("dart needs pivot_image >= 1 and pivot_text >= 0")

    def drop(self, view, visual):
        hidden = view.language_model.norm(view.hidden).float()
        hidden = torch.nn.functional.normalize(hidden, dim=-1)
        keys = view.keys.float()  # [B, H_kv, L, d]
        key_norm = keys.abs().sum(-1).sum(1)  # L1 norm over all heads: [B, L]
        drop = visual.clone()
        n = visual.shape[1]
        pos = torch.arange(n, device=visual.device)
        for b in range(visual.shape[0]):
            vis = visual[b].nonzero().squeeze(1)
            if vis.numel() == 0:
                continue
            budget = tokens_to_keep(self.keep, vis.numel())
            img_piv = vis[key_norm[b, vis].topk(min(self.pivot_image, vis.numel(), budget)).indices]
            after = view.text[b].to(visual.device) & (pos > int(vis.max()))
            txt = after.nonzero().squeeze(1)
            txt_piv = txt[key_norm[b, txt].topk(min(self.pivot_text, txt.numel())).indices] if txt.numel() else txt
            pivots = torch.cat([img_piv, txt_piv])
            base, extra = divmod(budget - img_piv.numel(), pivots.numel())
            kept = set(img_piv.tolist())
            for i, p in enumerate(pivots.tolist()):
                quota = base + (i < extra)
                rest = torch.tensor([t for t in vis.tolist() if t not in kept], dtype=torch.long, device=visual.device)
                if rest.numel() == 0:
                    break
                sim = hidden[b, rest] @ hidden[b, p]
                kept.update(rest[torch.sort(sim, stable=True).indices[:quota]].tolist())
            drop[b, torch.tensor(sorted(kept), dtype=torch.long, device=visual.device)] = False
        return drop


@register("dyvte")
@dataclass
class DyVTE(LayerMethod):
    """Trained routers decide after each decoder layer when every visual token may leave (DyVTE).

    ``weights`` is a router file from ``scripts/train_dyvte.py`` (or ``"toy"`` for the routers
    shipped with the toy model); a router runs after each of its layers until the row exits
    (``p(exit) > threshold``).  Rows of a batch exit at different layers: an exited row's visual
    tokens are masked from the next layer on; once every row has exited they leave physically, from
    the hidden states and the later layers' KV cache, as in ``exit``.  ``stats(model)["exit"]
    ["exit_layers"]`` gives each row's first layer without its visual tokens (None: never left).
    """

    paper: ClassVar[str] = "DyVTE: Wu et al., NeurIPS 2025, arXiv 2411.19628"
    ranges: ClassVar[dict] = {"weights": "path to a router file (scripts/train_dyvte.py), or 'toy'",
                              "threshold": "float in (0, 1): p(exit) above which a row's visual tokens leave",
                              "layer": "int: the earliest decoder layer after which a row may exit"}
    weights: str | None = None
    threshold: float = 0.5
    layer: int = 0  # the earliest layer after which a row may exit

    def validate(self):
        super().validate()
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"dyvte threshold must lie in (0, 1), got {self.threshold}")
        if self.weights is None:
            raise ValueError("dyvte needs weights=PATH to trained routers (scripts/train_dyvte.py), or 'toy'")
        self.routers = self._load()

    def _load(self):
        from ..dyvte import Routers

        if isinstance(self.weights, Routers):
            return self.weights
        path = self.weights
        if path == "toy":
            import os

            from ..toy import DEFAULT_PATH

            path = os.path.join(DEFAULT_PATH, "dyvte_routers.safetensors")
        try:
            return Routers.load(path)
        except FileNotFoundError:
            raise ValueError(f"dyvte weights not found: {path}") from None

    def first_layer(self, n_layers):
        layers = [j for j in self.routers.layers if j >= self.layer]
        if not layers or max(layers) >= n_layers - 1:
            raise NotApplicable(f"dyvte routers for layers {self.routers.layers} do not fit a language model of "
                             f"{n_layers} decoder layers (a router may run after layers 0..{n_layers - 2})")
        return min(layers) + 1

    def decision_layers(self, n_layers):
        return [j for j in self.routers.layers if j >= self.layer]

    def decide(self, view, j, hidden):
        from ..dyvte import router_input

        router = self.routers.router(j).to(hidden.device)
        x = router_input(hidden, view.visual.to(hidden.device), view.text.to(hidden.device))
        with torch.no_grad():
            p_exit = router.to(torch.float32)(x).softmax(-1)[:, 1]
        return p_exit > self.threshold

    def compact_here(self, view, i):
        return view.compact_from is not None and i >= view.compact_from

    def drop(self, view, visual):
        return visual
