"""VAR: visual attention sink redistribution (Kang et al., ICLR 2025, arXiv 2503.03321) — its config and runtime.

Sinks. At the prefill, before each VAR layer ``l``, a token is a *sink* when
``max_{d in sink_dims} |x_d / RMS(x)| > tau`` for its residual-stream input ``x`` (the official
code's rule: RMS without gain, ``tau`` 20, the model's massive-activation dimensions). Sinks inside
the image are *visual sinks*; the sink sets of the prefill are kept for every decode step.

Redistribution. For every query row after the sample's last visual token (prefill) and every
decode row, per head: if the head is *image-centric* for that row — at least ``summ`` of its
attention on the image, and a share ``>= rho`` of that on non-sink visual tokens — a fraction
``moved`` of the attention it pays to all sinks (visual and text, e.g. BOS) is moved onto the
non-sink visual tokens in proportion to their attention; the row still sums to 1. Layers without
a visual sink are left alone, as in the official code.

On SDPA (or flash) the layer runs unchanged; only the intervened rows are recomputed explicitly
(one sample at a time: heads x rows x keys), and only the image-centric heads of those rows are
overwritten. ``moved = 0`` changes nothing. Attention softcapping and sliding windows, which the
supported language models do not use, are not modelled.

``sink_dims`` come from, in order: the option, ``calibration=PATH``, ``vtprune_var.json`` in the
model's folder, the user cache written by ``vtprune calibrate var``, and a table of the dimensions
the paper reports (Llama-2-7B/13B for LLaVA-1.5, Qwen2-7B for Qwen2-VL).
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..attention import allowed_keys, pick_layers, text_config
from ..runtime.stage import StageRuntime
from .base import Method, indices, register

# (text model_type, hidden size, layers) -> massive-activation dims reported by VAR / Sun et al. 2024
KNOWN_DIMS = {
    ("llama", 4096, 32): [1415, 2533],  # Llama-2-7B / Vicuna-7B: LLaVA-1.5-7B
    ("llama", 5120, 40): [2100, 4743],  # Llama-2-13B / Vicuna-13B: LLaVA-1.5-13B
    ("qwen2_vl_text", 3584, 28): [458, 2570],  # Qwen2-VL-7B
}
FILE = "vtprune_var.json"


@register("var")
@dataclass
class VAR(Method):
    """Move attention from sink tokens onto the other visual tokens in image-centric heads (VAR, ICLR 2025).

    A fraction ``moved`` (default 0.4: the official code keeps p = 0.6) of the attention paid to sink
    tokens goes to the non-sink visual tokens, for the text rows after the image and every generated
    token.

    Sinks are tokens whose residual stream has a massive activation (``|x_d / RMS(x)| > tau`` in the
    ``sink_dims``; default: calibrated or known per model, see ``vtprune calibrate var``). A head is
    image-centric for a row when at least ``summ`` of its attention is on the image and a share
    ``>= rho`` of that is on non-sink visual tokens (paper: 0.5 for hallucination benchmarks, 0.8
    general, 0.9 vision-centric). ``layers`` default to 2 .. L-2 of a 32-layer model, scaled. Runs on
    SDPA: only the intervened rows are recomputed. ``moved=0`` leaves the model unchanged.
    """

    stage: ClassVar[str] = "attention"
    paper: ClassVar[str] = "VAR: Kang et al., ICLR 2025, arXiv 2503.03321"
    ranges: ClassVar[dict] = {"moved": "float in [0, 1]", "rho": "float in [0, 1]", "summ": "float in [0, 1]",
                              "tau": "float > 0", "sink_dims": "list of hidden channels; None: calibrated "
                              "(vtprune calibrate var)", "calibration": "path to a calibration JSON",
                              "layers": "list of decoder layers; None: 2 .. L-2 of 32, scaled"}
    moved: float = 0.4
    rho: float = 0.5
    summ: float = 0.2
    tau: float = 20.0
    sink_dims: list | None = None
    calibration: str | None = None
    layers: list | None = None

    def validate(self):
        for name in ("moved", "rho", "summ"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"var {name} must be in [0, 1], got {value!r}")
        if not self.tau > 0:
            raise ValueError(f"var tau must be > 0, got {self.tau}")
        if self.sink_dims is not None:
            self.sink_dims = indices(self.sink_dims)
            if not self.sink_dims:
                raise ValueError("var sink_dims is empty")
        if self.layers is not None:
            self.layers = indices(self.layers)

    def runtime(self, model, layers, route):
        return SinkRedistribution(model, self, layers, route)


def default_layers(n_layers: int) -> list:
    """The official code's layers 2 .. L-1 of a 32-layer model, scaled, without the last layer."""
    start = max(1, round(2 * n_layers / 32))
    return list(range(start, max(start, n_layers - 1)))


