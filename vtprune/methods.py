"""Method configs and their registry.

Every method is a dataclass registered under a name.  ``vtprune.wrap(model, "random", keep=0.1)``
looks the name up here; later methods only add entries::

    @register("mymethod")
    @dataclass
    class MyMethod(Selector):
        my_option: float = 0.5
        def score(self, ctx): ...

A :class:`Selector` scores each image's visual tokens before the LLM; the tokens with the best
scores are kept (``keep`` per image), in their original order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .budget import check_keep
from .scoring import divprune_order, pool_windows, total_budget, uniform_scores

_REGISTRY: dict = {}


def register(name: str):
    """Class decorator: register a method config dataclass under ``name``."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list:
    """Names of the registered methods."""
    return sorted(_REGISTRY)


def get(name: str):
    """The config class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(available())}") from None


@dataclass
class Method:
    """Base of every method config."""

    name: ClassVar[str] = "method"
    stage: ClassVar[str] = "method"

    def validate(self):
        """Raise ``ValueError`` on an invalid option."""


@dataclass
class ScoreContext:
    """What a selector may read to score the images of one forward pass.

    ``layouts[i]`` and ``budgets[i]`` describe the i-th image of the batch (row-major order);
    ``rows[i]`` is its sample; ``features[i]`` its visual tokens as fed to the LLM ([n, D]).
    ``cls_attention[layer][i]`` is the post-softmax attention of the [CLS] query to the vision-tower
    tokens in tower layer ``layer``, averaged over heads and mapped onto image i's LLM tokens (summed
    over the tower tokens an LLM token merges; 0 for newlines) — for the layers the method asked for.
    """

    layouts: list
    budgets: list
    rows: list
    features: list
    generator: torch.Generator
    cls_attention: dict = dataclasses.field(default_factory=dict)
    tower_selected: list = dataclasses.field(default_factory=list)
    replacements: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.replacements = [None] * len(self.layouts)


@dataclass
class Selector(Method):
    """A pre-LLM method: scores each image's visual tokens; the best ``keep`` per image are kept.

    ``scope="image"`` (default) ranks all of an image's tokens together — LLaVA-NeXT's base image
    and crops, InternVL's tiles — so a budget flows to the tiles that score best.  ``scope="tile"``
    gives every tile its own share, as FasterVLM and VisionZip do on LLaVA-NeXT: a float ``keep``
    of each tile's tokens, an int ``keep`` tokens per tile.
    """

    stage: ClassVar[str] = "select"
    needs_cls: ClassVar[bool] = False  # reads ctx.cls_attention (the tower layers of ``tower_layers``)
    merges: ClassVar[bool] = False  # rewrites tower features before the projector (``merge``)
    keep: float = 0.25
    scope: str = "image"

    def validate(self):
        self.keep = check_keep(self.keep)
        if self.scope not in ("image", "tile"):
            raise ValueError(f"scope must be 'image' (one budget over all of an image's tokens) or 'tile' "
                             f"(each crop/tile its own share), got {self.scope!r}")

    def score(self, ctx: ScoreContext) -> list:
        """One 1-D score tensor per image (higher = keep)."""
        raise NotImplementedError

    def tower_layers(self, n_layers: int, feature_layer: int) -> list:
        """Vision-tower layers (0-based) whose [CLS] attention ``score`` reads; none by default.

        ``feature_layer`` is the layer whose output the projector consumes.
        """
        return []


@register("random")
@dataclass
class Random(Selector):
    """Keep a random subset of each image's tokens: the control every method must beat.

    Draws come from a generator seeded with ``seed`` when the model is wrapped, so a run is
    reproducible; successive forward passes draw new subsets.
    """

    seed: int = 0

    def score(self, ctx):
        return [torch.rand(layout.n, generator=ctx.generator) for layout in ctx.layouts]


@register("uniform")
@dataclass
class Uniform(Selector):
    """Keep tokens spread evenly over each image's token grid (a strided lattice per grid)."""

    def score(self, ctx):
        return [uniform_scores(layout, total_budget(k)) for layout, k in zip(ctx.layouts, ctx.budgets)]


