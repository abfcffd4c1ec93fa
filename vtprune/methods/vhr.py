"""VHR: vision-aware head reinforcement (He et al., ACL 2025, arXiv 2412.13949) — its config and runtime.

At the first generation step (the prefill with images) every sample is run next to its own
text-only copy (the same prompt with the visual tokens removed, left-padded so the last positions
line up): the language model's batch is doubled inside the forward.  In each reinforced layer, the
pre-hook of ``o_proj`` sees every head's output (the per-head slices of its input) and computes,
at the last position, the vision-aware head divergence VHD = ||A(with image) - A(text only)||_2.
As in the paper: heads whose VHD *and* text-only output energy ||A(text only)||^2 are both above
mean + std of their layer are outliers (VHD set to 0); the heads above the layer's median VHD are
selected and their outputs multiplied by ``alpha`` — in both rows, layer by layer, so later layers
see the reinforced earlier ones.  The text-only rows are then dropped (outputs and KV cache), and
every later step scales the same heads of that sample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..runtime import masks
from ..attention import pick_layers
from ..compat import cache_of, cache_of_output
from ..runtime.stage import StageRuntime
from .base import Method, indices, register


@register("vhr")
@dataclass
class VHR(Method):
    """Scale the outputs of the most vision-aware heads by ``alpha`` (VHR, ACL 2025).

    Per sample, the heads whose output changes most when the image is removed are scaled by
    ``alpha`` (default 2), before ``o_proj``.

    Heads are chosen at the first generation step, layer by layer, from the vision-aware head
    divergence (with outlier removal, ``outliers=True``) and kept for the rest of the generation.
    ``layers`` default to the paper's layer 1 plus the last 14 of 32, scaled to the model's depth.
    ``alpha=1`` leaves the model unchanged.
    """

    stage: ClassVar[str] = "attention"
    paper: ClassVar[str] = "VHR: He et al., ACL 2025, arXiv 2412.13949"
    ranges: ClassVar[dict] = {"alpha": "float > 0 (1 = no change)", "layers": "list of decoder layers; None: the "
                              "paper's choice scaled to the depth", "outliers": "bool: drop outlier heads"}
    alpha: float = 2.0
    layers: list | None = None
    outliers: bool = True

    def validate(self):
        if not self.alpha > 0:
            raise ValueError(f"vhr alpha must be > 0, got {self.alpha}")
        if self.layers is not None:
            self.layers = indices(self.layers)

    def runtime(self, model, layers, route):
        return HeadReinforcement(model, self, layers)


def default_layers(n_layers: int) -> list:
    """The paper's choice for 32-layer LLaVA (layer 1 and the last 14), scaled to ``n_layers``."""
    last = max(1, round(14 * n_layers / 32))
    return sorted({min(1, n_layers - 1)} | set(range(n_layers - last, n_layers)))


