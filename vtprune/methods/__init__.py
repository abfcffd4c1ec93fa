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

from .base import LayerMethod, Method, ScoreContext, Selector, available, from_dict, get, register, resolve
from .cls import VTCCLS, FasterVLM, VisionZip
from .cdpruner import CDPruner
from .controls import DivPrune, Downsample, Pool, Random, Uniform
from .dycoke import PDKV, DyCoke
from .fastvid import FastVID
from .flashvid import FlashVID
from .framefusion import FrameFusion
from .holitom import HoliTom
from .holov import HoloV
from .layer import DART, DyVTE, Exit, FastV
from .pdrop import PDrop
from .sparsevlm import SparseVLM
from .temporal import EVS, UniformTime, VidCom2
from .var import VAR
from .vispruner import VisPruner
from .vhr import VHR
from .zerotuning import ZeroTuning

__all__ = ["CDPruner", "DART", "DivPrune", "Downsample", "DyCoke", "DyVTE", "EVS", "Exit", "FastV", "FastVID", "FasterVLM", "FlashVID", "FrameFusion", "HoliTom", "HoloV", "LayerMethod", "Method",
           "PDKV", "PDrop", "Pool", "Random", "ScoreContext", "Selector", "SparseVLM", "Uniform", "UniformTime", "VAR", "VHR", "VTCCLS",
           "VidCom2", "VisPruner", "VisionZip", "ZeroTuning", "available", "from_dict", "get", "register", "resolve"]
