"""DyVTE's hyper-networks (arXiv 2411.19628): small routers that decide when visual tokens may exit.

Following the DyVTE code: one router per decoder layer, ``Linear(2d, h, bias=False) -> GELU ->
Linear(h, 2)``, reading the *output* hidden state of its layer at the text tokens only:
``concat(mean of the text tokens after the image except the last, the last token)``.  Class 1 =
"the visual tokens can leave now".  Differences, written down: the routers live outside the model
(``unwrap`` leaves it untouched) and are saved as safetensors with their layer list in the
metadata; the hidden size ``h`` is a parameter (DyVTE uses 2048 for 7B/13B models); the decision
is ``p(exit) > threshold`` (DyVTE's argmax is ``threshold=0.5``); batches decide per row (see
``vtprune.runtime.exit``); the text span is found from the image-token mask instead of hard-coded offsets.
"""

from __future__ import annotations

import json

import torch
from torch import nn


class Router(nn.Module):
    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(2 * hidden_size, width, bias=False)
        self.fc2 = nn.Linear(width, 2)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Routers(nn.Module):
    """The routers of chosen decoder layers (``layers[i]`` has ``routers[i]``)."""

    def __init__(self, hidden_size: int, layers, width: int = 256):
        super().__init__()
        self.layers = [int(j) for j in layers]
        self.hidden_size, self.width = hidden_size, width
        self.routers = nn.ModuleList(Router(hidden_size, width) for _ in self.layers)

    def router(self, layer: int) -> Router:
        return self.routers[self.layers.index(layer)]

    def save(self, path: str):
        from safetensors.torch import save_file

        meta = {"layers": json.dumps(self.layers), "hidden_size": str(self.hidden_size), "width": str(self.width),
                "format": "vtprune.dyvte/1"}
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "Routers":
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "vtprune.dyvte/1":
            raise ValueError(f"{path} is not a vtprune DyVTE router file (train one with scripts/train_dyvte.py)")
        routers = cls(int(meta["hidden_size"]), json.loads(meta["layers"]), int(meta["width"]))
        routers.load_state_dict(load_file(path))
        return routers.eval()


def router_input(hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``[B, 2d]``: mean of the text tokens after the last visual token (except the last token), and the last token.

    ``hidden`` [B, L, d]; ``visual``/``text`` [B, L] bool.  Rows with no text after the image use all
    their text tokens but the last.
    """
    b, n, _ = hidden.shape
    pos = torch.arange(n, device=hidden.device)
    last_visual = torch.where(visual, pos, torch.full_like(pos, -1)).amax(1, keepdim=True)
    span = text & (pos > last_visual) & (pos < n - 1)
    span = torch.where(span.any(1, keepdim=True), span, text & (pos < n - 1))
    weights = span.float()
    mean = (hidden.float() * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
    return torch.cat([mean, hidden[:, -1].float()], -1)
