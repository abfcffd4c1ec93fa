"""What the vision side tells the cut: each run of the tower, and where the image and video tokens are.

``model.model.get_image_features`` (and ``get_video_features`` where the family takes videos) is
wrapped: whenever the tower runs (inside ``forward``, or in ``generate`` before the prefill on
transformers >= 5.23) the adapter records each image's or clip's token count and features, plus the
[CLS] (or substitute) scores of the tower layers the selector reads and, for merging methods, their
merge (a pre-hook on the projector).  ``get_placeholder_mask`` is wrapped to learn where each
medium's tokens are.  ``take`` hands both to the next language-model call.
"""

from __future__ import annotations

import functools

import torch

from ..budget import tokens_to_keep
from ..errors import OutOfRange
from .hooks import Installed


def merge_tiles(selector, cls, keys, features, sources):
    """A merging method's rewrite of a batch of tiles' per-patch features [tiles, n, C] before the projector.

    ``cls`` [tiles, T] and ``keys`` [tiles, T, d]: the tower layer's scores and head-mean keys; ``sources``
    [n, w]: the tower tokens each projector token holds.  Returns the merged features, and per tower token
    [tiles, T] whether it is kept and how many tower tokens it stands for (divided among its projector
    token's ``w`` sources)."""
    k = tokens_to_keep(selector.keep, features.shape[1])
    # per projector token: the summed [CLS] attention and the mean key of the tower tokens it holds
    merged, kept, sizes = selector.merge(cls[:, sources].sum(-1), keys[:, sources].mean(-2), features, k)
    selected = torch.zeros_like(cls)
    tower_sizes = torch.zeros_like(cls, dtype=torch.float32)
    width = sources.shape[1]  # tower tokens per projector token: an LLM token sums them (tower_to_llm)
    for t, idx in enumerate(kept):
        selected[t, sources[idx].flatten()] = 1.0
        tower_sizes[t, sources[idx].flatten()] = (sizes[t, idx].float() / width).repeat_interleave(width)
    return merged, selected, tower_sizes


MEDIA = ("image", "video")


