"""Public API: errors leave the model as it was, registry, budgets, last_kept and stats."""

import math
from dataclasses import dataclass

import pytest
import torch

import vtprune
from vtprune.budget import check_keep, tokens_to_keep
from vtprune.methods import Selector, register
from vtprune.testing import FAMILIES, tiny_inputs, tiny_model


def _snapshot(model):
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    attrs = {(n, k) for n, m in model.named_modules() for k in vars(m) if callable(vars(m)[k]) and not k.startswith("_")}
    return hooks, attrs, vtprune.is_wrapped(model)


@pytest.fixture(scope="module")
def llava():
    return tiny_model("llava")


@pytest.mark.parametrize("keep", [0, 0.0, -0.5, 1.5, -3, float("nan")])
def test_bad_keep_value_raises_and_leaves_model(llava, keep):
    before = _snapshot(llava)
    with pytest.raises(ValueError, match="keep"):
        vtprune.wrap(llava, "random", keep=keep)
    assert _snapshot(llava) == before


@pytest.mark.parametrize("keep", ["0.5", None, True, [0.5]])
def test_bad_keep_type_raises(llava, keep):
    before = _snapshot(llava)
    with pytest.raises(TypeError, match="keep"):
        vtprune.wrap(llava, "random", keep=keep)
    assert _snapshot(llava) == before


def test_unsupported_model_lists_supported():
    import transformers as tf

    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2))
    before = _snapshot(lm)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration.*Qwen3VLForConditionalGeneration"):
        vtprune.wrap(lm, "random")
    assert _snapshot(lm) == before
    inner = tiny_model("llava").model  # the bare LlavaModel is not the generation model
    with pytest.raises(TypeError, match="LlavaModel"):
        vtprune.wrap(inner, "random")


def test_unknown_method_and_option(llava):
    before = _snapshot(llava)
    with pytest.raises(ValueError, match="unknown method 'nope'.*random"):
        vtprune.wrap(llava, "nope")
    with pytest.raises(TypeError, match="alpha"):
        vtprune.wrap(llava, "random", keep=0.5, alpha=2)
    with pytest.raises(TypeError, match="config object"):
        vtprune.wrap(llava, 3)
    with pytest.raises(ValueError, match="at least one method"):
        vtprune.wrap(llava, [])
    with pytest.raises(ValueError, match="only one pre-LLM selection"):
        vtprune.wrap(llava, ["random", "uniform"])
    assert _snapshot(llava) == before


def test_wrap_twice_raises_and_first_wrap_still_works():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    vtprune.wrap(model, "uniform", keep=0.5)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already wrapped"):
        vtprune.wrap(model, "random", keep=0.1)
    assert _snapshot(model) == snap
    with torch.no_grad():
        model(**inputs)
    assert [len(k) for k in vtprune.last_kept(model)[0]] == [8]
    vtprune.unwrap(model)
    with pytest.raises(ValueError, match="not wrapped"):
        vtprune.unwrap(model)


def test_config_objects_and_registry():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    config = vtprune.methods.get("random")(keep=4, seed=7)
    with vtprune.wrapped(model, config):
        with torch.no_grad():
            model(**inputs)
        first = vtprune.last_kept(model)[0][0]
        assert vtprune.api.methods_of(model)[0] is not config  # the wrap holds its own copy
    with vtprune.wrapped(model, vtprune.methods.get("random")(keep=4, seed=7)):
        with torch.no_grad():
            model(**inputs)
        assert torch.equal(vtprune.last_kept(model)[0][0], first)
        assert first.numel() == 4 and bool((first[1:] > first[:-1]).all())
    assert {"random", "uniform"} <= set(vtprune.methods.available())
    with pytest.raises(ValueError, match="already registered"):
        register("random")(type("Dup", (Selector,), {}))


def test_a_registered_method_is_usable_by_name(registries):
    @dataclass
    class FirstTokens(Selector):
        """Keep the first tokens of each image (a test method)."""

        def score(self, ctx):
            return [-torch.arange(layout.n, dtype=torch.float32) for layout in ctx.layouts]

    name = "test_first_tokens"
    register(name)(FirstTokens)
    model = tiny_model("llava")
    with vtprune.wrapped(model, name, keep=0.25):
        with torch.no_grad():
            model(**tiny_inputs(model, "llava"))
        assert vtprune.last_kept(model)[0][0].tolist() == [0, 1, 2, 3]


