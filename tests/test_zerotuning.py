"""ZeroTuning against an eager reference: probabilities materialised, the first real token's column
multiplied by gamma, rows renormalised."""

import pytest
import torch
from reference import EagerReference, LayerMasked, drop_mask, masked_forward, masked_greedy

import vtprune
from vtprune.testing import FAMILIES, tiny_inputs, tiny_model


class ReferenceZeroTuning(EagerReference):
    def __init__(self, model, gamma, layers=None, heads=None):
        self.gamma, self.layers, self.heads = gamma, layers, heads
        super().__init__(model)

    def edit(self, module, probs):
        if self.layers is not None and module.layer_idx not in self.layers:
            return
        for b in range(probs.shape[0]):
            first = int((probs[b, 0, -1] > 0).nonzero()[0])  # the first key the row may see
            for h in range(probs.shape[1]):
                if self.heads is not None and h not in self.heads:
                    continue
                rows = probs[b, h]
                rows[:, first] = rows[:, first] * self.gamma
                probs[b, h] = rows / rows.sum(-1, keepdim=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_zerotuning_equals_eager_reference(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 1))
    options = dict(gamma=3.0, layers=[1], heads=[0, 2])
    with torch.no_grad():
        stock = model(**inputs).logits
        with vtprune.wrapped(model, "zerotuning", **options):
            ours = model(**inputs).logits
        ref = ReferenceZeroTuning(model, **options)
        try:
            expected = model(**inputs).logits
        finally:
            ref.close()
    mask = inputs["attention_mask"].bool()
    assert (ours - stock)[mask].abs().max() > 1e-4
    torch.testing.assert_close(ours[mask], expected[mask], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_zerotuning_generate_and_no_mask(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 1))
    no_drop = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    with torch.no_grad():
        with vtprune.wrapped(model, "zerotuning", gamma=0.2):
            ours = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            single = tiny_inputs(model, family, with_mask=False)
            ours_single = model(**single).logits
        ref = ReferenceZeroTuning(model, 0.2)
        try:
            expected = masked_greedy(model, inputs, no_drop, steps=6)
            expected_single = model(**single).logits
        finally:
            ref.close()
    assert torch.equal(ours, expected)
    torch.testing.assert_close(ours_single, expected_single, atol=2e-5, rtol=1e-4)


def test_zerotuning_after_pruning_and_identity():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 1))
    with torch.no_grad():
        stock = model(**inputs).logits
        with vtprune.wrapped(model, "zerotuning"):  # gamma 1: nothing changes
            assert torch.equal(model(**inputs).logits, stock)
        with vtprune.wrapped(model, ["random", "zerotuning"], keep=0.5, gamma=2.5):
            ours = model(**inputs).logits[:, -1]
            kept = vtprune.last_kept(model)
        drop = drop_mask(inputs["input_ids"], kept)
        ref = ReferenceZeroTuning(model, 2.5)
        try:
            expected = masked_forward(model, inputs, drop)[:, -1]
        finally:
            ref.close()
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert model.config.get_text_config()._attn_implementation == "sdpa"


def test_zerotuning_errors():
    model = tiny_model("llava")
    for bad in (dict(gamma=0.0), dict(gamma=-1.0), dict(gamma=True)):
        with pytest.raises(ValueError, match="gamma"):
            vtprune.wrap(model, "zerotuning", **bad)
    with pytest.raises(ValueError, match="heads"):
        vtprune.wrap(model, "zerotuning", gamma=2.0, heads=[99])
    with pytest.raises(ValueError, match="layers"):
        vtprune.wrap(model, "zerotuning", gamma=2.0, layers=[99])
    with pytest.raises(ValueError, match="only one attention"):
        vtprune.wrap(model, ["vhr", "zerotuning"], gamma=2.0)
    assert not vtprune.is_wrapped(model)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "internvl"])
@pytest.mark.parametrize("method,options", [("exit", {"layer": 1}), ("fastv", {"layer": 1, "keep": 0.5})])
def test_zerotuning_composes_with_in_llm_exit(family, method, options):
    """In-LLM exit + zerotuning equals the stock model with the exited tokens masked from the exit
    layer on (LayerMasked) and the eager ZeroTuning reference; unwrap restores SDPA."""
    from transformers import AttentionInterface

    model = tiny_model(family)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    inputs = tiny_inputs(model, family, images_per_row=(1, 1))
    before = dict(AttentionInterface._global_mapping)
    with torch.no_grad():
        with vtprune.wrapped(model, [method, "zerotuning"], gamma=3.0, **options):
            ours = model(**inputs).logits[:, -1]
            drop = vtprune.record(model).exit.drop.clone()
            tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
            drop_gen = vtprune.record(model).exit.drop.clone()
        assert model.config.get_text_config()._attn_implementation == "sdpa"
        assert dict(AttentionInterface._global_mapping) == before
        ref = ReferenceZeroTuning(model, 3.0)
        none = torch.zeros_like(drop)
        try:
            with LayerMasked(model, 1, drop):
                expected = masked_forward(model, inputs, none)[:, -1]
            with LayerMasked(model, 1, drop_gen):
                expected_tokens = masked_greedy(model, inputs, none, steps=6)
        finally:
            ref.close()
    assert drop.any()
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(tokens, expected_tokens)


def test_one_router_per_wrap_and_the_private_registry_it_cleans():
    """Every attention runtime of a wrap shares one registered attention function; ``unwrap`` takes it
    out of transformers' registries through ``_global_mapping``, the one private attribute vtprune
    uses: this fails when transformers renames it."""
    from transformers import AttentionInterface, AttentionMaskInterface

    assert isinstance(AttentionInterface._global_mapping, dict) and "sdpa" in AttentionInterface._global_mapping
    assert isinstance(AttentionMaskInterface._global_mapping, dict) and "sdpa" in AttentionMaskInterface._global_mapping
    model = tiny_model("llava")
    before, before_masks = set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping)
    with vtprune.wrapped(model, ["fastv", "zerotuning"], layer=1, keep=0.5, gamma=2.0):
        added = set(AttentionInterface._global_mapping) - before
        assert len(added) == 1 and model.config.get_text_config()._attn_implementation in added
        assert set(AttentionMaskInterface._global_mapping) - before_masks == added
    assert set(AttentionInterface._global_mapping) == before
    assert set(AttentionMaskInterface._global_mapping) == before_masks
    assert model.config.get_text_config()._attn_implementation == "sdpa"