class HeadReinforcement(StageRuntime):
    def __init__(self, model, method, layers, route=None):
        self.method = method
        self.layer_ids = pick_layers("vhr", method.layers, default_layers, len(layers), layers)
        self.layers = layers
        self.batch = None  # the real batch size while the prefill runs doubled, else None
        self.heads = {}  # layer -> [B, H] bool, fixed at the prefill
        self.probing = False

    def install(self) -> list:
        handles = []
        for j in self.layer_ids:
            attn = self.layers[j].self_attn
            heads = attn.config.num_attention_heads
            handles.append(attn.o_proj.register_forward_pre_hook(functools.partial(self._pre_o_proj, j, heads)))
        return handles

    # ------------------------------------------------------------------ per call
    def begin_call(self, call):
        """Double the batch of a fresh prefill with images: each sample plus its text-only copy."""
        kwargs, visual = call.kwargs, call.visual
        self.probing = False
        if not call.fresh:
            return
        self.heads = {}
        if visual is None or not bool(visual.any()):
            return
        embeds = kwargs["inputs_embeds"]
        b, n, _ = embeds.shape
        mask = kwargs.get("attention_mask")
        cache = cache_of(kwargs)
        if masks.is_4d(mask) or getattr(cache, "is_compileable", False):
            raise ValueError("vhr doubles the prefill batch (each sample next to its text-only copy), which needs "
                             "a 2-D attention mask and a dynamic cache: drop the 4-D mask / the static cache "
                             "(cache_implementation='static') for vhr")
        mask = mask[:, -n:] if mask is not None else torch.ones(b, n, dtype=torch.long, device=embeds.device)
        keep = (~visual.to(embeds.device)) & mask.bool()
        text_embeds = torch.zeros_like(embeds)
        text_mask = torch.zeros_like(mask)
        text_pos = torch.zeros(b, n, dtype=torch.long, device=embeds.device)
        for row in range(b):
            idx = keep[row].nonzero().squeeze(1)
            m = idx.numel()
            text_embeds[row, n - m:] = embeds[row, idx]
            text_mask[row, n - m:] = 1
            text_pos[row, n - m:] = torch.arange(m, device=embeds.device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(n, device=embeds.device).expand(b, n)
        elif positions.shape[-2] == 1 and b > 1:
            positions = positions.expand(*positions.shape[:-2], b, n)
        if positions.dim() == 3:
            text_pos = text_pos.expand(positions.shape[0], b, n)
        kwargs["inputs_embeds"] = torch.cat([embeds, text_embeds])
        kwargs["attention_mask"] = torch.cat([mask, text_mask.to(mask.dtype)])
        kwargs["position_ids"] = torch.cat([positions, text_pos.to(positions.device)], dim=-2)
        vis = kwargs.get("visual_pos_masks")
        if vis is not None:
            kwargs["visual_pos_masks"] = torch.cat([vis, torch.zeros_like(vis)])
        self.batch = b
        self.probing = call.changed = True

    def end_call(self, call, output):
        """Drop the text-only rows from the outputs and the KV cache after a doubled prefill."""
        if not self.probing:
            return None
        b = self.batch
        self.probing, self.batch = False, None
        cache = cache_of_output(output)
        if cache is not None:
            for layer in getattr(cache, "layers", []):
                if getattr(layer, "keys", None) is not None and layer.keys.numel():
                    layer.keys, layer.values = layer.keys[:b], layer.values[:b]
                if hasattr(layer, "recurrent_states"):  # a linear-attention layer's states (Qwen3.5)
                    layer.reorder_cache(torch.arange(b))
        output["last_hidden_state"] = output.last_hidden_state[:b]
        if getattr(output, "hidden_states", None) is not None:
            output["hidden_states"] = tuple(h[:b] for h in output.hidden_states)
        return output

    # ------------------------------------------------------------------ heads
    def _pre_o_proj(self, layer, heads, module, args):
        x = args[0]
        if self.probing:
            b = self.batch
            shape = x.shape[:-1] + (heads, x.shape[-1] // heads)
            per_head = x.view(shape)
            with_image, text_only = per_head[:b, -1].float(), per_head[b:, -1].float()
            vhd = (with_image - text_only).norm(dim=-1)  # [B, H]
            if self.method.outliers:
                energy = text_only.pow(2).sum(-1)
                high = lambda v: v > (v.mean(-1, keepdim=True) + v.std(-1, keepdim=True))  # noqa: E731
                vhd = vhd.masked_fill(high(vhd) & high(energy), 0.0)
            self.heads[layer] = vhd > vhd.median(-1, keepdim=True).values
            selected = torch.cat([self.heads[layer], self.heads[layer]])
        elif layer in self.heads and x.shape[0] == self.heads[layer].shape[0]:
            selected = self.heads[layer]
        else:
            return None
        scale = torch.where(selected, self.method.alpha, 1.0).to(x.dtype)  # [B', H]
        d = x.shape[-1] // heads
        factor = scale.repeat_interleave(d, dim=-1)[:, None, :]
        return (x * factor, *args[1:])

    def stats(self) -> dict:
        if not self.heads:
            return {}
        return {"vhr": {"method": "vhr", "layers": list(self.heads),
                        "heads_per_layer": {j: h.sum(-1).tolist() for j, h in self.heads.items()}}}
