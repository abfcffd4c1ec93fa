"""What every family adapter provides.  Adapters know the model family, never the method."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from vtprune import tower_scores
from vtprune.errors import NotApplicable
from vtprune.families import Family, feature_layer
from vtprune.layout import ImageLayout


class ImageRef(NamedTuple):
    """One image of a forward pass: its sample, its positions in that row, its layout, its LLM
    input features ([n, D]), the rows of the vision-tower batch that encoded it (tiles/crops), and the
    features a family adds to each token inside the LLM ([n, D'], Qwen3-VL's deepstack features side by
    side; None elsewhere)."""

    row: int
    positions: torch.Tensor
    layout: ImageLayout
    features: object
    tiles: list
    stacked: object = None


def scores_on_tokens(tower_scores: torch.Tensor, layout) -> torch.Tensor:
    """An image's per-tower-token scores ``[tiles, N]`` on its LLM tokens ``[n]``: each token the sum of the
    scores of the tower tokens it was made from (``layout.source``, indices into the flattened tiles); 0
    for tokens with no source (newlines)."""
    flat = tower_scores.reshape(-1)
    src = layout.source.to(flat.device)
    return (flat[src.clamp(min=0)] * (src >= 0)).sum(-1)


class Adapter:
    """Where a family's visual tokens are and how they map onto space.

    The core (``vtprune.runtime.session``) wraps ``model.model.get_image_features`` (to learn how many
    tokens each image has, whenever the tower runs: inside ``forward`` or, on transformers >= 5.23,
    in ``generate`` before it) and ``model.model.get_placeholder_mask`` (to learn where they are),
    and cuts the language model's inputs in a forward pre-hook.  An adapter turns those captures
    into per-image positions and layouts and fixes family-specific inputs of the cut.
    """

    facts: ClassVar[Family | None] = None  # the family's engine-neutral description (``vtprune.families``)
    # read off ``facts`` for every subclass that sets it:
    family: ClassVar[str] = ""
    classes: ClassVar[tuple] = ()
    default_score: ClassVar[str] = "cls"  # what [CLS]-attention methods read unless told (``source``)
    flat_positions: ClassVar[bool] = True  # 1-D position ids (False: Qwen's (t, h, w) mrope rows)
    # a decoder layer's inputs besides the hidden states that run along the sequence (positional indices or
    # keyword names): an in-LLM exit cuts them with the tokens (Gemma 4's per-layer inputs)
    sequence_inputs: ClassVar[tuple] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        facts = cls.__dict__.get("facts")
        if facts is not None:
            cls.family, cls.classes = facts.name, tuple(facts.architectures)
            cls.default_score, cls.flat_positions = facts.default_score, facts.flat_positions

    def __init__(self, model):
        self.model = model
        self.inner = model.model

    @property
    def language_model(self):
        return self.inner.language_model

    # ------------------------------------------------------------------ captures
    def capture(self, args, kwargs, output, medium: str = "image") -> dict:
        """Record what ``get_image_features(*args, **kwargs) -> output`` says about the images (``medium``
        "video": ``get_video_features`` about the clips)."""
        feats = output.pooler_output if hasattr(output, "pooler_output") else output
        if isinstance(feats, torch.Tensor) and feats.dim() == 3:
            feats = list(feats.unbind(0))
        elif isinstance(feats, torch.Tensor):
            feats = [feats]
        return {"features": list(feats), "counts": [int(f.shape[0]) for f in feats]}

    # ------------------------------------------------------------------ images
    def images(self, image_mask: torch.Tensor, capture: dict) -> list:
        """An :class:`ImageRef` for every image, in the order the model scatters them."""
        counts = capture["counts"]
        total, batch = int(image_mask.sum()), image_mask.shape[0]
        if sum(counts) and sum(counts) != total and total % sum(counts) == 0 and batch % (total // sum(counts)) == 0:
            # generate() expanded the batch (beam search, num_return_sequences) after encoding the
            # images: rows are repeat-interleaved copies, each copy holds the same images.
            r = total // sum(counts)
            base = self.images(image_mask[::r], capture)
            copies = [ref._replace(row=ref.row * r + j) for j in range(r) for ref in base]
            return sorted(copies, key=lambda ref: ref.row)
        return self.family_images(image_mask, capture)

    def family_images(self, image_mask: torch.Tensor, capture: dict) -> list:
        """``images`` for a batch whose image tokens match the tower's features one to one."""
        where = image_mask.nonzero()
        counts = capture["counts"]
        total = where.shape[0]
        if sum(counts) != total:
            raise RuntimeError(f"vtprune: {where.shape[0]} image tokens in the prompt but the vision tower "
                               f"produced {sum(counts)} features; call the model once per prompt")
        out, start, tile = [], 0, 0
        for i, n in enumerate(counts):
            seg = where[start:start + n]
            start += n
            row = int(seg[0, 0])
            if not bool((seg[:, 0] == row).all()):
                raise RuntimeError("vtprune: an image's tokens span two samples of the batch")
            tiles = list(range(tile, tile + self.tiles_of(i, capture)))
            tile += len(tiles)
            stacked = capture["stacked"][i] if capture.get("stacked") else None
            out.append(ImageRef(row, seg[:, 1], self.layout(i, n, capture), capture["features"][i], tiles, stacked))
        return out

    def tiles_of(self, i: int, capture: dict) -> int:
        """How many rows of the vision-tower batch encoded image ``i``."""
        return 1

    def layout(self, i: int, n: int, capture: dict) -> ImageLayout:
        """Geometry of image ``i`` (``n`` tokens)."""
        return ImageLayout.flat(n)

    # ------------------------------------------------------------------ vision tower
    def cls_sites(self) -> list:
        """Per tower layer, the modules whose outputs are the [CLS] query and the keys.

        Returns ``[(q_module, k_module, num_heads, scale)]``; families without a [CLS] token raise.
        """
        raise NotApplicable(f"{self.family} has no [CLS] token in its vision tower; [CLS]-attention methods "
                         "cannot apply to it")

    def tower_depth(self) -> int:
        """Number of layers of the vision tower."""
        return len(self.cls_sites())

    def feature_layer(self) -> int:
        """Index (0-based) of the tower layer whose output the projector reads."""
        return feature_layer(self.model.config.vision_feature_layer, self.tower_depth())

    def hook_tower(self, layer: int, sink, kind: str = "cls") -> list:
        """Hook tower layer ``layer`` so that each run calls ``sink(scores)`` with ``scores`` [tiles, N]:
        the ``vtprune.tower_scores`` formula ``kind`` ("cls" or "received") on the layer's queries and
        keys, each tile attending within itself.  Read from the q/k projections' outputs, so the tower
        keeps its SDPA/flash attention.  Returns the hook handles.
        """
        self.refuse_cls(kind)
        q_mod, k_mod, heads, scale = self.cls_sites()[layer]
        box = {}

        def on_keys(module, args, k):
            q = box.pop("q", None)
            if q is not None:
                sink(tower_scores.per_tile(q, k, heads, scale, kind))

        return [q_mod.register_forward_hook(lambda module, args, out: box.update(q=out)),
                k_mod.register_forward_hook(on_keys)]

    def refuse_cls(self, kind: str):
        """``NotApplicable`` for the [CLS] score on a tower without a [CLS] token (the family's facts)."""
        if kind == "cls" and self.facts is not None and not self.facts.cls_token:
            raise NotApplicable(f"{self.family}'s {self.facts.tower} tower has no [CLS] token: [CLS]-attention methods "
                                "read the attention each patch receives instead (source='received', the default here)")

    def hook_keys(self, layer: int, sink) -> list:
        """Hook tower layer ``layer`` so that each run calls ``sink(keys)``: its keys averaged over heads,
        ``[tiles, N, head_dim]`` (the similarity metric VisionZip merges by)."""
        _, k_mod, heads, _ = self.cls_sites()[layer]

        def on_keys(module, args, k):
            sink(tower_scores.head_mean(k, heads))

        return [k_mod.register_forward_hook(on_keys)]

    def projector_sources(self, n_tower: int, n_projector: int, medium: str = "image") -> torch.Tensor:
        """``[T, k]``: the tower tokens (positions in a tile's tower sequence) that each of the
        projector's ``n_projector`` input tokens holds, in a run encoding ``medium``.  Default: one each,
        after leading [CLS]."""
        return tower_scores.leading_sources(n_tower, n_projector)

    def projector(self):
        """The module that turns per-patch tower features ``[tiles, patches, C]`` into LLM tokens."""
        raise NotApplicable(f"merging methods need each patch's tower feature before the projector; "
                         f"{self.family} merges patches (pixel shuffle / patch merger) before that point, "
                         "which vtprune does not support yet")

    def tower_to_llm(self, ref: ImageRef, tower_scores: torch.Tensor) -> torch.Tensor:
        """Map per-tower-token scores ``[tiles, N]`` onto the image's LLM tokens ``[n]``.

        Each LLM token gets the sum of the scores of the tower tokens it was made from
        (``layout.source``); tokens with no source (newlines) get 0.
        """
        if ref.layout.source is None:
            raise NotApplicable(f"{self.family} cannot map vision-tower scores to LLM tokens")
        return scores_on_tokens(tower_scores[ref.tiles], ref.layout)

    # ------------------------------------------------------------------ cut
    def cut_extra(self, kwargs: dict, index: torch.Tensor, real: torch.Tensor):
        """Cut family-specific language-model kwargs (``index``/``real`` as in ``plan_cut``)."""

    def after_cut(self, session_state):
        """Fix family state after tokens were dropped (``session_state.dropped`` so far)."""

    def install(self, installed):
        """Wrap model methods the family needs wrapped (instance attributes, through ``installed``:
        ``unwrap`` removes them)."""

    def lm_inputs(self, kwargs: dict):
        """Adjust a language-model call's kwargs before the cut reads them (Gemma 3: the padding mask in place
        of the masks its model built)."""

    def lm_masks(self, kwargs: dict, call):
        """Fix the attention masks of a language-model call after the cut (``call``: its
        ``vtprune.runtime.records.Call``, with ``cut`` and ``changed``)."""

    def mask_cache(self, cache, past: int, q: int):
        """``cache`` as the mask builders should see it for a call of ``q`` tokens after ``past`` (Gemma 3:
        every layer as long as the sequence, whatever an in-LLM exit cut)."""
        return cache

    def exit_refusal(self) -> str | None:
        """Why in-LLM exits cannot run on this family (None: they can)."""
        return None

    def exit_limit(self) -> int | None:
        """The longest sequence in-LLM exits can cut (None: any; Gemma 3: its sliding window)."""
        return None

    def first_exit_layer(self) -> int:
        """The earliest decoder layer before which visual tokens may leave the LLM."""
        return 0

    def last_exit_layer(self) -> tuple | None:
        """``(layer, why)``: the latest decoder layer before which visual tokens may leave the LLM, and why (None:
        any; Gemma 4: the first layer whose keys and values later layers reuse)."""
        return None

    def reset(self):
        """Undo what ``after_cut`` changed (called by ``unwrap``)."""

    def describe(self) -> dict:
        """Facts for ``vtprune info`` and error messages."""
        return {"family": self.family}