@register("pool")
@dataclass
class Pool(Selector):
    """Average-pool each image's token grids down to the budget (a control, like ``uniform``).

    Each grid (LLaVA image, LLaVA-NeXT base image and crop grid, InternVL tile, Qwen frame) gets a
    share of the budget in proportion to its size and is split into an r x c grid of adaptive
    windows (the largest such grid with r*c <= its share, aspect kept; window edges as in
    ``adaptive_avg_pool2d``).  A window's mean feature enters the LLM at the position of the
    window's first token (its top-left cell); the other tokens of the window are dropped, so
    positions stay original.  The realized count can be a little under ``keep``.
    """

    def score(self, ctx):
        scores = []
        for i, (layout, k) in enumerate(zip(ctx.layouts, ctx.budgets)):
            anchors, members = pool_windows(layout, total_budget(k))
            features = ctx.features[i]
            merged = torch.stack([features[m].float().mean(0) for m in members]) if anchors.numel() else None
            ctx.replacements[i] = (anchors, merged) if merged is not None else None
            ctx.budgets[i] = anchors.numel()
            s = torch.zeros(layout.n)
            s[anchors] = 1.0
            scores.append(s)
        return scores


@register("divprune")
@dataclass
class DivPrune(Selector):
    """Max-min diversity selection over the visual features fed to the LLM (DivPrune, CVPR 2025).

    As the DivPrune code does: distances are 1 - cosine similarity of the LLM-input features; the
    first token is the one farthest from its nearest neighbour, then greedily the token whose
    distance to the nearest already chosen token is largest, until the budget is met (ties: the
    earliest token).  Needs no [CLS] and no attention map.  Kept tokens enter in original order.
    """

    def score(self, ctx):
        scores = []
        for i, (layout, k) in enumerate(zip(ctx.layouts, ctx.budgets)):
            content = (~layout.newline).nonzero().squeeze(1)
            groups = [(content, k)] if not isinstance(k, dict) else \
                [(content[layout.tiles[content] == t], kt) for t, kt in k.items()]
            s = torch.full((layout.n,), float("-inf"))
            for members, budget in groups:
                order = divprune_order(ctx.features[i][members], min(budget, members.numel()))
                s[members[order]] = torch.arange(order.numel(), 0, -1, dtype=torch.float32)
            scores.append(s)
        return scores


@register("fastervlm")
@dataclass
class FasterVLM(Selector):
    """Keep the tokens the vision encoder's [CLS] attends to most (FasterVLM, arXiv 2412.01818).

    Score: the post-softmax attention of the [CLS] query to the patch keys inside the tower layer
    whose output the projector consumes (``vision_feature_layer`` -2 → the penultimate layer),
    averaged over heads; the top ``keep`` per image are kept in their original order.
    ``vision_layer`` (0-based, negative counts from the end) overrides the layer.  Computed from the layer's q/k
    while the tower runs on SDPA; no eager attention.
    """

    needs_cls: ClassVar[bool] = True
    vision_layer: int | None = None

    def tower_layers(self, n_layers, feature_layer):
        return [feature_layer if self.vision_layer is None else self.vision_layer]

    def score(self, ctx):
        (layer,) = ctx.cls_attention
        return ctx.cls_attention[layer]


@register("vtc_cls")
@dataclass
class VTCCLS(Selector):
    """[CLS] attention of several tower layers ensembled (VTC-CLS, arXiv 2412.05819).

    Score: for every tower layer from ``start_layer`` up to and including the layer the projector
    reads, the [CLS] row's post-softmax attention to the patches averaged over heads, summed over
    the layers unweighted (as the VTC-CLS code does).  ``start_layer`` is 0-based; negative counts
    from the end of the tower (default -8: layer 16 of CLIP-L's 24, the VTC-CLS script default).
    """

    needs_cls: ClassVar[bool] = True
    start_layer: int = -8

    def tower_layers(self, n_layers, feature_layer):
        start = self.start_layer % n_layers if -n_layers <= self.start_layer < 0 else self.start_layer
        if not 0 <= start <= feature_layer:
            raise ValueError(f"vtc_cls start_layer={self.start_layer} must lie in [{-n_layers}, {feature_layer}] "
                             f"(the projector reads layer {feature_layer} of {n_layers})")
        return list(range(start, feature_layer + 1))

    def score(self, ctx):
        per_layer = list(ctx.cls_attention.values())
        return [sum(layer[i] for layer in per_layer) for i in range(len(ctx.layouts))]


