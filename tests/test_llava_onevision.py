"""LLaVA-OneVision specifics: crops shrunk by interpolation (``anyres_max_N``), an image of a multi-image
prompt as one tile and a newline, merging refused on clips (docs/families.md)."""

import pytest
import torch
from reference import drop_mask, greedy_model, masked_forward

import vtprune
from vtprune.errors import NotApplicable
from vtprune.patches import adapter_for
from vtprune.testing import IMAGE_TOKEN, tiny_inputs, tiny_model

ATOL = 1e-5


def _check(model, inputs, method, **options):
    with vtprune.wrapped(model, method, **options):
        with torch.no_grad():
            logits = model(**inputs).logits
        kept = vtprune.last_kept(model)
        stats = vtprune.stats(model)
    ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept))
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    return kept, stats


def test_interpolated_crops_are_laid_out_and_cut_exactly():
    """A 112 x 112 image: 2 x 2 crops (8 x 8 patches) hold twice anyres_max_2's 32 tokens, so the model shrinks
    them to 5 x 5 (and 5 newlines); each token's source is the patch nearest to where it samples."""
    model = greedy_model("llava_onevision")
    inputs = tiny_inputs(model, "llava_onevision", image_specs=[(112, 112)])
    n = int((inputs["input_ids"] == IMAGE_TOKEN).sum())
    assert n == 16 + 5 * 6
    layout = adapter_for(model)._build((112, 112), n)[0]
    assert layout.shapes == [(4, 4), (5, 5)] and int(layout.newline.sum()) == 5 and layout.cropped
    crop = (layout.grid == 1) & ~layout.newline
    sample = ((torch.arange(5) + 0.5) * 8 / 5 - 0.5).round().long()  # bilinear's sample point, nearest patch
    r, c = sample[layout.row[crop]], sample[layout.col[crop]]
    tile = 1 + (r // 4) * 2 + c // 4
    assert torch.equal(layout.source[crop, 0], tile * 16 + (r % 4) * 4 + c % 4)
    for method, options in [("random", dict(keep=0.5)), ("fastervlm", dict(keep=0.25)), ("divprune", dict(keep=0.25))]:
        kept, _ = _check(model, inputs, method, **options)
        assert 0 < kept[0][0].numel() < n


def test_an_image_of_a_multi_image_prompt_is_one_tile_and_a_newline():
    model = greedy_model("llava_onevision")
    base = tiny_inputs(model, "llava_onevision", images_per_row=(2,), with_mask=False)
    ids = base["input_ids"][0].tolist()
    first = ids.index(IMAGE_TOKEN)
    runs = [i for i in range(len(ids)) if ids[i] == IMAGE_TOKEN]
    # each image: 16 patches and one newline (no crops), in place of the two patched images
    prompt = ids[:first] + [IMAGE_TOKEN] * 17 + [111, 5, 6, 110] + [IMAGE_TOKEN] * 17 + ids[runs[-1] + 1:]
    inputs = dict(base, input_ids=torch.tensor([prompt]), batch_num_images=torch.tensor([2]))
    with torch.no_grad():
        model(**inputs)  # the stock model takes it
    kept, stats = _check(model, inputs, "fastervlm", keep=0.5)
    assert [img["tokens_in"] for img in stats["samples"][0]["images"]] == [17, 17]
    for k in kept[0]:  # 8 of the 16 patches, and the newline when the last row keeps a token
        content = k[k < 16]
        assert content.numel() == 8 and (16 in k.tolist()) == bool(((content >= 12) & (content < 16)).any())


def test_visionzip_merges_image_tiles_and_refuses_clips():
    model = tiny_model("llava_onevision")
    image = tiny_inputs(model, "llava_onevision", image_specs=[(50, 100)])
    with vtprune.wrapped(model, "visionzip", keep=0.5), torch.no_grad():
        model(**image)
        assert vtprune.stats(model)["visual_tokens_out"] < vtprune.stats(model)["visual_tokens_in"]
    clip = tiny_inputs(model, "llava_onevision", images_per_row=(0,), videos_per_row=(1,))
    with vtprune.wrapped(model, "visionzip", keep=0.5), torch.no_grad():
        with pytest.raises(NotApplicable, match="halves a clip's frames after"):
            model(**clip)
