"""A family and a selector of one's own each take one module (``tests/extension_example.py``) and no edit
to vtprune: the renamed LLaVA wraps as the toy LLaVA does, ``centre`` selects in the HF wrap and in the
serving selection alike, and serving accepts both by their needs (tests/serving/test_extension.py serves
them in vLLM)."""

import pytest
import torch

import vtprune
from vtprune import families, toy
from vtprune.patches import registry
from vtprune.serving import bindings


def _renamed_toy(ext):
    model, processor = toy.load()
    renamed = ext.RenamedLlavaForConditionalGeneration(model.config).eval()
    renamed.load_state_dict(model.state_dict())
    return model, renamed, processor


def test_a_family_and_a_selector_of_ones_own_wrap_as_the_tree_does(extension):
    model, renamed, processor = _renamed_toy(extension)
    assert type(vtprune.patches.adapter_for(renamed)) is extension.RenamedLlavaAdapter  # its most derived class
    assert vtprune.patches.supported()["renamed_llava"] == "RenamedLlavaForConditionalGeneration"
    samples = toy.eval_split(n=2)
    batch = processor(images=[s["image"] for s in samples], text=[toy.prompt(s["question"]) for s in samples],
                      return_tensors="pt", padding=True)
    out = {}
    for name, m in (("toy", model), ("renamed", renamed)):
        with vtprune.wrapped(m, "centre", keep=0.25), torch.no_grad():
            out[name] = (m(**batch).logits, [k[0].tolist() for k in vtprune.last_kept(m)])
    assert out["renamed"][1] == out["toy"][1]
    torch.testing.assert_close(out["renamed"][0], out["toy"][0], rtol=0, atol=0)
    side = 16  # the toy's 16 x 16 grid: the 64 kept tokens are those nearest its middle
    cell = torch.arange(side * side)
    distance = (cell // side - 7.5) ** 2 + (cell % side - 7.5) ** 2
    kept = torch.zeros(side * side, dtype=torch.bool)
    kept[out["toy"][1][0]] = True
    assert int(kept.sum()) == 64 and distance[kept].max() <= distance[~kept].min()
    with vtprune.wrapped(model, "uniform", keep=0.25), torch.no_grad():  # a different selection: centre is read
        model(**batch)
        assert [k[0].tolist() for k in vtprune.last_kept(model)] != out["toy"][1]


def test_serving_takes_them_by_their_needs(extension, tmp_path):
    import json

    from vtprune.serving import check, check_architecture, servable
    from vtprune.serving.rows import kept_count, select

    assert "centre" in servable()
    config = check("centre", 0.25, {}, "renamed_llava")
    assert config.positions == "renumber"  # a 1-D family
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["RenamedLlavaForConditionalGeneration"]}))
    assert check_architecture(str(tmp_path)) == "renamed_llava"
    assert "RenamedLlavaForConditionalGeneration" in bindings.served()
    features = torch.randn(576, 8)
    kept, rows, bias = select(config, features, torch.Generator())
    assert kept.numel() == rows.shape[0] == kept_count(config, 576) == 144 and bias is None


def test_the_registries_refuse_clashes(extension):
    with pytest.raises(ValueError, match="already registered"):
        vtprune.methods.register("centre")(extension.Centre)
    with pytest.raises(ValueError, match="already belongs"):
        families.register(families.Family("other", ("LlavaForConditionalGeneration",)))
    with pytest.raises(ValueError, match="already has an adapter"):
        registry.register_adapter(type("Again", (extension.RenamedLlavaAdapter,), {"facts": extension.RENAMED}))
    with pytest.raises(TypeError, match="sets facts"):
        registry.register_adapter(type("NoFacts", (registry.Adapter,), {}))


def test_the_documented_family_example_binds_both_engines(registries):
    import pathlib
    import re

    section = (pathlib.Path(__file__).parents[1] / "docs" / "extending.md").read_text()
    block = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "register_family" in b][0]
    scope = {}
    exec(compile(block, "docs/extending.md (family)", "exec"), scope)
    assert families.get("renamed_llava") is scope["RENAMED"]
    assert "RenamedLlavaForConditionalGeneration" in bindings.served()
    model, _ = toy.load()
    renamed = type("RenamedLlavaForConditionalGeneration", (type(model),), {})(model.config)
    assert type(vtprune.patches.adapter_for(renamed)) is scope["RenamedLlavaAdapter"]


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_an_in_llm_method_of_ones_own_is_exact(extension, family):
    """``every_other`` (one module, no runtime file touched) leaves the LLM as the stock model with those
    tokens masked from its layer on: logits, and greedy tokens with the cache."""
    from reference import greedy_model
    from test_exit import _assert_layer_masked, _run

    from vtprune.testing import IMAGE_TOKEN, tiny_inputs

    model = greedy_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(1, 2), with_mask=True)
    logits, drop, tokens, drop_gen, stats = _run(model, inputs, "every_other", layer=1)
    visual = inputs["input_ids"] == IMAGE_TOKEN
    assert bool((drop <= visual).all()) and torch.equal(drop.sum(1), visual.sum(1) // 2)
    assert stats["exit"]["method"] == "every_other"
    _assert_layer_masked(model, inputs, logits, tokens, drop, drop_gen)