class Capture:
    def __init__(self, adapter, selector):
        self.adapter = adapter
        self.selector = selector
        self.installed = Installed()
        self.tower_layers = []
        self.tower_cls, self.tower_keys, self.tower_selected, self.tower_sizes = {}, [], None, None
        self.encoding = []  # the media being encoded now (Qwen3-VL encodes a video through get_image_features)
        self.pending_masks = {}  # medium -> [B, q] bool: where its tokens are in the next call
        self.pending = {}  # medium -> the capture of its last tower run
        self.untold = set()  # media whose pending masks the model computed before encoding (Gemma 4)
        self.last = None  # the last captures (re-used when the same features are scattered again)

    def install(self) -> list:
        if self.selector is not None and self.selector.needs_cls:
            self._hook_tower()
        inner = self.adapter.inner
        for medium in MEDIA:
            if medium == "image" or hasattr(inner, f"get_{medium}_features"):
                self.installed.after(inner, f"get_{medium}_features", functools.partial(self._after_features, medium),
                                     before=functools.partial(self._before_features, medium),
                                     failed=self.encoding.pop)
        self.installed.after(inner, "get_placeholder_mask", self._after_placeholder)
        return []

    def remove(self):
        self.installed.remove()

    def _hook_tower(self):
        """Hooks on the tower layers the selector reads ([CLS] attention or its substitute)."""
        n = self.adapter.tower_depth()
        layers = self.selector.tower_layers(n, self.adapter.feature_layer())
        for layer in layers:
            if not -n <= layer < n:
                raise OutOfRange(f"vision-tower layer {layer} is out of range: the tower has {n} layers")
        self.tower_layers = sorted({layer % n for layer in layers})
        for layer in self.tower_layers:
            sink = functools.partial(lambda layer, scores: self.tower_cls.setdefault(layer, []).append(scores), layer)
            kind = self.selector.tower_score or self.adapter.default_score
            self.installed.add(*self.adapter.hook_tower(layer, sink, kind))
        if self.selector.merges:
            projector = self.adapter.projector()
            self.installed.add(*self.adapter.hook_keys(self.tower_layers[-1], lambda keys: self.tower_keys.append(keys)))
            self.installed.add(projector.register_forward_pre_hook(self._on_projector))

    def _on_projector(self, module, args):
        """Let a merging method rewrite the per-patch tower features before the projector."""
        features = args[0]
        layer = self.tower_layers[-1]
        if features.dim() != 3 or not self.tower_keys or layer not in self.tower_cls:
            return None
        cls, keys = self.tower_cls[layer][-1], self.tower_keys[-1]
        medium = self.encoding[-1] if self.encoding else "image"
        sources = self.adapter.projector_sources(cls.shape[1], features.shape[1], medium).to(cls.device)  # [T, k]
        if cls.shape[0] != features.shape[0]:
            raise RuntimeError("vtprune: the projector input does not line up with the tower's tokens")
        merged, self.tower_selected, self.tower_sizes = merge_tiles(self.selector, cls, keys, features, sources)
        return (merged, *args[1:])

    def _reset(self):
        self.tower_cls, self.tower_keys, self.tower_selected, self.tower_sizes = {}, [], None, None

    def _before_features(self, medium, args, kwargs):
        if not self.encoding:  # an outer run: what the tower hooks saw before is not this run's
            self._reset()
        self.encoding.append(medium)

    def _after_features(self, medium, args, kwargs, out):
        self.encoding.pop()
        if self.encoding:  # inside the outer run (a video encoded as images): the outer run records it
            return
        if isinstance(out, tuple) and not all(isinstance(t, torch.Tensor) for t in out):
            self._reset()  # a direct call with return_dict=False (forward and generate ask for a ModelOutput)
            return
        capture = self.adapter.capture(args, kwargs, out, medium)
        capture["medium"] = medium
        capture["cls"] = {layer: torch.cat(parts) for layer, parts in self.tower_cls.items()}
        capture["selected"] = self.tower_selected
        capture["sizes"] = self.tower_sizes
        self.pending[medium] = capture
        self._reset()

    def _after_placeholder(self, args, kwargs, out):
        masks = out if isinstance(out, tuple) else (out,)
        # (input_ids, inputs_embeds, image_features, video_features); Gemma 4 passes no features (it asks before
        # encoding): there a medium's mask counts where it has tokens
        told = len(args) > 2 or any(key.endswith("_features") for key in kwargs)
        self.untold = set() if told else set(MEDIA)
        for i, medium in enumerate(MEDIA[:len(masks)]):
            mask = masks[i]
            if told and kwargs.get(f"{medium}_features", args[2 + i] if len(args) > 2 + i else None) is None:
                continue
            if not told and (torch.compiler.is_compiling() or not bool(mask.any())):
                continue  # (compiled: the session's hooks step aside or refuse)
            self.pending_masks[medium] = mask[..., 0] if mask.dim() == 3 else mask

    def _fits_last(self, medium, mask) -> bool:
        """Whether ``mask`` holds the last encoded ``medium``'s tokens (a whole number of copies: beams)."""
        if self.last is None or medium not in self.last["media"]:
            return False
        total, features = int(mask.sum()), sum(self.last["media"][medium]["counts"])
        return total > 0 and features > 0 and total % features == 0

    def take(self, batch: int, q: int):
        """``(visual_mask [B, q] or None, {medium: [B, q] mask}, captures or None)`` for the language-model
        call about to run: the image and video tokens together, each medium's own, and what the tower's
        runs recorded (``{"media": {medium: capture}}``).

        Without a fresh tower run the last captures are used: ``generate`` without a cache scatters the
        same features again at every step."""
        masks, self.pending_masks = self.pending_masks, {}
        # a mask the model computed before encoding counts where that medium was encoded (a generated token may
        # equal the image token)
        masks = {m: v for m, v in masks.items() if tuple(v.shape) == (batch, q)
                 and (m not in self.untold or m in self.pending or self._fits_last(m, v))}
        if not masks:
            return None, {}, None
        if self.pending:
            self.last, self.pending = {"media": self.pending}, {}
        visual = None
        for mask in masks.values():
            visual = mask if visual is None else visual | mask.to(visual.device)
        return visual, masks, self.last
