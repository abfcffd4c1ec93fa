"""Videos (Qwen2/2.5/3-VL, LLaVA-NeXT-Video) against references that do not use vtprune: keep-all ≡ the
stock model; a pre-LLM cut ≡ the stock model with the dropped video tokens masked out (positions as the
stock model numbers them: Qwen's (t, h, w), Qwen3-VL's timestamps untouched); an in-LLM exit ≡ the stock
model with them masked from layer K on.  Batch 1 without a mask, and batch 2 left padded mixing an image
and videos; ``generate`` with the cache.  The temporal methods against their definitions (and, in
tests/serving, against vLLM's own).
"""

import math

import pytest
import torch
from reference import LayerMasked, drop_mask, generated, greedy_model, masked_forward, masked_greedy, video_counts

import vtprune
from vtprune.budget import tokens_to_keep
from vtprune.testing import IMAGE_TOKEN, VIDEO_FAMILIES, VIDEO_TOKEN, tiny_inputs, tiny_model

ATOL = 1e-5
# (images per row, videos per row, pass an attention mask)
LAYOUTS = [((0,), (1,), False), ((1, 0), (1, 2), True)]


def _inputs(model, family, images, videos, with_mask, **kw):
    return tiny_inputs(model, family, images_per_row=images, videos_per_row=videos, with_mask=with_mask, **kw)


def _clip(family, frames):
    """(video spec, tokens per frame) of a clip of ``frames`` temporal slices: Qwen 2 x 3 tokens each,
    LLaVA-NeXT-Video and LLaVA-OneVision 2 x 2 (the latter and a newline)."""
    return (frames, 4) if family in ("llava_next_video", "llava_onevision") else ((frames, 4, 6), 6)


def _and_newline(family, kept, t, n):
    """``kept`` (indices into a clip of ``t`` slices of ``n`` tokens) and, for LLaVA-OneVision, the newline after
    the last slice, kept when its row (the last slice's last 2 tokens) keeps a token."""
    if family != "llava_onevision":
        return kept
    return kept + [t * n] if {t * n - 2, t * n - 1} & set(kept) else kept


def _newlines_out(family, clip) -> int:
    """The clip's kept newline tokens (stats count them in the clip, not in any frame)."""
    return clip["tokens_out"] - sum(f["tokens_out"] for f in clip["frames"]) if family == "llava_onevision" else 0


def _clip_features(model, inputs, stacked=False):
    """The stock model's features of the first clip (``get_video_features``); ``stacked``: with Qwen3-VL's
    deepstack features side by side, as vLLM's ``evs`` and ``vidcom2`` score a clip there."""
    with torch.no_grad():
        extra = (inputs["video_grid_thw"],) if "video_grid_thw" in inputs else ()
        if "video_position_ids" in inputs:  # Gemma 4 (before transformers 5.19 without the frame counts)
            extra = (inputs["video_position_ids"],) + ((inputs["num_frames_per_video"],)
                                                       if "num_frames_per_video" in inputs else ())
        out = model.model.get_video_features(inputs["pixel_values_videos"], *extra)
    clip = out.pooler_output[0].flatten(0, -2)  # transformers < 5.23: LLaVA-NeXT-Video's [frames, n, D]
    layers = getattr(out, "deepstack_features", None) if stacked else None
    return torch.cat([clip] + [layer[0] for layer in layers], -1) if layers else clip


