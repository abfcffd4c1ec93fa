"""The method registry and the base configs every method derives from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..budget import check_keep, tokens_to_keep
from ..errors import NotApplicable, OutOfRange, did_you_mean
from ..scoring import total_budget
from ..summary import FEATURES, GROUPS

_REGISTRY: dict = {}


def indices(values) -> list:
    """Layer, head or channel indices as sorted unique ints."""
    return sorted({int(v) for v in values})


def budget_groups(layout, budget) -> list:
    """``[(content token indices, budget)]`` of one image: all its content tokens with an image budget, or
    each tile's with a ``{tile: budget}`` dict (``scope="tile"``)."""
    content = (~layout.newline).nonzero().squeeze(1)
    if not isinstance(budget, dict):
        return [(content, budget)]
    return [(content[layout.tiles[content] == t], k) for t, k in budget.items()]


SCOPES = ("image", "clip", "tile", "frame")


def budget_of(selector, layout):
    """An image's (or clip's) budget: its content tokens' share (an int), or each tile's (``scope="tile"``)
    or each frame's (``scope="frame"``) as a dict."""
    if selector.scope in ("tile", "frame"):
        return tile_budgets(selector.keep, layout.scoped(selector.scope))
    return tokens_to_keep(selector.keep, layout.n_content)


def tile_budgets(keep, layout) -> dict:
    """``{tile: budget}``: ``keep`` of each tile's content tokens."""
    tiles = layout.tiles[~layout.newline]
    return {int(t): tokens_to_keep(keep, int((tiles == t).sum())) for t in tiles.unique() if t >= 0}


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
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, available())}; registered methods: "
                         f"{', '.join(available())}") from None