@register("visionzip")
@dataclass
class VisionZip(Selector):
    """Dominant tokens by [CLS] attention plus contextual tokens that merge the rest (VisionZip, arXiv 2412.04467).

    Per tile (a LLaVA image, each LLaVA-NeXT crop), of its ``keep`` tokens a share
    ``contextual_share`` are contextual, the rest dominant.  Dominant: the patches with the highest
    [CLS] attention in the layer the projector reads.  Contextual: among the remaining patches,
    targets taken at a uniform index stride; every other remaining patch joins the target whose key
    (that layer's keys averaged over heads, L2-normalised) is most similar; a contextual token is
    its target's feature plus the mean of the features that joined it, as the VisionZip code does.
    Merging happens on the tower features before the projector.  Differences from VisionZip: the
    [CLS] token itself is not fed to the LLM (the stock HF models drop it), and a contextual token
    sits at its target's position instead of after the dominant tokens, so positions stay original.
    An int ``keep`` counts tokens per tile.
    """

    needs_cls: ClassVar[bool] = True
    merges: ClassVar[bool] = True
    contextual_share: float = 0.15

    def validate(self):
        super().validate()
        if not 0.0 <= self.contextual_share < 1.0:
            raise ValueError(f"contextual_share must lie in [0, 1), got {self.contextual_share}")

    def tower_layers(self, n_layers, feature_layer):
        return [feature_layer]

    def split(self, k: int) -> tuple:
        """(dominant, contextual) token counts for a budget of ``k``."""
        contextual = min(k - 1, max(1, round(k * self.contextual_share))) if self.contextual_share > 0 and k > 1 else 0
        return k - contextual, contextual

    def merge(self, cls, keys, features, k: int):
        """Merge one batch of tiles: ``cls`` [tiles, T] [CLS] attention to the patches, ``keys`` [tiles, T, d],
        ``features`` [tiles, T, C].  Returns the new features and, per tile, the kept patch indices."""
        dominant, contextual = self.split(min(k, features.shape[1]))
        out = features.clone()
        kept = []
        for t in range(features.shape[0]):
            top = torch.sort(cls[t], descending=True, stable=True).indices[:dominant]
            rest = torch.ones(features.shape[1], dtype=torch.bool, device=features.device)
            rest[top] = False
            rest = rest.nonzero().squeeze(1)
            chosen = [top]
            if contextual and rest.numel():
                step = max(1, rest.numel() // contextual)
                is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=features.device)
                is_target[torch.arange(0, rest.numel(), step, device=features.device)[:contextual]] = True
                targets, others = rest[is_target], rest[~is_target]
                metric = torch.nn.functional.normalize(keys[t].float(), dim=-1)
                assign = (metric[others] @ metric[targets].T).argmax(1)
                sums = torch.zeros(targets.numel(), features.shape[2], device=features.device)
                sums.index_add_(0, assign, features[t, others].float())
                counts = torch.bincount(assign, minlength=targets.numel()).clamp(min=1)[:, None]
                out[t, targets] = (features[t, targets].float() + sums / counts).to(features.dtype)
                chosen.append(targets)
            kept.append(torch.sort(torch.cat(chosen)).values)
        return out, kept

    def score(self, ctx):
        for i, selected in enumerate(ctx.tower_selected):
            ctx.budgets[i] = int((selected > 0).sum())
        return ctx.tower_selected


@dataclass
class LayerMethod(Method):
    """An in-LLM method: visual tokens leave the language model before decoder layer ``layer``.

    Layers 0..layer-1 see every token; from ``layer`` on the dropped tokens are gone from the
    hidden states, the attention masks, the positions and those layers' KV cache.
    """

    stage: ClassVar[str] = "llm"
    needs_attention: ClassVar[bool] = False  # reads the attention of layer - 1 (runtime.scores)
    layer: int = 2

    def validate(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"{self.name} layer must be an int, got {self.layer!r}")

    def first_layer(self, n_layers: int) -> int:
        """The first decoder layer that may lose tokens; raises ``ValueError`` when out of range."""
        low = 1 if self.needs_attention else 0
        if not low <= self.layer < n_layers:
            raise ValueError(f"{self.name} layer={self.layer} must lie in [{low}, {n_layers - 1}] "
                             f"(the language model has {n_layers} decoder layers)")
        return self.layer

    def decision_layers(self, n_layers: int) -> list:
        """Layers after which ``decide`` runs (dynamic methods only)."""
        return []

    def compact_here(self, runtime, i: int) -> bool:
        """Whether the dropped tokens leave physically before layer ``i`` (fixed methods: the first hooked layer)."""
        return True

    def drop(self, runtime, visual: torch.Tensor) -> torch.Tensor:
        """Bool [B, L]: the visual tokens that leave (``visual`` marks the visual tokens)."""
        raise NotImplementedError


