"""``positions="renumber"``: the pruned sequence numbered afresh, as a serving engine numbers a pruned
prompt.  Reference without vtprune: the stock model with the dropped image tokens masked out and every
position less the dropped tokens before it — the stock model on the shortened prompt."""

import pytest
import torch
from reference import drop_mask, generated, greedy_model, manual_greedy, masked_forward, masked_greedy, staged_masks

import vtprune
from vtprune.testing import tiny_inputs

ATOL = 1e-5
FLAT = ["llava", "llava_next", "internvl"]  # 1-D positions
LAYOUTS = [((1,), False), ((1, 2), True), ((0, 1), True)]


@pytest.mark.parametrize("family", FLAT)
@pytest.mark.parametrize("rows,with_mask", LAYOUTS)
@pytest.mark.parametrize("method,keep", [("random", 0.5), ("uniform", 0.25)])
def test_renumbered_pruning_equals_the_shortened_prompt(family, rows, with_mask, method, keep):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=rows, with_mask=with_mask)
    vtprune.wrap(model, method, keep=keep, positions="renumber")
    with torch.no_grad():
        logits = model(**inputs).logits
    kept_forward = vtprune.last_kept(model)
    tokens = generated(model, inputs)
    kept_generate = vtprune.last_kept(model)
    vtprune.unwrap(model)
    drop = drop_mask(inputs["input_ids"], kept_forward)
    ref = masked_forward(model, inputs, drop, renumber=True)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    original = masked_forward(model, inputs, drop)  # the test can tell the two numberings apart
    assert not torch.allclose(logits[:, -1], original[:, -1], atol=ATOL, rtol=0)
    ref_tokens = masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept_generate), renumber=True)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("family", FLAT)
def test_renumbered_manual_decode_without_positions(family):
    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1,), with_mask=False)
    vtprune.wrap(model, "uniform", keep=0.5, positions="renumber")
    tokens = manual_greedy(model, inputs, steps=6)
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    ref = masked_greedy(model, inputs, drop_mask(inputs["input_ids"], kept), steps=6, plain=True, renumber=True)
    assert torch.equal(tokens, ref)


def test_renumber_composes_with_an_in_llm_exit():
    """FastV after a renumbered cut ≡ the shortened prompt with FastV's tokens masked from its layer on."""
    model = greedy_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    vtprune.wrap(model, ["uniform", "fastv"], keep=0.5, positions="renumber", layer=1)
    with torch.no_grad():
        logits = model(**inputs).logits
    record = vtprune.record(model)
    kept = vtprune.last_kept(model)
    vtprune.unwrap(model)
    assert record.exit.stages and record.exit.stages[0][2].any()
    with staged_masks(model, record.exit.stages, record.cut):
        ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept), renumber=True)
    torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)


def test_renumber_keeps_all_as_stock_and_refuses_mrope():
    model = greedy_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    with torch.no_grad():
        stock = model(**inputs).logits
        with vtprune.wrapped(model, "random", keep=1.0, positions="renumber"):
            assert torch.equal(model(**inputs).logits, stock)
    with pytest.raises(ValueError, match="'original' or 'renumber'"):
        vtprune.wrap(model, "random", keep=0.5, positions="shift")
    assert not vtprune.is_wrapped(model)
    qwen = greedy_model("qwen2_vl")
    with pytest.raises(ValueError, match="mrope"):
        vtprune.wrap(qwen, "random", keep=0.5, positions="renumber")
    assert not vtprune.is_wrapped(qwen)


@pytest.mark.parametrize("positions", ["original", "renumber"])
def test_every_newline_stays_with_newlines_all(positions):
    """LLaVA-NeXT with ``newlines="all"``: the kept count is the budget plus every newline, whatever is
    chosen (what serving needs), and the cut still equals the reference."""
    model = greedy_model("llava_next")
    inputs = tiny_inputs(model, "llava_next", images_per_row=(1, 2))
    counts = []
    for seed in (0, 1):
        vtprune.wrap(model, "random", keep=0.25, seed=seed, newlines="all", positions=positions)
        with torch.no_grad():
            logits = model(**inputs).logits
        record = vtprune.record(model)
        kept = vtprune.last_kept(model)
        vtprune.unwrap(model)
        for row, layouts in zip(kept, record.layouts):
            for keep, layout in zip(row, layouts):
                newline = layout.newline.nonzero().squeeze(1)
                assert newline.numel() > 0 and bool(torch.isin(newline, keep).all())
                counts.append(keep.numel() - newline.numel())
        ref = masked_forward(model, inputs, drop_mask(inputs["input_ids"], kept), renumber=positions == "renumber")
        torch.testing.assert_close(logits[:, -1], ref[:, -1], atol=ATOL, rtol=0)
    assert counts[:len(counts) // 2] == counts[len(counts) // 2:]  # content tokens: the budget, whatever the seed
    with pytest.raises(ValueError, match="newlines must be"):
        vtprune.wrap(model, "random", newlines="some")
