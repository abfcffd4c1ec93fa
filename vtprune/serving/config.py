"""The method config a serving process runs: it travels to vLLM's worker processes in the environment."""

from __future__ import annotations

import json
import os

ENV = "VTPRUNE_SERVE"  # the method config as JSON


def config_from_env():
    """The method config the serving process was started with (None: serve unpruned)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    from ..methods import from_dict

    return from_dict(json.loads(text))