@dataclass
class Method:
    """Base of every method config."""

    name: ClassVar[str] = "method"
    stage: ClassVar[str] = "method"
    paper: ClassVar[str] = ""  # where the method is defined ("" for controls)
    ranges: ClassVar[dict] = {}  # option -> its valid values, in words (``vtprune info --method``)
    # attention methods: whether they compose with an in-LLM exit / with a selector's size bias in attention
    composes_with_exit: ClassVar[bool] = False
    composes_with_weights: ClassVar[bool] = False

    def validate(self):
        """Raise ``ValueError`` on an invalid option."""

    @property
    def inert(self) -> bool:
        """True when the method, as configured, leaves every forward exactly as the stock model runs it."""
        return False

    def to_dict(self) -> dict:
        """``{"method": name, option: value, ...}``, JSON-able (trained weights go by path):
        ``vtprune.methods.from_dict`` gives the config back."""
        out = {"method": self.name}
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if value is not None and not isinstance(value, (bool, int, float, str, list, tuple)):
                raise TypeError(f"{self.name} option {f.name} holds a {type(value).__name__}; pass it by path "
                                "to serialise the config")
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass
class ScoreContext:
    """What a selector may read to score the images of one forward pass.

    ``layouts[i]`` and ``budgets[i]`` describe the i-th image of the batch (row-major order);
    ``rows[i]`` is its sample; ``features[i]`` its visual tokens as fed to the LLM ([n, D]; for a selector
    with ``score_stacked``, Qwen3-VL's deepstack features of each token follow them side by side).
    A merging method sets ``replacements[i] = (positions, features)`` (merged features that take
    those tokens' places) and ``sizes[i]`` ([n]: how many of the image's tokens each kept token
    stands for; ``vtprune.summary``), and may say what each merged token stands for in ``members[i]``
    (``[(position, member indices)]``, for pictures: ``vtprune.viz.overlay``).  ``instructions[i]``
    ([m, D], methods with ``needs_text``) are the language model's input embeddings of image i's
    instruction: its sample's real text tokens after its last image (all of them when none follow).
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
    tower_sizes: list = dataclasses.field(default_factory=list)
    replacements: list = dataclasses.field(default_factory=list)
    sizes: list = dataclasses.field(default_factory=list)
    members: list = dataclasses.field(default_factory=list)
    instructions: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.replacements = [None] * len(self.layouts)
        self.sizes = [None] * len(self.layouts)  # per image: [n] tokens each kept token stands for (merging methods)
        self.members = [None] * len(self.layouts)  # per image: [(position, member indices)] (merging methods)


@dataclass
class Selector(Method):
    """A pre-LLM method: scores each image's visual tokens; the best ``keep`` per image are kept.

    ``scope="image"`` (default; ``"clip"`` is the same) ranks all of an image's tokens together —
    LLaVA-NeXT's base image and crops, InternVL's tiles, every frame of a video — so a budget flows to
    the tiles or frames that score best.  ``scope="tile"`` gives every tile its own share, as FasterVLM
    and VisionZip do on LLaVA-NeXT: a float ``keep`` of each tile's tokens, an int ``keep`` tokens per
    tile; ``scope="frame"`` gives every temporal slice of a video its own share the same way (a still
    image is one frame).  ``positions="renumber"`` numbers the
    shortened sequence afresh (a token's position drops by the tokens cut before it), as serving
    engines number a pruned prompt, instead of keeping original positions.
    """

    stage: ClassVar[str] = "select"
    ranges: ClassVar[dict] = {
        "keep": "float in (0, 1]: fraction of each image's (or clip's) visual tokens; int >= 1: tokens per image "
                "or clip (summary tokens included)",
        "scope": "'image' or 'clip' (one budget per image or video), 'tile' (per crop/tile) or 'frame' (per "
                 "temporal slice of a video)",
        "summary": "int >= 0: summary tokens per image or clip (per tile or frame with scope='tile'/'frame') standing "
                   "for the dropped tokens, weighted by log(group size) in attention; 0: none",
        "summary_group": "'similarity' (k-means on features) or 'space' (a lattice of cells): how dropped tokens "
                         "are grouped",
        "summary_feature": "'mean' (at the medoid's place), 'medoid' or 'first': a summary token's feature",
        "size_bias": "bool: weigh each kept token in attention by the tokens it stands for (pool windows, VisionZip "
                     "contextual tokens; otherwise the dropped tokens closest in feature join it)",
        "bias_layers": "list of decoder layers that add the size bias; None: all ([]: none, an ablation)",
        "newlines": "'rows' (a LLaVA-NeXT newline token stays exactly when its row keeps a token) or 'all' (every "
                    "newline stays: the kept count no longer depends on the selection, as serving needs)",
        "positions": "'original' (kept tokens and the text after them keep their positions: the full sequence with "
                     "the dropped tokens masked) or 'renumber' (the shortened sequence numbered afresh, as vLLM "
                     "numbers a pruned prompt; 1-D positions only)"}
    needs_cls: ClassVar[bool] = False  # reads ctx.cls_attention (the tower layers of ``tower_layers``)
    merges: ClassVar[bool] = False  # rewrites tower features before the projector (``merge``)
    needs_text: ClassVar[bool] = False  # reads ctx.instructions (the instruction's token embeddings)
    covers_all: ClassVar[bool] = False  # every dropped token is already merged into a kept one (pool, visionzip)
    temporal: ClassVar[bool] = False  # ranks a clip's tokens across its frames (evs, vidcom2, ...): a video method
    score_stacked: ClassVar[bool] = False  # scores ctx.features with the family's stacked features side by side
    # (Qwen3-VL's deepstack features), as vLLM's EVS and VidCom2 do
    keep: float = 0.25
    scope: str = "image"
    summary: int = 0
    summary_group: str = "similarity"
    summary_feature: str = "mean"
    size_bias: bool = False
    bias_layers: list | None = None
    positions: str = "original"
    newlines: str = "rows"

    @property
    def inert(self) -> bool:  # every token kept as it is (merging methods rewrite features even then)
        return isinstance(self.keep, float) and self.keep == 1.0 and not self.merges

    @property
    def tower_score(self) -> str | None:
        """Which tower score ``ctx.cls_attention`` holds: ``"cls"``, ``"received"`` or None (the family's default)."""
        return getattr(self, "source", None)

    @property
    def weighs(self) -> bool:
        """Whether kept tokens carry a size bias in attention (``vtprune.runtime.size_bias``)."""
        return (self.summary > 0 or self.size_bias) and self.bias_layers != []

    def validate(self):
        self.keep = check_keep(self.keep)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be 'image' or 'clip' (one budget over all of an image's or a video's "
                             f"tokens), 'tile' (each crop/tile its own share) or 'frame' (each temporal slice of a "
                             f"video its own share), got {self.scope!r}{did_you_mean(str(self.scope), SCOPES)}")
        if isinstance(self.summary, bool) or not isinstance(self.summary, int) or self.summary < 0:
            raise ValueError(f"{self.name} summary must be an int >= 0 (summary tokens per image), got {self.summary!r}")
        if self.summary and self.covers_all:
            raise ValueError(f"{self.name} merges every dropped token into a kept one already: summary tokens have "
                             "nothing left to stand for; use size_bias=True to weigh its merged tokens by their size")
        if self.summary_group not in GROUPS:
            raise ValueError(f"summary_group must be one of {list(GROUPS)}, got {self.summary_group!r}")
        if self.summary_feature not in FEATURES:
            raise ValueError(f"summary_feature must be one of {list(FEATURES)}, got {self.summary_feature!r}")
        if not isinstance(self.size_bias, bool):
            raise TypeError(f"size_bias must be True or False, got {self.size_bias!r}")
        if self.bias_layers is not None:
            self.bias_layers = indices(self.bias_layers)
        if self.positions not in ("original", "renumber"):
            raise ValueError(f"positions must be 'original' or 'renumber', got {self.positions!r}")
        if self.newlines not in ("rows", "all"):
            raise ValueError(f"newlines must be 'rows' or 'all', got {self.newlines!r}")

    def score(self, ctx: ScoreContext) -> list:
        """One 1-D score tensor per image (higher = keep)."""
        raise NotImplementedError

    def budget(self, layout):
        """An image's (or clip's) budget: an int, or ``{tile or frame: int}`` with ``scope`` "tile"/"frame"
        (summary tokens included).  A method with its own rule overrides it (``evs``)."""
        return budget_of(self, layout)

    def kept_count(self, layout) -> int:
        """How many of an image's tokens (on ``layout``) this selector keeps, known from the layout and the
        budget alone: what vLLM sizes a prompt by before the image is encoded.  ``NotApplicable``, with the
        reason, when the count depends on the selection itself."""
        return total_budget(self.budget(layout)) + self.kept_newlines(layout)

    def kept_newlines(self, layout) -> int:
        """The newline tokens of ``layout`` this selector keeps whatever it selects (all of them with
        ``newlines="all"``); ``NotApplicable`` where the kept count depends on the selection."""
        newlines = int(layout.newline.sum())
        if newlines and self.newlines != "all":
            raise NotApplicable(f"{self.name} keeps a newline token exactly when its row keeps a token "
                                "(newlines='rows'), so the count depends on the rows it keeps; newlines='all' "
                                "keeps every newline")
        if self.summary and self.summary_group != "similarity":
            raise NotApplicable(f"summary_group={self.summary_group!r} cells may come out empty, so the number of "
                                "summary tokens depends on which tokens were dropped; summary_group='similarity' "
                                "is never empty")
        return newlines

    def tower_layers(self, n_layers: int, feature_layer: int) -> list:
        """Vision-tower layers (0-based) whose [CLS] attention ``score`` reads; none by default.

        ``feature_layer`` is the layer whose output the projector consumes.
        """
        return []


@dataclass
class LayerMethod(Method):
    """An in-LLM method: visual tokens leave the language model before decoder layer ``layer``.

    Layers 0..layer-1 see every token; from ``layer`` on the dropped tokens are gone from the
    hidden states, the attention masks, the positions and those layers' KV cache.  The method reads a
    read-only ``vtprune.runtime.exit.LayerView`` (``view``) and returns what leaves; the runtime does the rest,
    so a new in-LLM method is one module.
    """

    stage: ClassVar[str] = "llm"
    ranges: ClassVar[dict] = {"layer": "int decoder layer: 0 .. layers-1 (1 .. layers-1 for methods that read "
                                       "the previous layer's attention)"}
    needs_attention: ClassVar[bool] = False  # reads the attention of layer - 1 (view.scores)
    layer: int = 2

    def validate(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"{self.name} layer must be an int, got {self.layer!r}")

    def first_layer(self, n_layers: int) -> int:
        """The first decoder layer that may lose tokens; raises ``ValueError`` when out of range."""
        low = 1 if self.needs_attention else 0
        if not low <= self.layer < n_layers:
            raise OutOfRange(f"{self.name} layer={self.layer} must lie in [{low}, {n_layers - 1}] "
                             f"(the language model has {n_layers} decoder layers)")
        return self.layer

    def stage_layers(self, n_layers: int) -> list:
        """Layers before which visual tokens leave (fixed methods; several for staged methods like ``pdrop``)."""
        return [self.first_layer(n_layers)]

    def decision_layers(self, n_layers: int) -> list:
        """Layers after which ``decide`` runs (dynamic methods only)."""
        return []

    def compact_here(self, view, i: int) -> bool:
        """Whether the dropped tokens leave physically before layer ``i`` (fixed methods: the first hooked layer)."""
        return True

    def observe(self, view, query, key, mask, scaling):
        """Methods with ``needs_attention``: read layer ``view.stage - 1``'s prefill attention (query and
        key [B, H, L, d], RoPE applied, and its mask); what it returns is ``view.scores`` in ``drop``."""
        return None

    def decide(self, view, j: int, hidden: torch.Tensor) -> torch.Tensor:
        """Dynamic methods: bool [B], the rows whose visual tokens may leave after layer ``j`` (``hidden``:
        its output)."""
        raise NotImplementedError

    def drop(self, view, visual: torch.Tensor):
        """Bool [B, L]: the visual tokens that leave before ``view.stage`` (``visual`` marks the visual tokens
        still in the sequence, over its positions as the stage sees them); or ``(drop, merges)`` with
        ``merges`` ``[(row, position, feature, member positions)]``: kept tokens whose hidden state becomes
        ``feature``, standing for members that leave (sparsevlm)."""
        raise NotImplementedError


def from_dict(data: dict):
    """The config ``Method.to_dict`` wrote (validated)."""
    data = dict(data)
    try:
        name = data.pop("method")
    except KeyError:
        raise ValueError(f"a method config needs a 'method' key naming it, got keys {sorted(data)}") from None
    cls = get(name)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TypeError(f"{name} does not take option(s) {unknown}{did_you_mean(unknown[0], names)}; options: "
                        f"{sorted(names)}")
    config = cls(**data)
    config.validate()
    return config


def resolve(method, options: dict) -> list:
    """Turn ``wrap``'s ``method`` argument and options into validated config objects.

    An option goes to every named method that takes it; ``"name.option"`` (e.g. ``"fastv.keep"``)
    to that method only, over a shared value."""
    items = list(method) if isinstance(method, (list, tuple)) else [method]
    if not items:
        raise ValueError("wrap() needs at least one method; registered methods: " + ", ".join(available()))
    configs, used = [], set()
    for item in items:
        if isinstance(item, str):
            cls = get(item)
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            mine = {k: v for k, v in options.items() if k in names}
            own = {k: v for k, v in options.items() if k.startswith(item + ".") and k[len(item) + 1:] in names}
            used |= set(mine) | set(own)
            config = cls(**{**mine, **{k[len(item) + 1:]: v for k, v in own.items()}})
        elif isinstance(item, Method):
            config = dataclasses.replace(item)
        else:
            raise TypeError(f"a method is a registered name or a config object, got {type(item).__name__}")
        config.validate()
        configs.append(config)
    if any(c.stage == "input" for c in configs):
        raise ValueError("downsample acts on the processor, not the model: "
                         "processor = vtprune.downsample(processor, keep=...) (vtprune eval and the lmms-eval "
                         "plugin do this for you); wrap the model only with the other methods")
    unused = set(options) - used
    if unused:
        accepted = {f.name for c in configs for f in dataclasses.fields(c) if f.init}
        raise TypeError(f"option(s) {sorted(unused)} are not accepted by method(s) {[c.name for c in configs]}"
                        f"{did_you_mean(sorted(unused)[0].split('.')[-1], accepted)}; they take {sorted(accepted)}")
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"a method appears twice in {names}")
    for stage, what in (("select", "pre-LLM selection"), ("llm", "in-LLM exit"), ("attention", "attention")):
        chosen = [c.name for c in configs if c.stage == stage]
        if len(chosen) > 1:
            raise ValueError(f"only one {what} method can run at a time, got {chosen}")
    weighing = [c.name for c in configs if c.stage == "select" and c.weighs]
    others = [c.name for c in configs if c.stage == "attention" and not c.composes_with_weights]
    if weighing and others:
        raise ValueError(f"{weighing[0]} with summary tokens or size_bias does not compose with {others[0]} yet "
                         "(in-LLM exits and zerotuning compose)")
    exiting = [c for c in configs if c.stage == "llm"]
    blocked = [c.name for c in configs if c.stage == "attention" and not c.composes_with_exit]
    if exiting and blocked:
        raise ValueError(f"{blocked[0]} does not compose with in-LLM exit yet (only zerotuning does); "
                         "combine it with a pre-LLM method instead")
    return configs
