"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3.5 (dense and MoE) in vLLM with vtprune's pre-LLM selection, positions as
EVS (vLLM's video pruning) keeps them.

The processor emits the kept number of image placeholders (``kept_count`` on the image's merged-token
grid); the multimodal embedding returns the kept rows with four extra channels, the kept tokens'
mrope (t, h, w) offsets within the image and the image's position extent (EVS's row layout), which vLLM's model
runner hands back for the positions (``recompute_mrope_positions``, enabled by the plugin): kept tokens keep their
original (t, h, w) positions and the text after the image keeps its unpruned positions — the HF
wrap's default, ``positions="original"``.  The prompt is numbered with every media restored to its whole grid
(``restored_media``) and each media's rows are put where the media sits in the prompt (``vtprune.serving.mrope``),
not where EVS's rewrite guesses from the start tokens around a prefill chunk.
Qwen3-VL's deepstack features ride in the same rows and are cut with them; the method scores the main
features, as on the HF path.  [CLS] methods read the attention each patch receives (``tap_qwen``: no
[CLS] in these towers; ``source="received"``, the HF path's default here).  Videos: on the Qwen3-VL family
through vLLM's own pruned-clip path (``vtprune.serving.qwen_video``; its rows carry Qwen3-VL's five channels);
on Qwen2-VL and Qwen2.5-VL, whose clip is one block of tokens, through vtprune's own rows (``clip_positions``:
kept tokens at vLLM's unpruned numbering of the clip, not EVS's, which truncates Qwen2.5-VL's seconds per
temporal slice).  An image's position channels travel in the rows' dtype, as EVS's do (exact in bf16 up to 256
merged tokens a side); a clip's split in two base-256 digits each, so long clips stay exact in bf16 too.  Qwen3.5's linear-attention
layers read only the kept tokens in vLLM as on the HF path (its reference there is the stock model fed the kept
tokens); vLLM's CPU build runs them in bf16 only.  GLM-4.1V shares this binding (``vtprune.serving.glm4v``).
"""

from __future__ import annotations

import functools

import torch

from ..families.qwen_vl import QWEN2_5_VL, QWEN2_VL, QWEN3_5, QWEN3_5_MOE, QWEN3_VL, QWEN3_VL_MOE, merged_sources
from .slot_bias import Weighing
from . import mrope, qwen_video
from .bindings import bind
from .request_keep import budgeted
from .rows import attach, keep_rows, kept_count, layout_of, with_bias


def image_positions(t: int, h: int, w: int, kept: torch.Tensor) -> torch.Tensor:
    """[k, 4]: the kept tokens' (t, h, w) offsets on an image's ``t`` x ``h`` x ``w`` merged-token grid (row
    major), and in the last channel where the text after the image continues (its largest offset + 1)."""
    return grid_positions(t, h, w, 1.0, kept)


def clip_positions(t: int, h: int, w: int, step: float, kept: torch.Tensor) -> torch.Tensor:
    """[k, 8]: ``grid_positions`` of a clip's kept tokens, each channel as two base-256 digits (``digits``)."""
    return digits(grid_positions(t, h, w, step, kept))