def _repeat_slice(inputs, src, dst):
    """Make temporal slice ``dst`` of the first clip repeat slice ``src`` (each slice is encoded on its own)."""
    pixels = inputs["pixel_values_videos"]
    if pixels.dim() == 5:
        pixels[:, dst] = pixels[:, src]
    elif "video_position_ids" in inputs:  # Gemma 4: a frame a row (before 5.19: [clips, frames, ...])
        if pixels.dim() == 4:
            pixels[:, dst] = pixels[:, src]
        else:
            pixels[dst] = pixels[src]
    else:
        n = int(inputs["video_grid_thw"][0, 1:].prod())
        pixels[dst * n:(dst + 1) * n] = pixels[src * n:(src + 1) * n]


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("images,videos,with_mask", LAYOUTS)
def test_keep_all_is_stock(family, images, videos, with_mask):
    model = greedy_model(family)
    inputs = _inputs(model, family, images, videos, with_mask)
    stock_logits, stock_tokens = _logits(model, inputs), generated(model, inputs)
    with vtprune.wrapped(model, "random", keep=1.0):
        logits, tokens = _logits(model, inputs), generated(model, inputs)
        stats = vtprune.stats(model)
    torch.testing.assert_close(logits, stock_logits, atol=ATOL, rtol=0)
    assert torch.equal(tokens, stock_tokens)
    clips = [v for s in stats["samples"] for v in s.get("videos", [])]
    assert len(clips) == sum(videos) and all(v["tokens_out"] == v["tokens_in"] for v in clips)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("images,videos,with_mask", LAYOUTS)
@pytest.mark.parametrize("method,options", [("random", dict(keep=0.5)), ("uniform", dict(keep=0.25, scope="frame")),
                                            ("fastervlm", dict(keep=0.25, scope="clip")), ("divprune", dict(keep=3)),
                                            ("evs", dict(keep=0.5)), ("vidcom2", dict(keep=0.25)),
                                            ("uniform_time", dict(keep=0.5)), ("dycoke", dict(keep=0.3))])
def test_pruning_equals_masked_reference(family, images, videos, with_mask, method, options):
    model = greedy_model(family)
    inputs = _inputs(model, family, images, videos, with_mask)
    counts = video_counts(model, inputs)
    vtprune.wrap(model, method, **options)
    logits = _logits(model, inputs)
    kept_forward = vtprune.last_kept(model)
    stats = vtprune.stats(model)
    tokens = generated(model, inputs)
    kept_generate = vtprune.last_kept(model)
    vtprune.unwrap(model)

    assert stats["llm_sequence_out"] < stats["llm_sequence_in"]
    assert all(v["tokens_out"] < v["tokens_in"] for s in stats["samples"] for v in s["videos"])
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept_forward, counts))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    ref_tokens = masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept_generate, counts))
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_cut_takes_only_video_tokens(family):
    """Everything but the dropped video tokens reaches the LLM (Qwen3-VL's timestamps and every frame's
    start/end included), in order."""
    model = tiny_model(family)
    inputs = _inputs(model, family, (0,), (1,), False)
    with vtprune.wrapped(model, "random", keep=0.25, seed=1):
        _logits(model, inputs)
        index, real = vtprune.record(model).cut
    ids = inputs["input_ids"][0]
    reached = ids[index[0][real[0]]]
    assert torch.equal(reached[reached != VIDEO_TOKEN], ids[ids != VIDEO_TOKEN])
    assert int((reached == VIDEO_TOKEN).sum()) == tokens_to_keep(0.25, int((ids == VIDEO_TOKEN).sum()))


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("keep", [0.5, 2])
def test_scope_frame_gives_every_frame_its_share_and_clip_one_budget(family, keep):
    model = tiny_model(family)
    spec, n = _clip(family, 4)
    inputs = _inputs(model, family, (0,), (1,), False, video_specs=[spec])
    with vtprune.wrapped(model, "fastervlm", keep=keep, scope="frame"):
        _logits(model, inputs)
        (clip,) = vtprune.stats(model)["samples"][0]["videos"]
    assert [f["tokens_in"] for f in clip["frames"]] == [n] * 4
    assert [f["tokens_out"] for f in clip["frames"]] == [tokens_to_keep(keep, n)] * 4
    for scope in ("clip", "image"):  # one budget over the clip's tokens, wherever they score best
        with vtprune.wrapped(model, "fastervlm", keep=keep, scope=scope):
            _logits(model, inputs)
            (clip,) = vtprune.stats(model)["samples"][0]["videos"]
        content = clip["tokens_out"] - _newlines_out(family, clip)
        assert content == sum(f["tokens_out"] for f in clip["frames"]) == tokens_to_keep(keep, 4 * n)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("method", ["fastervlm", "divprune", "vispruner"])
