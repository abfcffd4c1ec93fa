"""vtprune: cheaper, more faithful Hugging Face VLMs without retraining.

    import vtprune
    model = vtprune.wrap(model, "random", keep=0.25)
"""

from . import methods
from .api import is_wrapped, last_kept, record, stats, unwrap, wrap, wrapped
from .downsample import downsample
from . import spec
from .errors import NotApplicable, OutOfRange

__version__ = "0.1.0"

__all__ = ["NotApplicable", "OutOfRange", "__version__", "downsample", "is_wrapped", "last_kept", "methods", "record", "spec", "stats", "unwrap", "wrap", "wrapped"]
