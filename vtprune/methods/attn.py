"""Attention interventions for faithfulness: VHR and VAR."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method, register


@register("vhr")
@dataclass
class VHR(Method):
    """Scale the outputs of the most vision-aware heads by ``alpha`` (VHR, ACL 2025).

    Per sample, the heads whose output changes most when the image is removed are scaled by
    ``alpha`` (default 2), before ``o_proj``.

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

    def runtime(self, session, layers):
        from ..vhr import HeadReinforcement

        return HeadReinforcement(session, self, layers)


@register("var")
@dataclass
class VAR(Method):
    """Move attention from sink tokens onto the other visual tokens in image-centric heads (VAR, ICLR 2025).

    A fraction ``moved`` (default 0.4: the official code keeps p = 0.6) of the attention paid to sink
    tokens goes to the non-sink visual tokens, for the text rows after the image and every generated
    token.

    Sinks are tokens whose residual stream has a massive activation (``|x_d / RMS(x)| > tau`` in the
    ``sink_dims``; default: calibrated or known per model, see ``vtprune calibrate var``). A head is
    image-centric for a row when at least ``summ`` of its attention is on the image and a share
    ``>= rho`` of that is on non-sink visual tokens (paper: 0.5 for hallucination benchmarks, 0.8
    general, 0.9 vision-centric). ``layers`` default to 2 .. L-2 of a 32-layer model, scaled. Runs on
    SDPA: only the intervened rows are recomputed. ``moved=0`` leaves the model unchanged.
    """

    stage: ClassVar[str] = "attention"
    moved: float = 0.4
    rho: float = 0.5
    summ: float = 0.2
    tau: float = 20.0
    sink_dims: list | None = None
    calibration: str | None = None
    layers: list | None = None

    def validate(self):
        for name in ("moved", "rho", "summ"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"var {name} must be in [0, 1], got {value!r}")
        if not self.tau > 0:
            raise ValueError(f"var tau must be > 0, got {self.tau}")
        if self.sink_dims is not None:
            self.sink_dims = sorted({int(d) for d in self.sink_dims})
            if not self.sink_dims:
                raise ValueError("var sink_dims is empty")
        if self.layers is not None:
            self.layers = sorted({int(j) for j in self.layers})

    def runtime(self, session, layers):
        from ..var import SinkRedistribution

        return SinkRedistribution(session, self, layers)