def test_budget_rules():
    assert check_keep(1) == 1 and check_keep(0.5) == 0.5 and check_keep(1.0) == 1.0
    assert tokens_to_keep(0.25, 576) == 144
    assert tokens_to_keep(0.001, 576) == 1
    assert tokens_to_keep(1000, 576) == 576
    assert tokens_to_keep(64, 576) == 64
    assert tokens_to_keep(0.5, 0) == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_last_kept_and_stats(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(0, 2))
    with vtprune.wrapped(model, "random", keep=0.5):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_kept(model)
        stats = vtprune.stats(model)
    assert kept[0] == [] and len(kept[1]) == 2
    n_img = int((inputs["input_ids"][1] == 100).sum()) // 2
    for k, img in zip(kept[1], stats["samples"][1]["images"]):
        assert img["tokens_in"] == n_img
        assert img["tokens_out"] == k.numel()
        assert bool((k[1:] > k[:-1]).all()) and int(k.max()) < n_img
        if family not in ("llava_next", "llava_onevision"):  # they add the newlines of kept rows
            assert k.numel() == math.floor(0.5 * n_img + 0.5)
    assert stats["visual_tokens_out"] == sum(k.numel() for k in kept[1])
    assert stats["llm_sequence_out"] < stats["llm_sequence_in"]
    assert stats["time_score_s"] >= 0 and stats["time_gather_s"] >= 0


def test_random_is_seeded_and_draws_anew():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    runs = []
    for _ in range(2):
        with vtprune.wrapped(model, "random", keep=0.5, seed=11):
            with torch.no_grad():
                model(**inputs)
                a = vtprune.last_kept(model)[0][0]
                model(**inputs)
                b = vtprune.last_kept(model)[0][0]
        runs.append((a, b))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[0][1])


def test_text_only_prompt_untouched():
    model = tiny_model("llava")
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        stock = model(input_ids=ids).logits
    with vtprune.wrapped(model, "random", keep=0.1):
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, stock)
        stats = vtprune.stats(model)
        assert stats["forwards_with_images"] == 0 and set(stats) == {"forwards_with_images", "method", "methods", "totals"}
        assert stats["totals"]["forwards"] == 0 and stats["totals"]["visual_tokens_in"] == 0
        with pytest.raises(ValueError, match="not run a forward"):
            vtprune.last_kept(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_totals_add_up_every_prefill(family):
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, images_per_row=(0, 2))
    with vtprune.wrapped(model, "random", keep=0.5):
        per_call = []
        with torch.no_grad():
            for _ in range(2):
                model(**inputs)
                per_call.append(vtprune.stats(model))
            model.generate(**inputs, max_new_tokens=3, do_sample=False)  # decode steps add nothing
        totals = vtprune.stats(model)["totals"]
    assert totals["forwards"] == 3 and totals["samples"] == 3
    n_in = sum(s["visual_tokens_in"] for s in per_call)
    n_out = sum(s["visual_tokens_out"] for s in per_call)
    assert totals["visual_tokens_in"] == n_in * 3 // 2 and totals["visual_tokens_out"] == n_out * 3 // 2
    assert totals["visual_tokens_llm"] == totals["visual_tokens_out"] < totals["visual_tokens_in"]


