"""Attention interventions: VHR and VAR (faithfulness), ZeroTuning (the attention sink)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method, register


def _indices(values) -> list:
    """Layer, head or channel indices as sorted unique ints."""
    return sorted({int(v) for v in values})


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
    paper: ClassVar[str] = "VHR: He et al., ACL 2025, arXiv 2412.13949"
    ranges: ClassVar[dict] = {"alpha": "float > 0 (1 = no change)", "layers": "list of decoder layers; None: the "
                              "paper's choice scaled to the depth", "outliers": "bool: drop outlier heads"}
    alpha: float = 2.0
    layers: list | None = None
    outliers: bool = True

    def validate(self):
        if not self.alpha > 0:
            raise ValueError(f"vhr alpha must be > 0, got {self.alpha}")
        if self.layers is not None:
            self.layers = _indices(self.layers)

    def runtime(self, model, layers, route):
        from ..vhr import HeadReinforcement

        return HeadReinforcement(model, self, layers)


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
    paper: ClassVar[str] = "VAR: Kang et al., ICLR 2025, arXiv 2503.03321"
    ranges: ClassVar[dict] = {"moved": "float in [0, 1]", "rho": "float in [0, 1]", "summ": "float in [0, 1]",
                              "tau": "float > 0", "sink_dims": "list of hidden channels; None: calibrated "
                              "(vtprune calibrate var)", "calibration": "path to a calibration JSON",
                              "layers": "list of decoder layers; None: 2 .. L-2 of 32, scaled"}
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
            self.sink_dims = _indices(self.sink_dims)
            if not self.sink_dims:
                raise ValueError("var sink_dims is empty")
        if self.layers is not None:
            self.layers = _indices(self.layers)

    def runtime(self, model, layers, route):
        from ..var import SinkRedistribution

        return SinkRedistribution(model, self, layers, route)


@register("zerotuning")
@dataclass
class ZeroTuning(Method):
    """Rescale the attention every row pays to the first token by ``gamma`` (ZeroTuning, arXiv 2505.11739).

    In ``layers`` (default: all) and ``heads`` (default: all), a row's attention to the sequence's
    first real token (BOS) is multiplied by ``gamma`` and the row renormalised — the same as adding
    log(gamma) to that logit, so it runs on SDPA as a mask bias. The paper tunes ``gamma``, layers
    and heads per task (some heads want the sink up, some down); there is no universal value, so
    ``gamma`` has no effect until set (``gamma=1`` is the stock model).
    """

    stage: ClassVar[str] = "attention"
    composes_with_exit: ClassVar[bool] = True  # a mask bias: indifferent to tokens leaving mid-way
    paper: ClassVar[str] = "ZeroTuning: Han et al. 2025, arXiv 2505.11739"
    ranges: ClassVar[dict] = {"gamma": "float > 0 (1 = no change)", "layers": "list of decoder layers; None: all",
                              "heads": "list of heads; None: all"}
    gamma: float = 1.0
    layers: list | None = None
    heads: list | None = None

    def validate(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not self.gamma > 0:
            raise ValueError(f"zerotuning gamma must be > 0, got {self.gamma!r}")
        if self.layers is not None:
            self.layers = _indices(self.layers)
        if self.heads is not None:
            self.heads = _indices(self.heads)

    def runtime(self, model, layers, route):
        from ..zerotuning import SinkScaling

        return SinkScaling(model, self, layers, route)