def rms_ratio(x, dims=None):
    """|x_d / RMS(x)| per channel (RMS without gain, fp32), for ``dims`` only when given: the
    massive-activation measure."""
    x = x.float()
    rms = x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    return ((x if dims is None else x[..., dims]) / rms).abs()


def cache_dir() -> str:
    root = os.environ.get("VTPRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vtprune")
    return os.path.join(root, "var")


def cache_path(model) -> str:
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return os.path.join(cache_dir(), re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/")) + ".json")


def find_dims(model, calibration=None):
    """``(sink_dims, source)`` for ``model`` (see the module docstring), or raise ``ValueError``."""
    if calibration and not os.path.isfile(calibration):
        raise ValueError(f"var calibration file {calibration!r} does not exist")
    candidates = [calibration] if calibration else []
    name = getattr(model.config, "_name_or_path", "")
    if name and os.path.isdir(name):
        candidates.append(os.path.join(name, FILE))
    candidates.append(cache_path(model))
    for path in candidates:
        if path and os.path.isfile(path):
            with open(path) as f:
                return [int(d) for d in json.load(f)["sink_dims"]], path
    text = text_config(model)
    key = (text.model_type, text.hidden_size, text.num_hidden_layers)
    if key in KNOWN_DIMS:
        return list(KNOWN_DIMS[key]), "the dimensions the VAR paper reports for this backbone"
    raise ValueError(f"var needs the massive-activation dimensions of this language model ({key}): run "
                     f"`vtprune calibrate var --model {name or 'PATH'}` once, or pass sink_dims=[...]")


class SinkRedistribution(StageRuntime):
    def __init__(self, model, method, layers, route):
        self.model = model
        self.method = method
        self.layer_ids = pick_layers("var", method.layers, default_layers, len(layers), layers)
        self.layers = layers
        hidden = text_config(model).hidden_size
        if method.sink_dims is not None:
            self.dims, self.source = list(method.sink_dims), "sink_dims"
        else:
            self.dims, self.source = find_dims(model, method.calibration)
        bad = [d for d in self.dims if not 0 <= d < hidden]
        if bad:
            raise ValueError(f"var sink_dims {bad} are outside the hidden size {hidden}")
        self.route = route
        self.prefill = False
        self.visual = None  # bool [B, n0]: visual tokens of the prefill sequence
        self.rows_from = None  # [B]: first prefill position whose row is intervened
        self.sinks = {}  # layer -> bool [B, n0]
        self.changed = {}  # layer -> (row, head) pairs redistributed in the last call

    def install(self) -> list:
        handles = [self.layers[j].register_forward_pre_hook(functools.partial(self._detect, j), with_kwargs=True)
                   for j in self.layer_ids]
        for j in self.layer_ids:
            self.route.modify(j, functools.partial(self._redistribute, j))
        return handles

    # ------------------------------------------------------------------ per call
    def begin_call(self, call):
        visual, fresh = call.visual, call.fresh
        self.prefill = fresh
        self.changed = {}
        if not fresh:
            return
        self.sinks = {}
        if visual is None or not bool(visual.any()):
            self.visual = None
            return
        self.visual = visual.bool()
        n0 = visual.shape[1]
        pos = torch.arange(n0, device=visual.device).expand_as(visual)
        last = torch.where(visual, pos, torch.full_like(pos, -1)).amax(1)
        self.rows_from = torch.where(last >= 0, last + 1, torch.full_like(last, 1 << 30))

    def _detect(self, layer, module, args, kwargs):
        if not self.prefill or self.visual is None or self.method.moved == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        phi = rms_ratio(hidden, self.dims).amax(-1)
        self.sinks[layer] = (phi > self.method.tau).to(self.visual.device)
        return None

    # ------------------------------------------------------------------ attention
    def _redistribute(self, layer, module, query, key, value, mask, kwargs, output):
        sinks = self.sinks.get(layer)
        if sinks is None or self.visual is None:
            return output
        b, h, q, d = query.shape
        kv = key.shape[2]
        n0 = sinks.shape[1]
        if kv < n0:  # not this sequence (should not happen)
            return output
        device = query.device
        pad = torch.zeros(b, kv - n0, dtype=torch.bool, device=device)
        sink = torch.cat([sinks.to(device), pad], 1)
        vis = torch.cat([self.visual.to(device), pad], 1)
        vis_sink = sink & vis
        positions = torch.arange(q, device=device) + (kv - q)
        rows = (positions[None, :] >= self.rows_from.to(device)[:, None]) & vis_sink.any(1)[:, None]
        if not bool(rows.any()):
            return output
        attn_out = output[0] if isinstance(output, tuple) else output
        attn_out = attn_out.clone()
        groups = h // key.shape[1]
        scaling = kwargs.get("scaling") or d ** -0.5
        method = self.method
        changed = 0
        for bi in rows.any(1).nonzero().squeeze(1).tolist():
            r = rows[bi].nonzero().squeeze(1)
            k = key[bi].repeat_interleave(groups, 0).float()  # [H, kv, d]
            v = value[bi].repeat_interleave(groups, 0).float()
            logits = query[bi][:, r].float() @ k.transpose(-1, -2) * scaling  # [H, R, kv]
            allowed = allowed_keys(mask, q, kv, device)
            allowed = allowed[bi if allowed.shape[0] > 1 else 0][:, r]  # [1|H, R, kv]
            probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1)
            v_mask, s_mask, vs_mask = vis[bi], sink[bi], vis_sink[bi]
            plain = v_mask & ~s_mask
            mass_v = probs[..., v_mask].sum(-1)
            share_plain = probs[..., plain].sum(-1)
            centric = (mass_v >= method.summ) & (share_plain >= method.rho * mass_v) & (share_plain > 0)
            if not bool(centric.any()) or not bool(vs_mask.any()):
                continue
            budget = method.moved * probs[..., s_mask].sum(-1, keepdim=True)
            new = probs.clone()
            new[..., s_mask] = probs[..., s_mask] * (1 - method.moved)
            new[..., plain] = probs[..., plain] + budget * probs[..., plain] / share_plain.clamp_min(1e-12)[..., None]
            out = (new @ v).transpose(0, 1).to(attn_out.dtype)  # [R, H, d]
            keep = centric.transpose(0, 1)[..., None]  # [R, H, 1]
            attn_out[bi, r] = torch.where(keep, out, attn_out[bi, r])
            changed += int(centric.sum())
        self.changed[layer] = self.changed.get(layer, 0) + changed
        return (attn_out, *output[1:]) if isinstance(output, tuple) else attn_out

    def stats(self) -> dict:
        return {"var": {"method": "var", "sink_dims": self.dims, "source": self.source,
                "sinks_per_layer": {j: s.sum(1).tolist() for j, s in self.sinks.items()},
                "visual_sinks_per_layer": {j: (s & self.visual.to(s.device)).sum(1).tolist()
                                           for j, s in self.sinks.items()} if self.visual is not None else {},
                "row_heads_changed_last_call": dict(self.changed)}}



