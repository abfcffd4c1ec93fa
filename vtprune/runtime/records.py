"""Typed records: ``Call`` (one language-model call, passed to every stage runtime) and ``Forward``
(what the last forward with images did: ``vtprune.record(model)``, ``last_kept``, ``stats``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import masks


@dataclass
class Call:
    """One call of the language model, as the stage runtimes see and change it.

    The session's pre-hook builds it; the pre-LLM cut fills ``cut`` and ``visual`` and may replace
    the kwargs; the in-LLM exit and the attention runtimes read it and may change the kwargs too
    (``changed``).
    """

    kwargs: dict  # the language model's keyword arguments
    state: object  # the sequence's CacheState
    fresh: bool  # the call starts a new sequence (a prefill)
    image_mask: torch.Tensor | None = None  # [B, q] bool: the visual tokens (images and videos) as the call came
    media: dict = field(default_factory=dict)  # {"image"/"video": [B, q] bool}: each medium's tokens
    capture: dict | None = None  # what the vision tower's runs recorded ({"media": {medium: counts, features, ...}})
    cut: tuple | None = None  # (index [B, q'], real [B, q']) of the pre-LLM cut
    forward: object = None  # the call's Forward record (a prefill with visual tokens): what each image kept
    changed: bool = False

    @property
    def embeds(self) -> torch.Tensor:
        return self.kwargs["inputs_embeds"]

    @property
    def past(self) -> int:
        """Cache entries before this call (after the cut's bookkeeping)."""
        return self.state.cache_len - self.embeds.shape[1]

    @property
    def visual(self) -> torch.Tensor | None:
        """[B, q'] bool: the visual tokens of the call after the pre-LLM cut (None without images)."""
        if self.image_mask is None:
            return None
        visual = self.image_mask.to(self.embeds.device)
        if self.cut is not None:
            index, real = self.cut
            visual = visual.gather(1, index) & real
        return visual

    def present(self) -> torch.Tensor:
        """[B, q'] bool: the real (not padding) tokens of the call after the cut."""
        mask = self.kwargs.get("attention_mask")
        batch, q = self.embeds.shape[:2]
        if masks.is_4d(mask) and masks.primary(mask) is not None:
            return masks.present(masks.primary(mask), self.past, q).expand(batch, q)
        if mask is None or masks.is_4d(mask):
            return torch.ones(batch, q, dtype=torch.bool, device=self.embeds.device)
        return mask[:, -q:].bool()

    def text(self) -> torch.Tensor | None:
        """[B, q'] bool: the real tokens that are not visual (None without images)."""
        visual = self.visual
        return None if visual is None else self.present().to(visual.device) & ~visual


@dataclass
class ExitRecord:
    """What left the language model in the last prefill (in-LLM methods)."""

    method: str
    layer: int | None = None  # the first layer without the dropped tokens (fixed exits)
    drop: torch.Tensor | None = None  # [B, q'] bool over the language model's input: the tokens that left
    dropped: list | None = None  # per sample: visual tokens that left
    scores: torch.Tensor | None = None  # [B, q'] the attention scores the method ranked by (fastv)
    exit_layers: list | None = None  # per sample: first layer without its visual tokens (dynamic exits)
    share: float = 0.0  # the exit's own share of the prefill's token-layer work
    stages: list = field(default_factory=list)  # [(layer, per-sample counts, [B, q'] mask)]: what left where
    merged: list = field(default_factory=list)  # [(layer, row, position, member positions)] over q': slots whose
    # hidden state became the mean of tokens that left there (sparsevlm's recycling)

    def note(self, drop: torch.Tensor, k: int, n_layers: int, scores=None) -> float:
        """The tokens ``drop`` [B, q'] left before layer ``k`` of ``n_layers`` (a stage of the prefill; ``scores``:
        what the method ranked by); returns the token-layers that saves."""
        dropped = drop.sum(1).tolist()
        if self.drop is None:
            self.drop, self.layer, self.dropped = drop, k, dropped
        else:  # a later stage
            self.drop = self.drop | drop
            self.dropped = [a + b for a, b in zip(self.dropped, dropped)]
        self.stages.append((k, dropped, drop))
        self.scores = scores
        self.share += sum(dropped) * (n_layers - k) / (len(dropped) * drop.shape[1] * n_layers)
        return sum(dropped) * (n_layers - k)

    def stats(self) -> dict:
        """``{"exit": {...}}`` for ``vtprune.stats`` ({} when nothing left)."""
        if self.dropped is None and self.exit_layers is None:
            return {}
        out = {"method": self.method, "layer": self.layer, "visual_tokens_dropped": self.dropped,
               "llm_flops_saved": self.share}
        if self.exit_layers is not None:
            out["exit_layers"] = self.exit_layers  # the first layer without the row's visual tokens
        if len(self.stages) > 1:  # staged exits (pdrop, sparsevlm): what left before each stage's layer
            out["stages"] = [{"layer": k, "visual_tokens_dropped": dropped} for k, dropped, _ in self.stages]
        return {"exit": out}


@dataclass
class Forward:
    """The last forward pass with images: what was kept, where, and what it cost."""

    kept: list  # per sample, per image: kept token indices (ascending) into the image's visual tokens
    layouts: list  # per sample, per image: ImageLayout
    images: list  # per image: (sample, tokens in, tokens out)
    length: int  # the language model's input length before the cut
    llm_length: int  # ... and after it
    scores: list | None = None  # per image: the selector's scores (None: no selector)
    cut: tuple | None = None  # (index, real) of the pre-LLM cut, None when nothing was cut
    pad_slots: list | None = None  # per sample: padding slots the cut added
    visual_llm: list | None = None  # per sample: visual tokens entering the language model
    text_tokens: int = 0  # real text tokens of the call
    time_score_s: float = 0.0
    time_gather_s: float = 0.0
    summaries: list | None = None  # per sample, per image: [(index, member indices)] of its summary tokens
    merged: list | None = None  # per sample, per image: [(index, member indices)] of a merging method's tokens
    capped: list | None = None  # per sample, per image: an int keep above its tokens kept them all
    sizes: list | None = None  # per sample, per image: tokens each kept token stands for (size-biased runs)
    weights: torch.Tensor | None = None  # [B, length] log(size) per token of the call (size-biased runs)
    exit: ExitRecord | None = None
    tower_layers: list = field(default_factory=list)  # the vision-tower layers the selector read
