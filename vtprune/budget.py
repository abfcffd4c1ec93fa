"""The visual-token budget ``keep``: a fraction of each image's tokens, or a token count per image."""

from __future__ import annotations

import math
import numbers


def check_keep(keep):
    """Return ``keep`` if it is a valid budget, else raise ``ValueError``/``TypeError``.

    Valid: a float in (0, 1] (fraction of each image's visual tokens) or an int >= 1 (tokens per image).
    """
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be a float in (0, 1] or an int >= 1 (tokens per image), got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep < 1:
            raise ValueError(f"keep as an int is a token count per image and must be >= 1, got {keep}")
        return int(keep)
    keep = float(keep)
    if not (0.0 < keep <= 1.0) or math.isnan(keep):
        raise ValueError(f"keep as a float is a fraction of each image's visual tokens and must lie in (0, 1], got {keep}")
    return keep


def tokens_to_keep(keep, n: int) -> int:
    """How many of an image's ``n`` tokens the budget ``keep`` keeps (at least 1, at most n)."""
    if n <= 0:
        return 0
    if isinstance(keep, int):
        return min(keep, n)
    return max(1, min(n, int(math.floor(keep * n + 0.5))))
