"""Errors vtprune raises on purpose."""

from __future__ import annotations


class NotApplicable(ValueError):
    """A method cannot apply to this model, for a reason inherent to the two (a family without what
    the method reads, a layer the model does not have, a fixed-resolution processor for
    ``downsample``).  Raised by ``wrap`` and ``downsample``; a sweep records such a cell as not
    applicable and goes on, while any other error stops it."""
