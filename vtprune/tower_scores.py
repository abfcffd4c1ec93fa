"""Scores read off a vision-tower layer's queries and keys (the adapters only say where q and k are).

Both take ``q`` and ``k`` [S, heads, d] (RoPE applied where the tower has it), the ``segments``
``[(start, end), ...]`` that attend among themselves (a tile, a crop, a Qwen image) and the
softmax ``scale``, and return one fp32 score per token [S]:

* ``cls``: the post-softmax attention of the segment's first token (the [CLS]) to every token of
  its segment, averaged over heads (FasterVLM, VisionZip, VTC-CLS) — one 1 x N product per head;
* ``received``: the attention each token receives from all the segment's queries, averaged over
  queries and heads (the [CLS]-free score of towers that have none).  A segment longer than
  ``max_queries`` averages over that many evenly strided query rows, so the cost stays linear.

Segments of one length (tiles, crops) are computed as one batch.
"""

from __future__ import annotations

import torch


def _groups(segments):
    """``[(length, [starts])]``: segments of one length go together."""
    groups = {}
    for a, b in segments:
        groups.setdefault(b - a, []).append(a)
    return groups.items()


def _take(t, starts, n):
    """[G, H, n, d] fp32: the segments starting at ``starts``, each ``n`` long."""
    index = torch.tensor(starts, device=t.device)[:, None] + torch.arange(n, device=t.device)
    return t[index].float().transpose(1, 2)


def cls(q, k, segments, scale):
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for n, starts in _groups(segments):
        keys = _take(k, starts, n)  # [G, H, n, d]
        query = _take(q, starts, 1)  # [G, H, 1, d]
        probs = ((query @ keys.transpose(-1, -2)).squeeze(2) * scale).softmax(-1).mean(1)  # [G, n]
        out[torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)] = probs
    return out.detach()


def received(q, k, segments, scale, max_queries: int = 512, chunk: int = 512):
    out = torch.zeros(q.shape[0], dtype=torch.float32, device=q.device)
    for n, starts in _groups(segments):
        keys = _take(k, starts, n)  # [G, H, n, d]
        rows = torch.arange(n, device=q.device)
        if n > max_queries:
            rows = torch.linspace(0, n - 1, max_queries, device=q.device).round().long()
        total = torch.zeros(len(starts), n, dtype=torch.float32, device=q.device)
        for c in range(0, rows.numel(), chunk):
            part = rows[c:c + chunk]
            index = torch.tensor(starts, device=q.device)[:, None] + part
            queries = q[index].float().transpose(1, 2)  # [G, H, m, d]
            total += ((queries @ keys.transpose(-1, -2)) * scale).softmax(-1).sum((1, 2))
        where = torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)
        out[where] = total / (rows.numel() * q.shape[1])
    return out.detach()


SCORES = {"cls": cls, "received": received}


def per_tile(q, k, heads: int, scale: float, kind: str = "cls"):
    """[tiles, n] fp32: the score ``kind`` of each tile of a tower layer's ``q``/``k`` [tiles, n, heads x d]
    (a batch of CLIP images or crops), each tile attending within itself."""
    tiles, n, width = k.shape
    segments = [(t * n, (t + 1) * n) for t in range(tiles)]
    flat = SCORES[kind](q.reshape(tiles * n, heads, width // heads), k.reshape(tiles * n, heads, width // heads),
                        segments, scale)
    return flat.view(tiles, n)


def head_mean(keys: torch.Tensor, heads: int) -> torch.Tensor:
    """Keys ``[tiles, N, heads x d]`` averaged over heads: ``[tiles, N, d]`` (what VisionZip merges by)."""
    tiles, n, width = keys.shape
    return keys.detach().reshape(tiles, n, heads, width // heads).mean(2)


def leading_sources(n_tower: int, n_projector: int) -> torch.Tensor:
    """``[n_projector, 1]``: the tower token each projector input holds when the projector reads a tile's
    last ``n_projector`` tower tokens one each (after leading ones such as [CLS])."""
    skip = n_tower - n_projector
    if skip < 0:
        raise RuntimeError("vtprune: the projector input does not line up with the tower's tokens")
    return (torch.arange(n_projector) + skip)[:, None]