def test_a_clip_is_selected_as_the_same_pixels_given_as_an_image(family, method):
    """The tower encodes a clip and an image of the same (t, h, w) grid alike: its scores, its features,
    and so the selection, are the image's."""
    model = tiny_model(family)
    image = tiny_inputs(model, family, image_specs=[(4, 6)])
    grid = torch.tensor([[2, 4, 6]])
    dim = image["pixel_values"].shape[1]
    pixels = torch.randn(48, dim, generator=torch.Generator().manual_seed(5))
    ids = image["input_ids"]
    image_run = ids == IMAGE_TOKEN
    ids = torch.cat([ids[:, :int(image_run.nonzero()[0, 1])], torch.full((1, 12), IMAGE_TOKEN),
                     ids[:, int(image_run.nonzero()[-1, 1]) + 1:]], 1)
    as_image = {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid, "mm_token_type_ids": (ids == IMAGE_TOKEN).int()}
    vids = ids.masked_fill(ids == IMAGE_TOKEN, VIDEO_TOKEN)
    as_video = {"input_ids": vids, "pixel_values_videos": pixels, "video_grid_thw": grid,
                "mm_token_type_ids": 2 * (vids == VIDEO_TOKEN).int()}
    kept = []
    for inputs in (as_image, as_video):
        with vtprune.wrapped(model, method, keep=0.25):
            _logits(model, inputs)
            kept.append(vtprune.last_kept(model)[0][0])
            layouts = vtprune.record(model).layouts[0]
        assert layouts[0].media == ("image" if inputs is as_image else "video")
    assert torch.equal(kept[0], kept[1]) and kept[0].numel() == 3


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_fastv_over_video_tokens_equals_layer_masked_reference(family):
    model = greedy_model(family)
    inputs = _inputs(model, family, (1, 0), (1, 1), True)
    vtprune.wrap(model, "fastv", layer=1, keep=0.25)
    with torch.no_grad():
        logits = model(**inputs).logits
        drop = vtprune.record(model).exit.drop.clone()
        tokens = generated(model, inputs)
        drop_gen = vtprune.record(model).exit.drop.clone()
    vtprune.unwrap(model)
    visual = (inputs["input_ids"] == IMAGE_TOKEN) | (inputs["input_ids"] == VIDEO_TOKEN)
    assert bool((drop <= visual).all()) and bool((drop & (inputs["input_ids"] == VIDEO_TOKEN)).any())
    none = torch.zeros_like(drop)
    with LayerMasked(model, 1, drop):
        ref = masked_forward(model, inputs, none)
    with LayerMasked(model, 1, drop_gen):
        ref_tokens = masked_greedy(model, inputs, none)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    assert torch.equal(tokens, ref_tokens)


def test_summary_tokens_per_frame_and_per_clip():
    """Summary tokens stand for a clip's dropped tokens across its frames (``scope="clip"``), or each
    frame's (``scope="frame"``); they count in ``tokens_out``."""
    model = tiny_model("qwen2_5_vl")
    inputs = _inputs(model, "qwen2_5_vl", (0,), (1,), False, video_specs=[(4, 4, 6)])
    for scope, summaries in (("clip", 2), ("frame", 4 * 2)):
        with vtprune.wrapped(model, "random", keep=0.5, summary=2, scope=scope):
            _logits(model, inputs)
            (clip,) = vtprune.stats(model)["samples"][0]["videos"]
        assert clip["summary_tokens"] == summaries
        assert clip["tokens_out"] == tokens_to_keep(0.5, 24)