def grid_positions(t: int, h: int, w: int, step: float, kept: torch.Tensor) -> torch.Tensor:
    """[k, 4]: the kept tokens' (t, h, w) offsets on ``t`` temporal slices of ``h`` x ``w`` merged tokens (row major)
    as vLLM numbers unpruned media (slice ``i`` at ``int(i * step)``, ``step`` a clip's seconds per slice times the
    tower's tokens per second, in float64 as vLLM's numpy), and in the last channel where the text after them
    continues (the largest offset + 1)."""
    index = torch.arange(t * h * w)
    times = (torch.arange(t, dtype=torch.float64) * step).long()
    thw = torch.stack([times[index // (h * w)], index // w % h, index % w], 1)[kept]
    extent = torch.full((thw.shape[0], 1), max(int(times[-1]), h - 1, w - 1) + 1)
    return torch.cat([thw, extent], 1)


def digits(positions: torch.Tensor) -> torch.Tensor:
    """[k, 2c]: each of the ``c`` channels of ``positions`` [k, c] as its base-256 digits (high, low): each below
    256, so exact in bf16 as the rows' dtype (``undigits`` reads them back)."""
    if positions.numel() and int(positions.max()) >= 256 ** 2:
        raise ValueError(f"a clip position of {int(positions.max())} is past what vtprune's rows carry (65535)")
    return torch.stack([positions // 256, positions % 256], 2).flatten(1)


def undigits(channels: torch.Tensor) -> torch.Tensor:
    """[2c, k] base-256 digit channels (``digits``, transposed) -> [c, k]."""
    return channels[0::2] * 256 + channels[1::2]


def tap_qwen(model, config):
    """Hook the vision blocks of vLLM's Qwen (or GLM-4.1V) ``model`` for a [CLS] method: no [CLS] there, so the score
    is the attention each patch receives (``source="received"``, as on the HF path), from the queries and keys the
    block's attention reads (rotary applied) and its ``cu_seqlens`` segments (images or windows)."""
    from .tower import TowerTap

    blocks = model.visual.blocks
    tap = TowerTap(config, len(blocks), len(blocks) - 1, default_score=QWEN2_VL.default_score)
    if tap.kind != "received":
        raise ValueError(f"{config.name}: this vision tower has no [CLS] token; it reads the attention each patch "
                         "receives instead (source='received', the default here)")
    if getattr(model, "use_data_parallel", False):
        raise ValueError(f"{config.name} reads the vision tower's attention over each image; vLLM shards the tower's "
                         "images over ranks here (mm_encoder_tp_mode='data'): serve it without")
    for layer in tap.layers:
        attn = blocks[layer].attn
        if getattr(attn, "tp_size", 1) != 1:
            raise ValueError(f"{config.name} averages the tower's attention over all heads; vLLM splits them over "
                             "tensor-parallel ranks here: serve it with tensor_parallel_size=1")

        def on_attention(module, args, kwargs, layer=layer):
            q, k = kwargs["query"], kwargs["key"]
            tap.on_segments(layer, q.reshape(-1, *q.shape[-2:]), k.reshape(-1, *k.shape[-2:]),
                            kwargs["cu_seqlens"].tolist(), module.scale)

        attn.attn.register_forward_pre_hook(on_attention, with_kwargs=True)
    return tap


def token_sources(model, grids) -> list:
    """Per image of ``grids`` ([(t, h, w)] in patches, one tower call), [merged tokens, m^2]: the tower tokens
    each LLM token merges — Qwen2.5-VL's windowed tower orders a window's groups together
    (``get_window_index_thw``: tower group -> raster token), the others keep the raster order."""
    visual = model.visual
    merge = visual.spatial_merge_size
    out, offset = [], 0
    for t, h, w in grids:
        if hasattr(visual, "get_window_index_thw"):
            order = torch.argsort(visual.get_window_index_thw(t, h, w)[0])
        else:
            order = torch.arange(t * h * w // merge ** 2)
        out.append(merged_sources(offset + order, merge))
        offset += order.numel()
    return out


CLASSES = {  # model type -> vLLM module, the prefix of its model and info classes, that of its processor's
    "qwen2_vl": ("vllm.model_executor.models.qwen2_vl", "Qwen2VL", "Qwen2VL"),
    "qwen2_5_vl": ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VL", "Qwen2_5_VL"),
    "qwen3_vl": ("vllm.model_executor.models.qwen3_vl", "Qwen3VL", "Qwen3VL"),
    "qwen3_vl_moe": ("vllm.model_executor.models.qwen3_vl_moe", "Qwen3VLMoe", "Qwen3VL"),  # Qwen3-VL's processor
    "qwen3_5": ("vllm.model_executor.models.qwen3_5", "Qwen3_5", "Qwen3VL"),  # (vLLM's CPU build: bf16 only)
    "qwen3_5_moe": ("vllm.model_executor.models.qwen3_5", "Qwen3_5Moe", "Qwen3VL"),
    "glm4v": ("vllm.model_executor.models.glm4_1v", "Glm4v", "Glm4v"),  # (vtprune.serving.glm4v)
}


VIDEO_TYPES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")  # videos through vLLM's EVS path (qwen_video)
BLOCK_VIDEO_TYPES = ("qwen2_vl", "qwen2_5_vl")  # a clip as one block of tokens: vtprune's own rows (clip_positions)


def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
    """vLLM's rewrite of a prefill chunk's media positions (``recompute_mrope_positions``), by where each media sits in
    the prompt (``vtprune.serving.mrope``): vtprune's image rows carry four position channels (t, h, w and the image's
    extent), vLLM's Qwen3-VL clip rows five (timestamps and each frame's start ride along), vtprune's Qwen2(.5)-VL clip
    rows the four as base-256 digits (eight); the first three are the row's place within its media."""
    width = self.vtprune_width
    rows, channels = [], []
    for mm in multimodal_embeddings:
        k = mm.shape[1] - width
        if k not in (4, 5, 8):
            raise RuntimeError(f"vtprune: a media embedding of width {mm.shape[1]} for features of width {width}")
        rows.append(mm[:, :-k])
        channel = mm[:, -k:].permute(1, 0).long()
        channels.append(undigits(channel) if k == 8 else channel)
    with _sync_allowed():
        positions, delta = mrope.place(self, input_ids, channels, mrope_positions, num_computed_tokens)
    return rows, positions, delta


def restored_media(hf, input_tokens: list, mm_features, clips: str | None = None) -> tuple:
    """``(tokens, features, index)``: ``input_tokens`` with each image's run of placeholders filled up to its whole
    grid (and each clip's: ``clips="block"``, Qwen2(.5)-VL's one run; ``"frames"``, the Qwen3-VL family's run per
    frame, which EVS's processor lumps into the first), its ``mm_features`` placed on them, and where each of the
    prompt's own tokens is among them (a Qwen3-VL clip's kept tokens: at their frame's start token; the rewrite
    numbers them)."""
    import dataclasses

    merge = hf.vision_config.spatial_merge_size
    tokens, index, features, start = [], [], [], 0
    for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
        where = feature.mm_position
        end = where.offset + where.length
        for token in input_tokens[start:where.offset]:
            index.append(len(tokens))
            tokens.append(token)
        span, own = list(input_tokens[where.offset:end]), list(range(where.length))
        media = feature.modality == "image" or (clips is not None and feature.modality == "video")
        if media:
            t, h, w = (int(v) for v in feature.data[f"{feature.modality}_grid_thw"].data.tolist())
            if feature.modality == "video" and clips == "frames":
                span, own = _frames_restored(hf, span, h * w // merge ** 2)
            else:
                token = hf.image_token_id if feature.modality == "image" else hf.video_token_id
                span += [token] * (t * h * w // merge ** 2 - where.get_num_embeds())
        is_embed = where.is_embed
        if is_embed is not None and len(span) != where.length:
            is_embed = torch.tensor([tok in (hf.image_token_id, hf.video_token_id) for tok in span])
        features.append(dataclasses.replace(feature, mm_position=dataclasses.replace(
            where, offset=len(tokens), length=len(span), is_embed=is_embed)))
        index += [len(tokens) + i for i in own]
        tokens += span
        start = end
    for token in input_tokens[start:]:
        index.append(len(tokens))
        tokens.append(token)
    return tokens, features, index


def _frames_restored(hf, span: list, per_frame: int) -> tuple:
    """A Qwen3-VL clip's placeholder span (each frame's timestamp, start, tokens, end) with each frame's run of tokens
    at ``per_frame`` where it is not (a pruned clip's: EVS's processor lumps the kept ones into the first frame), and
    where each of the span's own tokens is in it (a token of a restored run: at its frame's start)."""
    out, own, i = [], [], 0
    while i < len(span):
        out.append(span[i])
        own.append(len(out) - 1)
        if span[i] != hf.vision_start_token_id:
            i += 1
            continue
        frame_start, j = len(out) - 1, i + 1
        while j < len(span) and span[j] == hf.video_token_id:
            j += 1
        if j - i - 1 == per_frame:  # a whole frame (the unpruned clip vLLM numbers to place the kept tokens)
            own += list(range(len(out), len(out) + per_frame))
        else:
            own += [frame_start] * (j - i - 1)
        out += [hf.video_token_id] * per_frame
        i = j
    return out, own


def _sync_allowed():
    try:
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed
    except ImportError:
        import contextlib

        return contextlib.nullcontext()
    return gpu_sync_allowed()


def pruned_qwen(config, model_type: str):
    """The pruned vLLM class of ``model_type`` (a key of ``CLASSES``)."""
    import importlib

    from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing import PromptReplacement

    module, prefix, processing = CLASSES[model_type]
    module = importlib.import_module(module)
    if model_type in VIDEO_TYPES:
        qwen_video.install()
    Model = getattr(module, f"{prefix}ForConditionalGeneration")
    Processor = getattr(module, f"{processing}MultiModalProcessor")
    Info = getattr(module, f"{prefix}ProcessingInfo")
    Dummy = getattr(module, f"{processing}DummyInputsBuilder")

    class PrunedQwenInfo(Info):
        def get_num_image_tokens(self, *, image_width, image_height, **kwargs) -> int:
            if not kwargs:  # GLM-4.1V's: its processor's pixel budget, not the processor and its options
                kwargs = {"max_image_pixels": self._get_image_max_pixels()}
            size, n = self._get_vision_info(image_width=image_width, image_height=image_height, num_frames=1, **kwargs)
            vision = self.get_hf_config().vision_config
            cell = vision.patch_size * vision.spatial_merge_size
            return kept_count(config, n, (size.height // cell, size.width // cell))

    class PrunedQwenProcessor(Processor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            merge = self.info.get_hf_config().vision_config.spatial_merge_size
            updates = []
            for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
                if update.modality == "image":
                    def replacement(item_idx, full=update.replacement):
                        tokens = full(item_idx)
                        _, h, w = (int(v) for v in out_mm_kwargs["image"][item_idx]["image_grid_thw"].data)
                        return tokens[:kept_count(config, len(tokens), (h // merge, w // merge))]

                    update = PromptReplacement(modality="image", target=update.target, replacement=replacement)
                elif update.modality == "video" and model_type in BLOCK_VIDEO_TYPES:
                    def replacement(item_idx, full=update.replacement):
                        tokens = full(item_idx)
                        t, h, w = (int(v) for v in out_mm_kwargs["video"][item_idx]["video_grid_thw"].data)
                        return tokens[:qwen_video.count(config, (h // merge) * (w // merge), t)]

                    update = PromptReplacement(modality="video", target=update.target, replacement=replacement)
                updates.append(update)
            return updates

    Processor = budgeted(PrunedQwenProcessor, config)  # a request's own keep (vtprune.serving.request_keep)
    @MULTIMODAL_REGISTRY.register_processor(Processor, info=PrunedQwenInfo, dummy_inputs=Dummy)
    class PrunedQwen(Weighing, Model, SupportsMultiModalPruning):
        vtprune_config = config
        recompute_mrope_positions = recompute_mrope_positions

        def get_mrope_input_positions(self, input_tokens, mm_features):
            """vLLM's numbering of the prompt before the rewrite, on the prompt with each image's and clip's
            placeholders restored to its whole grid (``restored_media``), the restored ones then dropped: the text
            after an image or a clip at its unpruned positions, what the rewrite gives too, and what a prefix-cache
            hit past the image keeps (the rewrite does not run there: vLLM's own EVS numbers a Qwen3-VL clip's kept
            tokens lumped into its first frame, and the text after it wrong on such a hit); the kept tokens' own
            positions come with the rewrite."""
            clips = "block" if model_type in BLOCK_VIDEO_TYPES else "frames" if model_type in VIDEO_TYPES else None
            tokens, features, index = restored_media(self.config, list(input_tokens), mm_features, clips)
            positions, _ = super().get_mrope_input_positions(tokens, features)
            positions = positions[:, torch.tensor(index, dtype=torch.long)]
            mrope.record(self, input_tokens, mm_features)  # where the rewrite puts each media's rows
            return positions, int(positions.max()) + 1 - len(input_tokens)

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            attach(self, config)
            if model_type in VIDEO_TYPES and getattr(self, "video_pruning_rate", None) is None:
                # vLLM's Qwen3.5 reads the config's rate itself, not the pruning spec the plugin puts in place
                # (vtprune.serving.plugin), and sets no method: the EVS layout it inherits from Qwen3-VL reads both
                # (EVS's mask, which vtprune's selection stands in for, never reads the rate)
                spec = vllm_config.model_config.get_multimodal_config().get_video_pruning_spec()
                self.video_pruning_method, self.video_pruning_rate = spec
            self.vtprune_tap = tap_qwen(self, config) if config.needs_cls else None
            hf = self.config  # a media row: the features (and deepstack's), the bias column, the position channels
            deepstack = getattr(hf.vision_config, "deepstack_visual_indexes", None) or ()
            self.vtprune_width = hf.get_text_config().hidden_size * (1 + len(deepstack)) + int(config.weighs)

        def embed_multimodal(self, **kwargs):
            out = []
            for modality, given in self._parse_and_validate_multimodal_inputs(**kwargs).items():  # in their order
                if modality in ("image", "images"):  # (Qwen2-VL's keys are plural)
                    out += self._vtprune_images(given)
                elif model_type in VIDEO_TYPES:
                    out += self._vtprune_clips(given)
                elif model_type in BLOCK_VIDEO_TYPES:
                    out += self._vtprune_block_clips(given)
                else:
                    raise ValueError(f"vtprune serving prunes this {model_type} model's images; it was given a video")
            return out

        def _vtprune_clips(self, given):
            """vLLM's own video path (EVS's placeholders and positions) with vtprune's selection (``qwen_video``)."""
            token = qwen_video.MODEL.set(self)
            try:
                return list(self._postprocess_video_embeds_evs(self._process_video_input(given), given))
            finally:
                qwen_video.MODEL.reset(token)

        def _vtprune_block_clips(self, given):
            """Qwen2(.5)-VL: each clip's kept rows by the method (``qwen_video.select``), with their positions as vLLM
            numbers the unpruned clip (``clip_positions``)."""
            merge = self.visual.spatial_merge_size
            per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)  # (vLLM's default too)
            seconds = given.get("second_per_grid_ts")  # Qwen2.5-VL's; a slice a second where none
            out = []
            for i, rows in enumerate(self._process_video_input(given)):
                t, h, w = (int(v) for v in given["video_grid_thw"][i].tolist())
                step = (1.0 if seconds is None else float(seconds[i])) * per_second
                kept = qwen_video.select(self, rows, (t, h, w), merge)
                positions = clip_positions(t, h // merge, w // merge, step, kept.cpu())
                out.append(torch.cat([rows[kept], positions.to(rows.device, rows.dtype)], 1))
            return out

        def _vtprune_images(self, image_input):
            merge = self.visual.spatial_merge_size
            width = getattr(self, "visual_dim", None)  # Qwen3-VL: the deepstack features follow in each row
            tap = self.vtprune_tap
            if tap is not None:
                tap.clear()
            grids = [tuple(int(v) for v in g) for g in image_input["image_grid_thw"].tolist()]
            # the tower runs once on all images, packed in one sequence: each image's tokens' sources in it
            sources = token_sources(self, grids) if tap is not None else None
            out = []
            for i, (rows, (t, h, w)) in enumerate(zip(self._process_image_input(image_input), grids)):
                grid = (h // merge, w // merge)
                layout = layout_of(rows.shape[0], grid if t == 1 else None)
                tower = None
                if tap is not None:
                    layout.source = sources[i]
                    tower = tap.tiles(0, 1, layout)
                kept, main, bias = keep_rows(self, config, rows[:, :width], tower, layout=layout)
                rows = rows[kept.to(rows.device)]
                rows[:, :main.shape[1]] = main
                positions = image_positions(int(t), *grid, kept.cpu()).to(rows.device, rows.dtype)
                out.append(torch.cat([with_bias(rows, bias), positions], 1))  # the bias column before the positions
            return out

    PrunedQwen.__name__ = PrunedQwen.__qualname__ = f"Pruned{prefix}"
    PrunedQwen.vtprune_parts = (PrunedQwenInfo, Processor)  # what serving.needs checks against vLLM
    return PrunedQwen


for _family in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_VL_MOE, QWEN3_5, QWEN3_5_MOE):
    bind(_family, media=("image", "video"))(
        functools.partial(pruned_qwen, model_type=_family.name))
