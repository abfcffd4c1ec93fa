"""The training loss of a wrapped model: the model's own loss function, on the kept positions.

``labels`` (and ``shift_labels``) are taken from the top-level call before the model runs, since
a cut makes the logits shorter than the labels.  Without a cut the loss is computed exactly as
the stock forward computes it (same function, same keyword arguments).  With a cut every kept
position keeps its original target — the next token of the full sequence, or the caller's
pre-shifted ``shift_labels`` — which is the loss of the stock model fed the full sequence with
the dropped tokens masked out; padding slots of the cut are ignored.
"""

from __future__ import annotations

import inspect

import torch


class Loss:
    def __init__(self, model):
        self.model = model
        self.params = set(inspect.signature(type(model).forward).parameters)
        self.labels = self.shift_labels = None
        self.kwargs = {}

    def take(self, kwargs: dict):
        """Called before the forward: remove the labels from its kwargs (the loss is ours to compute)."""
        self.labels = kwargs.pop("labels", None)
        self.shift_labels = kwargs.pop("shift_labels", None) if self.labels is not None else None
        self.kwargs = {k: v for k, v in kwargs.items() if k not in self.params} if self.labels is not None else {}

    def compute(self, logits, cut):
        """The loss of this forward (None without labels); ``cut`` is the pre-LLM ``(index, real, length)``
        (``length``: the uncut prompt's) or None."""
        labels, shift_labels, kwargs = self.labels, self.shift_labels, self.kwargs
        self.labels = self.shift_labels = None
        self.kwargs = {}
        if labels is None:
            return None
        vocab = self.model.config.get_text_config().vocab_size
        if cut is None:
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return self.model.loss_function(logits=logits, labels=labels, vocab_size=vocab, **kwargs)
        ignore = kwargs.get("ignore_index", -100)
        index, real, length = cut
        for name, given in (("labels", labels), ("shift_labels", shift_labels)):
            if given is not None and given.shape[-1] != length:
                raise ValueError(f"{name} has {given.shape[-1]} positions but the prompt has {length} tokens: pass "
                                 f"{name} for the whole prompt (vtprune cuts them with the tokens it drops; the "
                                 f"logits have one row per kept token)")
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore)[..., 1:]
        index, real = index.to(labels.device), real.to(labels.device)
        targets = shift_labels.to(labels.device).gather(1, index).masked_fill(~real, ignore)
        kept = labels.gather(1, index).masked_fill(~real, ignore)
        return self.model.loss_function(logits=logits, labels=kept, vocab_size=vocab, shift_labels=targets, **kwargs)