def _evs_reference(features, t, n, keep):
    """EVS from its definition, with loops: 255 for the first slice, 1 - cos with the same cell of the
    previous slice after; the max(n, int(t n keep)) best, ties to the earlier token."""
    scores = []
    for i in range(t * n):
        f, cell = divmod(i, n)
        if f == 0:
            scores.append((255.0, -i))
        else:
            a, b = features[i].double(), features[(f - 1) * n + cell].double()
            scores.append((1 - float(a @ b / (a.norm() * b.norm()).clamp(min=1e-8)), -i))
    count = max(n, int(t * n * keep))
    return sorted(-i for _, i in sorted(scores, reverse=True)[:count])


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_evs_keeps_the_tokens_that_changed_since_the_previous_frame(family, keep):
    """evs equals its definition on the stock model's own clip features (``get_video_features``): the first
    frame whole, a repeated frame's tokens last; a still image stays whole.  vLLM's EVS keeps the same
    tokens (tests/serving/test_video_pruners.py)."""
    model = tiny_model(family)
    spec, n = _clip(family, 4)
    inputs = _inputs(model, family, (1,), (1,), False, video_specs=[spec])
    _repeat_slice(inputs, 1, 2)
    features = _clip_features(model, inputs, stacked=True)
    if family == "qwen3_vl" and keep == 0.5:  # scored with the deepstack features, which change the choice here
        assert _evs_reference(_clip_features(model, inputs), 4, n, keep) != _evs_reference(features, 4, n, keep)
    features = features[:4 * n]  # LLaVA-OneVision: the newline after the clip is not scored
    with vtprune.wrapped(model, "evs", keep=keep):
        _logits(model, inputs)
        image_kept, clip_kept = vtprune.last_kept(model)[0]
        image, = vtprune.stats(model)["samples"][0]["images"]
        (clip,) = vtprune.stats(model)["samples"][0]["videos"]
    assert image["tokens_out"] == image["tokens_in"]  # one slice: whole
    assert clip_kept.tolist() == _and_newline(family, _evs_reference(features, 4, n, keep), 4, n)
    assert clip["frames"][0]["tokens_out"] == n and clip["frames"][2]["tokens_out"] == 0  # the repeat goes first


@pytest.mark.parametrize("method", ["evs", "vidcom2", "uniform_time"])
def test_temporal_methods_share_one_budget_per_clip(method):
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="scope='clip'"):
        vtprune.wrap(model, method, keep=0.5, scope="frame")
    assert not vtprune.is_wrapped(model)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("keep,frames", [(0.5, [0, 2, 4]), (0.4, [0, 4]), (0.2, [0]), (0.01, [0]), (12, [0, 4])])
def test_uniform_time_keeps_whole_frames_evenly_spaced(family, keep, frames):
    """The temporal control: floor(T keep + 1/2) whole frames, first and last included (int keep: keep // n)."""
    model = tiny_model(family)
    spec, n = _clip(family, 5)
    if isinstance(keep, int):
        keep = keep * n // 6  # two frames' worth
    inputs = _inputs(model, family, (1,), (1,), False, video_specs=[spec])
    with vtprune.wrapped(model, "uniform_time", keep=keep):
        _logits(model, inputs)
        image, = vtprune.stats(model)["samples"][0]["images"]
        (clip,) = vtprune.stats(model)["samples"][0]["videos"]
    assert image["tokens_out"] == image["tokens_in"]
    assert [f for f, frame in enumerate(clip["frames"]) if frame["tokens_out"]] == frames
    assert all(frame["tokens_out"] in (0, n) for frame in clip["frames"])


