"""What a served model keeps of a clip, free of vLLM and of the family: whether the method can serve clips at all,
and the kept count of the request being processed (which sizes its prompt)."""

from __future__ import annotations

import torch

from . import request_keep

SERVES = "evs, vidcom2, uniform_time, dycoke, random, divprune"  # (the methods that keep a clip's tokens by its frames)


def servable(config) -> str | None:
    """Why vLLM cannot serve a clip with ``config`` (None: it can)."""
    if config.needs_cls:
        return f"{config.name} reads the vision tower's attention over a clip"
    if config.weighs:
        return "summary tokens and size_bias weigh a clip's kept tokens"
    if config.covers_all:
        return f"{config.name} merges a clip's tokens"
    return None


def refuse(asked, why: str, layout) -> int:
    """The one-line ``ValueError`` of a clip on ``layout`` that ``asked`` cannot serve, and why; while vLLM profiles
    (its dummy clip sizes its caches: ``request_keep.profiling``) the clip's every token instead, the bound."""
    if request_keep.profiling():
        return layout.n
    raise ValueError(f"vtprune serves this model's images with {asked.name}, not its videos: {why}; serve videos "
                     f"with a method that keeps a clip's tokens by its frames ({SERVES})")


def kept_count(config, layout) -> int:
    """What the request being processed keeps of a clip on ``layout`` (at most what the server keeps); ``ValueError``
    where its method cannot serve a clip."""
    asked = request_keep.current(config)
    why = servable(asked)
    if why is not None:
        return refuse(asked, why, layout)
    return request_keep.kept_count(config, layout)


def kept_all(config) -> bool:
    """Whether a served model embeds a clip whole: a clip its ``config`` cannot serve is refused before it reaches
    the model, so only vLLM's profiling dummy comes that far (sized whole by ``refuse``)."""
    return servable(config) is not None


def select(model, layout, features: torch.Tensor, main: torch.Tensor | None = None) -> torch.Tensor:
    """The kept indices of one clip on ``layout`` by the served ``model``'s method, the clip's own budget where its
    request gave one: scored on ``main`` (the main part of rows that carry more, Qwen3-VL's deepstack features)
    unless the method scores ``features`` stacked; every index for vLLM's profiling dummy (``kept_all``)."""
    from .rows import select as select_rows

    budgets = getattr(model, "vtprune_video_budgets", None)
    config = budgets.popleft() if budgets else model.vtprune_config
    if kept_all(config):
        return torch.arange(features.shape[0])
    scored = features if config.score_stacked or main is None else main
    kept, _, _ = select_rows(config, scored, model.vtprune_generator, None, layout=layout)
    model.vtprune_kept.append(kept.tolist())
    return kept
