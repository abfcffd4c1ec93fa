"""Errors vtprune raises on purpose."""

from __future__ import annotations

import difflib


class NotApplicable(ValueError):
    """A method cannot apply to this model, for a reason inherent to the two (a family without what
    the method reads, a layer the model does not have, a fixed-resolution processor for
    ``downsample``).  Raised by ``wrap`` and ``downsample``; a sweep records such a cell as not
    applicable and goes on, while any other error stops it."""


class OutOfRange(NotApplicable):
    """An option names a layer or a head the model does not have (``fastv:layer=99`` on a 32-layer model):
    the user's mistake rather than the method's, so ``vtprune eval`` checks it on a weightless copy of the
    model before loading one, while a sweep records the other ``NotApplicable`` cells and goes on."""


def did_you_mean(word, choices) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``word`` (case aside), or ``""``: the one suggester of
    the command line and the Python API."""
    lowered = {str(c).lower(): c for c in choices}
    close = difflib.get_close_matches(str(word).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""