@torch.no_grad()
def calibrate(model, processor, images, prompt="Describe the image.", top=2, tau=20.0, progress=True):
    """Find the massive-activation dimensions of ``model``'s language model from a few images.

    For every image, the prefill's residual-stream input to layers 2 .. L-1 (``output_hidden_states``)
    is RMS-normalised; a channel scores one hit per (layer, token) where it is the token's largest
    ``|x_d / RMS(x)|`` and exceeds ``tau``. The ``top`` channels with most hits are the sink
    dimensions; without any hit, the ``top`` channels with the largest values are returned and
    ``hits`` is empty (VAR will then find no sinks at this ``tau``). Returns a JSON-able dict.
    """
    from tqdm.auto import tqdm

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    device = next(model.parameters()).device
    hits, peak = {}, None
    layers = None
    for image in tqdm(images, desc="calibrate var", disable=not progress):
        inputs = processor(images=[image], text=[text], return_tensors="pt").to(device)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
        n = len(hidden) - 1
        layers = default_layers(n) if layers is None else layers
        for j in layers:
            ratio = rms_ratio(hidden[j][0])  # [T, D]
            values, channels = ratio.max(-1)
            for c in channels[values > tau].tolist():
                hits[c] = hits.get(c, 0) + 1
            layer_peak = ratio.amax(0)
            peak = layer_peak if peak is None else torch.maximum(peak, layer_peak)
    if hits:
        dims = sorted(hits, key=lambda c: -hits[c])[:top]
    else:
        dims = peak.topk(top).indices.tolist()
    return {"sink_dims": [int(d) for d in dims], "tau": tau, "hits": {str(k): v for k, v in sorted(hits.items())},
            "peak": {str(int(c)): round(float(peak[c]), 3) for c in peak.topk(min(8, peak.numel())).indices},
            "layers": layers, "images": len(images), "model": getattr(model.config, "_name_or_path", "")}