def _vidcom2_reference(features, t, n, keep):
    """VidCom2 from its definition (float64, loops): redundancy on the low-variance half of the channels,
    per-frame shares by a softmax of frame uniqueness, the exact count by redundancy."""
    x = features.double()
    dim = x.shape[1]
    var = [float(((x[:, c] - x[:, c].mean()) ** 2).mean()) for c in range(dim)]
    low = sorted(range(dim), key=lambda c: var[c])[:max(1, dim // 2)]
    x = x[:, low]
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    clip_mean = x.mean(0)
    gauss = lambda a, b: sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s)) for s in (1 / 8, 1 / 4, 1 / 2, 1, 2))
    v = [gauss(x[i], clip_mean) for i in range(t * n)]
    red = [v[i] + gauss(x[i], x[i // n * n:(i // n + 1) * n].mean(0)) for i in range(t * n)]
    unique = [-sum(v[f * n:(f + 1) * n]) / n for f in range(t)]
    e = [math.exp((u - max(unique)) / 0.01) for u in unique]
    p = [a / sum(e) for a in e]
    kept = set()
    for f in range(t):
        k = min(n, max(1, round(min(1.0, keep * (1 + p[f] - sum(p) / t)) * n)))
        kept |= set(sorted(range(f * n, (f + 1) * n), key=lambda i: red[i])[:k])
    target = max(t, int(t * n * keep))
    while len(kept) > target:
        kept.remove(max(kept, key=lambda i: red[i]))
    while len(kept) < target:
        kept.add(min(set(range(t * n)) - kept, key=lambda i: red[i]))
    return sorted(kept)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_vidcom2_equals_its_definition_on_the_stock_features(family, keep):
    """On the stock model's own clip features; vLLM's VidCom2 keeps the same tokens
    (tests/serving/test_video_pruners.py).  In float64, as the reference: a softmax at temperature 0.01 turns
    float32 rounding into a different share now and then (vLLM's in float32 agrees with vtprune's in float32)."""
    model = tiny_model(family, dtype=torch.float64)
    spec, n = _clip(family, 6)
    inputs = _inputs(model, family, (0,), (1,), False, video_specs=[spec])
    features = _clip_features(model, inputs, stacked=True)
    with vtprune.wrapped(model, "vidcom2", keep=keep):
        _logits(model, inputs)
        (kept,) = vtprune.last_kept(model)[0]
        (clip,) = vtprune.stats(model)["samples"][0]["videos"]
    assert kept.tolist() == _and_newline(family, _vidcom2_reference(features[:6 * n], 6, n, keep), 6, n)
    assert clip["tokens_out"] - _newlines_out(family, clip) == max(6, int(6 * n * keep)) and all(f["tokens_out"] >= 0 for f in clip["frames"])


def test_fastervlm_on_llava_next_video_clips_equals_the_eager_cls_row():
    """A clip's token scores are the eager tower's [CLS] row (heads averaged, the layer the projector reads)
    of its frame, summed over the 2 x 2 patches its pooling window covers."""
    model = tiny_model("llava_next_video")
    eager = tiny_model("llava_next_video", attn_implementation="eager")
    inputs = _inputs(model, "llava_next_video", (0,), (1,), False)
    frames = inputs["pixel_values_videos"][0]
    with torch.no_grad():
        cls = eager.model.vision_tower(pixel_values=frames, output_attentions=True).attentions[-2][:, :, 0, 1:].mean(1)
    side = int(cls.shape[1] ** 0.5)
    ref = cls.view(-1, side // 2, 2, side // 2, 2).sum((2, 4)).reshape(-1)  # frame-major, raster pooled grid
    with vtprune.wrapped(model, "fastervlm", keep=0.25):
        _logits(model, inputs)
        ours = vtprune.record(model).scores[0]
        (kept,) = vtprune.last_kept(model)[0]
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert kept.tolist() == sorted(torch.sort(ref, descending=True, stable=True).indices[:3].tolist())


def test_visionzip_on_llava_next_video_images_and_a_clear_error_on_clips():
    model = tiny_model("llava_next_video")
    image = _inputs(model, "llava_next_video", (1,), (0,), False)
    clip = _inputs(model, "llava_next_video", (0,), (1,), False)
    with torch.no_grad():
        stock = model(**clip).logits
    with vtprune.wrapped(model, "visionzip", keep=0.5):
        _logits(model, image)
        assert vtprune.stats(model)["visual_tokens_out"] < vtprune.stats(model)["visual_tokens_in"]
        with pytest.raises(vtprune.NotApplicable, match="pools a clip's frames"):
            _logits(model, clip)
    assert torch.equal(_logits(model, clip), stock)


def test_frames_to_inputs_without_torchvision():
    """``vtprune.video_inputs.qwen_video`` turns uint8 frames into what Qwen2VLVideoProcessor gives (checked
    against the processor in tests/serving/test_video_inputs.py): sides picked by smart_resize, a clip padded
    to whole temporal patches, rows in the merger's order; the model runs and prunes on it."""
    from vtprune.video_inputs import qwen_video, smart_resize, smart_resize_clip

    assert smart_resize_clip(8, 1080, 1920, 2, 32, 128 * 32 * 32, 32 * 32 * 768) == (224, 416)  # Qwen3: t h w bounded
    assert smart_resize(224, 308, 28, 128 * 28 * 28, 28 * 28 * 768) == (280, 392)  # too small: enlarged
    assert smart_resize(1080, 1920, 28, 128 * 28 * 28, 28 * 28 * 768) == (560, 1008)  # too large: shrunk
    assert smart_resize(448, 448, 28, 128 * 28 * 28, 28 * 28 * 768) == (448, 448)
    frames = torch.randint(0, 256, (5, 3, 56, 84), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    clip = qwen_video(frames, min_pixels=28 * 28, max_pixels=56 * 84)  # 56 x 84 fits: no resize
    assert clip["video_grid_thw"].tolist() == [[3, 4, 6]]  # 5 frames padded to 6: 3 temporal patches
    rows = clip["pixel_values_videos"].view(3, 2, 3, 2, 2, 3, 2, 14, 14)  # t, h/2, w/2, mh, mw, c, tp, ph, pw
    assert torch.equal(rows[2, ..., 1, :, :], rows[2, ..., 0, :, :])  # the last frame repeated
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    cell = (frames[3, :, 14:28, 42:56].float() / 255 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(rows[1, 0, 1, 1, 1, :, 1], cell)  # frame 3: patch row 1, column 3
    model = greedy_model("qwen2_vl")
    inputs = _inputs(model, "qwen2_vl", (0,), (1,), False)
    inputs.update(clip)
    vtprune.wrap(model, "random", keep=0.5)
    logits = _logits(model, inputs)
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept, video_counts(model, inputs)))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)


def test_llava_next_video_clips_read_alike_whichever_shape_transformers_returns():
    """transformers < 5.23 returns a LLaVA-NeXT-Video clip's features frame by frame ([frames, n, D] per clip,
    in a tuple), later releases one row per token ([clips, frames * n, D]): the capture counts and orders the
    tokens the same either way (the floor release, 5.18, failed every clip test before)."""
    from types import SimpleNamespace

    model = tiny_model("llava_next_video")
    adapter = vtprune.patches.adapter_for(model)
    inputs = _inputs(model, "llava_next_video", (0,), (1,), False)
    with torch.no_grad():
        clips = [c.flatten(0, -2) for c in model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output]
    frames = inputs["pixel_values_videos"].shape[1]
    flat = torch.stack(clips)  # the shape of 5.23 on
    per_frame = tuple(clip.unflatten(0, (frames, -1)) for clip in clips)  # the older shape
    new = adapter.capture((inputs["pixel_values_videos"],), {}, SimpleNamespace(pooler_output=flat), "video")
    old = adapter.capture((inputs["pixel_values_videos"],), {}, SimpleNamespace(pooler_output=per_frame), "video")
    assert old["counts"] == new["counts"] == [flat.shape[1]] * flat.shape[0]
    assert all(torch.equal(a, b) for a, b in zip(old["features"], new["features"]))
