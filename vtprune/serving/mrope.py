"""The mrope positions of a prompt's pruned media in vLLM, placed by where each media sits in the prompt.

vLLM's model runner numbers a prompt once (``get_mrope_input_positions``, which the Qwen binding runs on the prompt
with its media restored to their whole grids: every text token at its unpruned position) and, for each prefill chunk
holding media embeddings, asks the model to rewrite them (``recompute_mrope_positions``: the prompt, the chunk's media
rows, the positions so far, where the chunk starts).  The rows carry each kept token's (t, h, w) within its media
(and a Qwen3-VL clip's timestamps and frame tokens theirs), so the rewrite only has to know where each row goes.
EVS's rewrite (``vllm.multimodal.video_prune.evs``) guesses that from the media start tokens around the chunk, and
guesses wrong where a chunk or a prefix-cache hit ends inside a pruned Qwen3-VL clip (the clip is taken as done) or a
chunk holds the end of one media and the start of the next.  Here the numbering records each media's place in the
prompt (``record``: its placeholder range and which of it is embedded, keyed by the prompt's tokens) and the
rewrite puts the chunk's rows, in order, on the next embedded indices from the chunk's start (``place``): the
runner hands a chunk the rows of every media with an embedded token in it, in prompt order, each from its first
embedded token in the chunk.  A media's rows sit at the position after the token before it, plus their own
(t, h, w); text is never moved.
"""

from __future__ import annotations

import collections

import torch

RECORDS = 4096  # prompts whose media places a model keeps (the most recently numbered): far more than run at once


def _key(tokens) -> tuple:
    tokens = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return len(tokens), hash(tuple(tokens))


def record(model, tokens, features) -> None:
    """Keep where each media of the prompt ``tokens`` sits (its ``features``' placeholder ranges), for ``place``."""
    places = [(f.mm_position.offset, f.mm_position.length, f.mm_position.is_embed)
              for f in sorted(features, key=lambda f: f.mm_position.offset)]
    records = model.__dict__.setdefault("vtprune_media_places", collections.OrderedDict())
    key = _key(tokens)
    records[key] = places
    records.move_to_end(key)
    while len(records) > RECORDS:
        records.popitem(last=False)


def _embedded(offset: int, length: int, is_embed, done: int) -> torch.Tensor:
    """The prompt indices of a media's embedded tokens from ``done`` on."""
    where = torch.arange(offset, offset + length)
    if is_embed is not None:
        where = where[torch.as_tensor(is_embed, dtype=torch.bool).cpu()]
    return where[where >= done]


def place(model, tokens, channels: list, positions: torch.Tensor, done: int) -> tuple:
    """``(positions, delta)``: ``positions`` (3 x prompt length) with the rows of a prefill chunk starting at prompt
    index ``done`` put in place; ``channels`` holds each media row block's (t, h, w) within its media (3 x rows, in
    the order vLLM hands the blocks over); ``delta`` is what vLLM adds to a generated token's index."""
    records, key = model.__dict__.get("vtprune_media_places", {}), _key(tokens)
    if key not in records:
        raise RuntimeError("vtprune: this prompt's media were not numbered by the served model "
                           "(get_mrope_input_positions), so its pruned tokens have no place")
    records.move_to_end(key)
    positions = positions.clone()
    ahead = ((offset, _embedded(offset, length, is_embed, done)) for offset, length, is_embed in records[key]
             if offset + length > done)
    pending = (media for media in ahead if len(media[1]))  # the media with embedded tokens from here on, in order
    for own in channels:
        offset, embedded = next(pending, (None, None))
        if offset is None or len(embedded) < own.shape[1]:
            raise RuntimeError(f"vtprune: a prefill chunk from token {done} holds media rows past the prompt's media")
        base = positions[:, offset - 1].max() + 1 if offset else 0
        positions[:, embedded[:own.shape[1]].to(positions.device)] = own[:3].to(positions) + base
    return positions, int(positions.max()) + 1 - len(tokens)