@register("exit")
@dataclass
class Exit(LayerMethod):
    """Every visual token leaves the LLM before decoder layer ``layer`` (default 2); the text goes on."""

    def drop(self, runtime, visual):
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

    needs_attention: ClassVar[bool] = True
    keep: float = 0.5
    query: str = "last"

    def validate(self):
        super().validate()
        self.keep = check_keep(self.keep)
        if self.query not in ("last", "text"):
            raise ValueError(f"fastv query must be 'last' or 'text', got {self.query!r}")

    def drop(self, runtime, visual):
        from .budget import tokens_to_keep

        scores = runtime.scores.to(visual.device).masked_fill(~visual, float("-inf"))
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

    needs_attention: ClassVar[bool] = True
    keep: float = 0.25
    pivot_image: int = 4
    pivot_text: int = 4

    def validate(self):
        super().validate()
        self.keep = check_keep(self.keep)
        if self.pivot_image < 1 or self.pivot_text < 0:
            raise ValueError("dart needs pivot_image >= 1 and pivot_text >= 0")

    def drop(self, runtime, visual):
        from .budget import tokens_to_keep

        hidden = runtime.session.adapter.language_model.norm(runtime.hidden).float()
        hidden = torch.nn.functional.normalize(hidden, dim=-1)
        keys = runtime.keys.float()  # [B, H_kv, L, d]
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
            after = runtime.text[b].to(visual.device) & (pos > int(vis.max()))
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
    the hidden states and the later layers' KV cache, as in ``exit``.
    """

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
        from .dyvte import Routers

        if isinstance(self.weights, Routers):
            return self.weights
        path = self.weights
        if path == "toy":
            import os

            from .toy import DEFAULT_PATH

            path = os.path.join(DEFAULT_PATH, "dyvte_routers.safetensors")
        try:
            return Routers.load(path)
        except FileNotFoundError:
            raise ValueError(f"dyvte weights not found: {path}") from None

    def first_layer(self, n_layers):
        layers = [j for j in self.routers.layers if j >= self.layer]
        if not layers or max(layers) >= n_layers - 1:
            raise ValueError(f"dyvte routers for layers {self.routers.layers} do not fit a language model of "
                             f"{n_layers} decoder layers (a router may run after layers 0..{n_layers - 2})")
        return min(layers) + 1

    def decision_layers(self, n_layers):
        return [j for j in self.routers.layers if j >= self.layer]

    def decide(self, runtime, j, hidden):
        from .dyvte import router_input

        router = self.routers.router(j).to(hidden.device)
        x = router_input(hidden, runtime.visual.to(hidden.device), runtime.text.to(hidden.device))
        with torch.no_grad():
            p_exit = router.to(torch.float32)(x).softmax(-1)[:, 1]
        return p_exit > self.threshold

    def compact_here(self, runtime, i):
        return runtime.compact_from is not None and i >= runtime.compact_from

    def drop(self, runtime, visual):
        return visual


def resolve(method, options: dict) -> list:
    """Turn ``wrap``'s ``method`` argument and options into validated config objects."""
    items = list(method) if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise ValueError("wrap() needs at least one method; registered methods: " + ", ".join(available()))
    configs, used = [], set()
    for item in items:
        if isinstance(item, str):
            cls = get(item)
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            mine = {k: v for k, v in options.items() if k in names}
            used |= set(mine)
            config = cls(**mine)
        elif isinstance(item, Method):
            config = dataclasses.replace(item)
        else:
            raise TypeError(f"a method is a registered name or a config object, got {type(item).__name__}")
        config.validate()
        configs.append(config)
    unused = set(options) - used
    if unused:
        raise TypeError(f"option(s) {sorted(unused)} are not accepted by method(s) "
                        f"{[c.name for c in configs]}")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"a method appears twice in {names}")
    for stage, what in (("select", "pre-LLM selection"), ("llm", "in-LLM exit")):
        chosen = [c.name for c in configs if c.stage == stage]
        if len(chosen) > 1:
            raise ValueError(f"only one {what} method can run at a time, got {chosen}")
    return configs