def test_stats_totals_of_an_in_llm_exit():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 1))
    n_layers = len(model.model.language_model.layers)
    with vtprune.wrapped(model, "exit", layer=1):
        with torch.no_grad():
            model(**inputs)
        stats = vtprune.stats(model)
    totals = stats["totals"]
    visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert totals["visual_tokens_out"] == visual and totals["exits"] == 1
    assert totals["visual_tokens_llm"] == pytest.approx(visual * 1 / n_layers)
    text = int(inputs["attention_mask"].sum()) - visual
    assert totals["text_tokens"] == text
    assert totals["llm_flops_saved"] == pytest.approx((visual - visual / n_layers) / (visual + text))
    assert stats["llm_flops_saved"] == pytest.approx(totals["llm_flops_saved"])
    per_layer = [s["visual_tokens_per_layer"] for s in stats["samples"]]
    assert per_layer == [[v, 0] for v in (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist()]


def test_stats_kv_bytes_saved():
    model = tiny_model("llava")
    config = model.config.text_config
    layers = config.num_hidden_layers
    per_token_layer = 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 1))
    with vtprune.wrapped(model, "random", keep=0.5):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        stats = vtprune.stats(model)
    cut = stats["llm_sequence_in"] - stats["llm_sequence_out"]
    assert cut > 0 and stats["kv_bytes_saved"] == 2 * cut * layers * per_token_layer
    # the cache really is that much smaller than the stock one
    with torch.no_grad():
        stock = model(**inputs, use_cache=True)
    size = lambda c: sum(l.keys.numel() + l.values.numel() for l in c.layers) * 4  # noqa: E731,E741
    assert size(stock.past_key_values) - size(out.past_key_values) == stats["kv_bytes_saved"]
    with vtprune.wrapped(model, "exit", layer=1):
        with torch.no_grad():
            model(**inputs)
        stats = vtprune.stats(model)
    dropped = sum(stats["exit"]["visual_tokens_dropped"])
    assert stats["kv_bytes_saved"] == dropped * (layers - 1) * per_token_layer


@pytest.mark.parametrize("name", vtprune.methods.available())
def test_every_config_round_trips_through_json(name):
    import json

    options = {"weights": "toy"} if name == "dyvte" else {}
    config = vtprune.methods.get(name)(**options)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["method"] == name
    again = vtprune.methods.from_dict(data)
    assert type(again) is type(config) and again.to_dict() == config.to_dict()
    with pytest.raises(TypeError, match="does not take"):
        vtprune.methods.from_dict({**data, "no_such_option": 1})


def test_config_with_an_object_asks_for_a_path():
    from reference import always_exit_routers

    config = vtprune.methods.get("dyvte")(weights=always_exit_routers([0]))
    with pytest.raises(TypeError, match="by path"):
        config.to_dict()


def test_python_api_mistakes_say_what_was_meant():
    """The Python API suggests as the command line does (one suggester): a misspelt method or option, any
    case; the model stays unwrapped."""
    from vtprune.methods import from_dict

    model = tiny_model("llava")
    with pytest.raises(ValueError, match=r"unknown method 'fastervl' \(did you mean 'fastervlm'\?\)"):
        vtprune.wrap(model, "fastervl")
    with pytest.raises(TypeError, match=r"\['kep'\] are not accepted .*\(did you mean 'keep'\?\)"):
        vtprune.wrap(model, "fastervlm", kep=0.1)
    with pytest.raises(ValueError, match=r"did you mean 'fastervlm'"):
        vtprune.wrap(model, "FASTERVLM")
    with pytest.raises(TypeError, match=r"did you mean 'layer'"):
        from_dict({"method": "fastv", "layr": 2})
    assert not vtprune.api.is_wrapped(model)
    with pytest.raises(ValueError) as err:
        vtprune.wrap(model, "zzzz")
    assert "did you mean" not in str(err.value)  # nothing close: no guess


def test_wrap_without_a_method_lists_them_and_leaves_the_model():
    """No silent default: a wrap names its method."""
    model = tiny_model("llava")
    for call in (lambda: vtprune.wrap(model), lambda: vtprune.wrapped(model).__enter__()):
        with pytest.raises(TypeError, match="needs a method.*fastervlm.*random"):
            call()
        assert not vtprune.is_wrapped(model)


def test_an_int_keep_above_the_tokens_keeps_all_and_says_so_once():
    """No silent cap: one warning per wrap, and ``stats`` marks the image."""
    import warnings

    model = tiny_model("llava")  # 16 tokens per image
    inputs = tiny_inputs(model, "llava", images_per_row=(1, 2))
    with vtprune.wrapped(model, "random", keep=100):
        with pytest.warns(UserWarning, match="keep=100 asks for more visual tokens"):
            with torch.no_grad():
                model(**inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once: a second forward is quiet
            with torch.no_grad():
                model(**inputs)
        images = [i for s in vtprune.stats(model)["samples"] for i in s["images"]]
    assert len(images) == 3 and all(i["budget_capped"] and i["tokens_out"] == i["tokens_in"] == 16 for i in images)
    with vtprune.wrapped(model, "random", keep=8):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                model(**inputs)
        assert not any("budget_capped" in i for s in vtprune.stats(model)["samples"] for i in s["images"])
