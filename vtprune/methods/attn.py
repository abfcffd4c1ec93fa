"""Attention interventions for faithfulness: VHR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method, register


@register("vhr")
@dataclass
class VHR(Method):
    """Vision-aware head reinforcement (VHR, ACL 2025): per sample, scale the outputs of the heads
    whose output changes most when the image is removed by ``alpha`` (default 2), before ``o_proj``.

    Heads are chosen at the first generation step, layer by layer, from the vision-aware head
    divergence (with outlier removal, ``outliers=True``) and kept for the rest of the generation.
    ``layers`` default to the paper's layer 1 plus the last 14 of 32, scaled to the model's depth.
    ``alpha=1`` leaves the model unchanged.
    """

    stage: ClassVar[str] = "attention"
    alpha: float = 2.0
    layers: list | None = None
    outliers: bool = True

    def validate(self):
        if not self.alpha > 0:
            raise ValueError(f"vhr alpha must be > 0, got {self.alpha}")
        if self.layers is not None:
            self.layers = sorted({int(j) for j in self.layers})
