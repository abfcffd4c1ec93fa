"""``downsample``: each family's realized token count follows its own rounding rule (checked
against the processor's output and, for Qwen, an independent rewrite of its resize rule)."""

import math

import numpy as np
import pytest
from PIL import Image
from processors import processor

import vtprune
from vtprune.budget import tokens_to_keep
from vtprune.testing import tiny_model

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _image(w, h, seed=0):
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def _qwen_tokens(w, h, ip):
    """Qwen2-VL's resize rule, written out: sides to multiples of patch*merge within the pixel range."""
    factor = ip.patch_size * ip.merge_size
    max_pixels, min_pixels = ip.size["longest_edge"], ip.size["shortest_edge"]
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return (hb // factor) * (wb // factor)


def _run(family, keep, images):
    proc = vtprune.downsample(processor(family), keep)
    text = [f"{proc.token} describe this"] * len(images)
    out = proc(images=images, text=text, padding=True, return_tensors="pt")
    return proc, out


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1])
def test_qwen_counts_follow_the_resize_rule(family, keep):
    images = [_image(420, 300), _image(333, 517, seed=1)]
    proc, out = _run(family, keep, images)
    ip = proc.image_processor
    per_row = (out["input_ids"] == proc.token_id).sum(1).tolist()
    merge = ip.merge_size ** 2
    grid = [int(t * h * w) // merge for t, h, w in out["image_grid_thw"].tolist()]
    for info, row, g in zip(proc.last, per_row, grid):
        assert info["tokens_out"] == row == g
        assert info["tokens_in"] == _qwen_tokens(*info["size_in"], ip)
        assert info["tokens_out"] == _qwen_tokens(*info["size_out"], ip)
        target = tokens_to_keep(keep, info["tokens_in"])
        factor = ip.patch_size * ip.merge_size
        one_step = max(info["size_out"]) // factor + 1  # one more row or column of merged patches
        assert abs(info["tokens_out"] - target) <= one_step, (info, target)
        w, h = info["size_in"]
        assert abs(info["size_out"][0] / info["size_out"][1] - w / h) < 0.03  # aspect ratio kept


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1])
def test_internvl_lowers_the_tile_count(keep):
    images = [_image(420, 300)]
    proc, out = _run("internvl", keep, images)
    info = proc.last[0]
    tiles = out["pixel_values"].shape[0]
    assert info["tokens_out"] == tiles * proc.image_seq_length == int((out["input_ids"] == proc.token_id).sum())
    assert info["size_out"] == info["size_in"]
    stock = processor("internvl")(images=images, text=[proc.token], return_tensors="pt")["pixel_values"].shape[0]
    assert info["tokens_in"] == stock * proc.image_seq_length
    # the chosen max_patches is the largest one within budget, or the closest
    target = tokens_to_keep(keep, info["tokens_in"])
    m = info["max_patches"]
    if m is not None and m < 12:
        above = processor("internvl")(images=images, text=[proc.token], max_patches=m + 1,
                                      return_tensors="pt")["pixel_values"].shape[0] * proc.image_seq_length
        assert above > target or abs(above - target) >= abs(info["tokens_out"] - target)


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_llava_next_counts_come_from_its_processor(keep):
    images = [_image(420, 300), _image(120, 260, seed=2)]
    proc, out = _run("llava_next", keep, images)
    per_row = (out["input_ids"] == proc.token_id).sum(1).tolist()
    stock = processor("llava_next")
    for image, info, row in zip(images, proc.last, per_row):
        assert info["tokens_out"] == row <= info["tokens_in"]
        again = stock(images=[image.resize(info["size_out"], Image.BICUBIC)], text=["<image>"], return_tensors="pt")
        assert info["tokens_out"] == int((again["input_ids"] == proc.token_id).sum())
    assert proc.last[0]["tokens_out"] < proc.last[0]["tokens_in"]


def test_keep_all_changes_nothing_and_shapes_of_images_argument():
    proc = vtprune.downsample(processor("qwen2_vl"), 1.0)
    image = _image(200, 150)
    out = proc(images=image, text=f"{proc.token} describe", return_tensors="pt")
    stock = processor("qwen2_vl")(images=image, text=f"{proc.token} describe", return_tensors="pt")
    assert (out["pixel_values"] == stock["pixel_values"]).all() and proc.last[0]["size_out"] == (200, 150)
    proc = vtprune.downsample(processor("qwen2_vl"), 0.25)
    out = proc(images=[[image], [image, image]], text=[f"{proc.token} a", f"{proc.token} {proc.token} b"],
               padding=True, return_tensors="pt")
    assert len(proc.last) == 3 and out["image_grid_thw"].shape[0] == 3
    assert proc.tokenizer is proc.processor.tokenizer  # everything else is the wrapped processor's


def test_errors():
    with pytest.raises(ValueError, match="pool"):
        vtprune.downsample(processor("llava"), 0.25)
    with pytest.raises(ValueError, match="keep"):
        vtprune.downsample(processor("qwen2_vl"), 1.5)
    proc = vtprune.downsample(processor("qwen2_vl"), 0.5)
    with pytest.raises(ValueError, match="already downsampled"):
        vtprune.downsample(proc, 0.5)
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="processor"):
        vtprune.wrap(model, "downsample", keep=0.25)
    with pytest.raises(ValueError, match="processor"):
        vtprune.wrap(model, ["fastervlm", "downsample"], keep=0.25)
    assert not vtprune.is_wrapped(model)
    assert "downsample" in vtprune.methods.available()


def test_sweep_reports_downsample_not_applicable_on_llava(tmp_path):
    from vtprune.eval import sweep

    records = sweep.run(model="toy", tasks=["vtprune_toy"], methods=["downsample", "pool"], keeps=[1.0, 0.25],
                        out=str(tmp_path), limit=8, progress=False)
    by = {r["method"]: r for r in records}
    assert by["downsample"]["score"] is None and "pool" in by["downsample"]["error"]
    assert by["pool"]["score"] is not None
    text = (tmp_path / "results.md").read_text()
    assert "Not applicable: `downsample` keep=0.25" in text
