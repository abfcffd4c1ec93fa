"""The serving plugin's selection (``vtprune.serving.llava``) equals the HF wrap's on the toy model, and the
toy folder vLLM loads: tested without vLLM (the plugin itself runs in the serving venv: tests/serving)."""

import re

import pytest
import torch

import vtprune
from vtprune import toy
from vtprune.methods import get
from vtprune.serving import check, check_architecture, model_dir
from vtprune.serving.rows import kept_count, select
from vtprune.serving.tower import TowerTap
from vtprune.spec import parse_spec


@pytest.fixture(scope="module")
def toy_batch():
    model, processor = toy.load()
    samples = toy.eval_split(n=4)
    batch = processor(images=[s["image"] for s in samples], text=[toy.prompt(s["question"]) for s in samples],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    return model, batch, features


def _tapped_features(model, batch, config):
    """The toy's projected image features with a ``TowerTap`` fed as the vLLM binding feeds it: each hooked
    CLIP layer's q and k (vLLM fuses them in one projection; HF has two), the projector's input merged."""
    tower = model.model.vision_tower
    vision = model.config.vision_config
    tap = TowerTap(config, vision.num_hidden_layers, vision.num_hidden_layers + model.config.vision_feature_layer)
    handles, box = [], {}
    for layer in tap.layers:
        attn = tower.encoder.layers[layer].self_attn
        handles.append(attn.q_proj.register_forward_hook(lambda m, a, q: box.update(q=q)))
        handles.append(attn.k_proj.register_forward_hook(
            lambda m, a, k, layer=layer, attn=attn: tap.on_qkv(layer, box.pop("q"), k, attn.num_heads, attn.scale)))
    handles.append(model.model.multi_modal_projector.register_forward_pre_hook(
        lambda m, args: (tap.on_projector(args[0]), *args[1:])))
    try:
        with torch.no_grad():
            features = model.model.get_image_features(
                pixel_values=batch["pixel_values"],
                **({"image_sizes": batch["image_sizes"]} if "image_sizes" in batch else {})).pooler_output
    finally:
        for h in handles:
            h.remove()
    return features, tap


@pytest.mark.parametrize("method,keep", [("uniform", 0.25), ("divprune", 0.1), ("random", 0.25), ("pool", 0.25),
                                         ("fastervlm", 0.1), ("vtc_cls", 0.25), ("visionzip", 0.1),
                                         ("fastervlm:summary=4", 0.1), ("divprune:size_bias=true", 0.1),
                                         ("uniform:summary=4;size_bias=true", 0.05), ("visionzip:size_bias=true", 0.1),
                                         ("pool:size_bias=true", 0.25), ("random:summary=3;summary_feature=first", 0.1),
                                         ("vispruner", 0.1), ("holov:summary=2", 0.25)])
def test_serving_keeps_what_the_hf_wrap_keeps(toy_batch, method, keep):
    """Kept indices, rows (summary tokens' means included) and, for a config that weighs, each kept row's bias:
    the log of the size the HF wrap records."""
    model, batch, features = toy_batch
    (method,), options = parse_spec(method)
    config = check(method, keep, options)
    assert config.positions == "renumber"
    tap = None
    if config.needs_cls:
        features, tap = _tapped_features(model, batch, config)
    with vtprune.wrapped(model, method, keep=keep, **options):
        seen = {}
        handle = model.model.language_model.register_forward_pre_hook(  # after the cut: what the LLM reads
            lambda m, a, k: seen.update(embeds=k["inputs_embeds"]), with_kwargs=True)
        with torch.no_grad():
            model(**batch)
        handle.remove()
        kept = vtprune.last_kept(model)
        record = vtprune.record(model)
        cut, _ = record.cut
    generator = torch.Generator().manual_seed(0)
    image = batch["input_ids"] == model.config.image_token_id
    for i, f in enumerate(features):
        indices, rows, bias = select(config, f, generator, tap.image(i, f.shape[0]) if tap else None)
        assert indices.tolist() == kept[i][0].tolist()
        assert rows.shape[0] == kept_count(config, f.shape[0])
        if config.weighs:
            assert bias.tolist() == record.sizes[i][0].float().log().tolist() and float(bias.max()) > 0
        else:
            assert bias is None
        fed = seen["embeds"][i][image[i][cut[i]].to(seen["embeds"].device)]  # the image rows the HF LLM reads
        torch.testing.assert_close(rows, fed, atol=1e-6, rtol=0)


def test_tower_tap_reads_the_layers_a_method_asks_for():
    config = check("vtc_cls", 0.25, {"start_layer": 1})
    tap = TowerTap(config, 4, 2)
    assert tap.layers == [1, 2]
    with pytest.raises(ValueError, match="did not run"):
        tap.image(0, 256)  # precomputed embeddings: no tower ran
    with pytest.raises(ValueError, match="out of range"):
        TowerTap(check("fastervlm", 0.25, {"vision_layer": 7}), 4, 2)


def test_serving_errors_and_the_toy_folder(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="fastv acts inside the language model"):
        check("fastv", 0.25, {})
    with pytest.raises(ValueError, match="positions='renumber'"):
        check("uniform", 0.25, {"positions": "original"})
    assert check("uniform", 0.25, {}, "qwen2_5_vl").positions == "original"  # as EVS keeps mrope positions
    with pytest.raises(ValueError, match="positions='original'"):
        check("uniform", 0.25, {"positions": "renumber"}, "qwen2_5_vl")
    assert check("fastervlm", 0.25, {}, "qwen2_5_vl").needs_cls  # the attention each patch receives
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        check("fastervlm", 0.25, {"source": "cls"}, "qwen2_5_vl")
    with pytest.raises(ValueError, match="patch merger"):
        check("visionzip", 0.25, {}, "qwen3_vl")
    with pytest.raises(ValueError, match="summary_group='similarity'"):
        check("uniform", 0.25, {"summary": 1, "summary_group": "space"})  # empty cells: a count not fixed
    assert check("uniform", 0.25, {"scope": "tile"}, "internvl").scope == "tile"  # tile budgets: a known count
    for method in ("vispruner", "holov"):  # every pre-LLM selector that reads no text, by its needs
        assert check(method, 0.25, {}, "qwen3_vl").needs_cls
    with pytest.raises(ValueError, match="reads the prompt's instruction"):
        check("cdpruner", 0.25, {}, "llava")
    assert check("uniform", 0.25, {"summary": 2, "size_bias": True}).weighs
    with pytest.raises(ValueError, match="sliding-window layers"):  # vLLM's biased attention takes no window
        check("pool", 0.25, {"size_bias": True}, "gemma4")
    assert check("pool", 0.25, {}, "gemma4").positions == "renumber"
    with pytest.raises(ValueError, match="keep"):
        check("uniform", 1.5, {})
    monkeypatch.setenv("VTPRUNE_CACHE", str(tmp_path))
    folder = model_dir("toy")
    from safetensors import safe_open

    import os

    assert sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")) == ["model.safetensors"]
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("vision_tower.vision_model.") for k in keys if k.startswith("vision_tower."))
    assert get("uniform") is not None and model_dir("/some/dir") == "/some/dir"
    assert check_architecture(folder) == "llava"  # the toy is a LLaVA-1.5
    other = tmp_path / "qwen"
    other.mkdir()
    (other / "config.json").write_text('{"architectures": ["PaliGemmaForConditionalGeneration"]}')
    with pytest.raises(ValueError, match="prunes LlavaForConditionalGeneration"):
        check_architecture(str(other))
    (other / "config.json").write_text('{"architectures": ["Qwen2_5_VLForConditionalGeneration"]}')
    assert check_architecture(str(other)) == "qwen2_5_vl"


def _tapped_internvl(model, inputs, config):
    """The tiny InternVL's image features with a ``TowerTap`` fed as ``serving.internvl.tap_intern`` feeds it in
    vLLM: each hooked layer's normed queries and keys, the projector's input (after pixel shuffle) merged."""
    import types

    from vtprune.patches.internvl import InternVLAdapter
    from vtprune.serving.internvl import children

    layers = model.model.vision_tower.encoder.layer
    tap = TowerTap(config, len(layers), len(layers) - 1)
    shuffle = types.SimpleNamespace(config=model.config, pixel_shuffle=model.model.pixel_shuffle)
    merged = children(shuffle)
    assert torch.equal(merged, InternVLAdapter(model).children())  # the HF adapter's reading of pixel shuffle
    tap.sources = merged + 1
    handles, box = [], {}
    for layer in tap.layers:
        attn = layers[layer].attention
        handles.append(attn.q_norm.register_forward_hook(lambda m, a, q: box.update(q=q)))
        handles.append(attn.k_norm.register_forward_hook(
            lambda m, a, k, layer=layer, attn=attn: tap.on_qkv(layer, box.pop("q"), k, attn.num_heads, attn.scale)))
    handles.append(model.model.multi_modal_projector.register_forward_pre_hook(
        lambda m, args: (tap.on_projector(args[0]), *args[1:])))
    try:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    finally:
        for h in handles:
            h.remove()
    return features, tap, merged


@pytest.mark.parametrize("method,keep", [("uniform", 0.25), ("pool", 0.25), ("divprune", 0.25), ("fastervlm", 0.25),
                                         ("vtc_cls", 0.25), ("visionzip", 0.1), ("visionzip:size_bias=true", 0.25),
                                         ("fastervlm:summary=2", 0.25), ("vispruner", 0.25), ("holov", 0.25),
                                         ("uniform:scope=tile", 0.25), ("fastervlm:scope=tile;summary=1", 0.25)])
def test_serving_keeps_what_the_hf_wrap_keeps_on_internvl_tiles(method, keep):
    """An InternVL image of several tiles: the serving selection on its tile grids equals the HF wrap's; [CLS]
    methods read each tile's tower scores summed over the patches pixel shuffle merged (``tile_layout``)."""
    from vtprune.serving.internvl import tile_grids, tile_layout
    from vtprune.testing import tiny_inputs, tiny_model

    model = tiny_model("internvl")
    inputs = tiny_inputs(model, "internvl", images_per_row=(1,), image_specs=[3])
    (method,), options = parse_spec(method)
    config = check(method, keep, options, "internvl")
    tap, merged = None, None
    if config.needs_cls:
        features, tap, merged = _tapped_internvl(model, inputs, config)
    else:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    rows = features.reshape(-1, features.shape[-1])  # the image's tiles, in order
    with vtprune.wrapped(model, method, keep=keep, **options):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_kept(model)[0][0]
        sizes = vtprune.record(model).sizes
    per_tile = model.config.image_seq_length
    grids = tile_grids(rows.shape[0], per_tile)
    assert len(grids) == 3
    layout = tile_layout(rows.shape[0], per_tile, merged)
    tower = tap.tiles(0, len(grids), layout) if tap is not None else None
    indices, out, bias = select(config, rows, torch.Generator().manual_seed(0), tower, layout=layout)
    assert indices.tolist() == kept.tolist()
    assert out.shape[0] == kept_count(config, rows.shape[0], grids) < rows.shape[0]
    if config.weighs:
        assert bias.tolist() == sizes[0][0].float().log().tolist()


@pytest.mark.parametrize("method", ["uniform", "divprune", "random", "fastervlm", "vtc_cls", "pool",
                                    "uniform:summary=2;size_bias=true", "vispruner", "holov", "divprune:scope=tile"])
def test_serving_keeps_what_the_hf_wrap_keeps_on_llava_next(method):
    """LLaVA-NeXT (base + crops + newlines): the serving selection on the packed layout keeps the HF wrap's
    tokens with ``newlines="all"``, and as many as ``kept_count`` says before any image is encoded; [CLS]
    methods read each tile's scores (``TowerTap.tiles``)."""
    from vtprune.testing import tiny_inputs, tiny_model

    model = tiny_model("llava_next")
    inputs = tiny_inputs(model, "llava_next", images_per_row=(1,))
    (method,), options = parse_spec(method)
    config = check(method, 0.25, options, "llava_next")
    assert config.newlines == "all" and config.positions == "renumber"
    if config.needs_cls:
        (rows,), tap = _tapped_features(model, inputs, config)
    else:
        with torch.no_grad():
            (rows,) = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                     image_sizes=inputs["image_sizes"]).pooler_output
    with vtprune.wrapped(model, method, keep=0.25, newlines="all", **options):
        with torch.no_grad():
            model(**inputs)
        kept = vtprune.last_kept(model)[0][0]
        layout = vtprune.record(model).layouts[0][0]
    newlines = int(layout.newline.sum())
    assert newlines > 0
    tower = tap.tiles(0, inputs["pixel_values"].shape[1], layout) if config.needs_cls else None
    indices, out, bias = select(config, rows, torch.Generator().manual_seed(0), tower, layout=layout)
    assert indices.tolist() == kept.tolist()
    assert out.shape[0] == kept_count(config, rows.shape[0], layout=layout) < rows.shape[0]
    assert (bias is not None) == config.weighs
    with pytest.raises(ValueError, match="newlines='all'"):
        check(method, 0.25, {"newlines": "rows"}, "llava_next")
    with pytest.raises(ValueError, match="depends on which tokens it kept"):
        check("visionzip", 0.25, {}, "llava_next")


def test_the_docs_list_what_serving_accepts_per_family():
    """The served-model table (docs/serve.md) names, per family, exactly the registered methods that
    ``check`` accepts there (by their needs); every pre-LLM selector that reads no text is served somewhere."""
    import pathlib
    import re

    from vtprune.serving import SERVED_TYPES, servable

    text = (pathlib.Path(__file__).parents[1] / "docs" / "serve.md").read_text()
    text = text[text.index("| served model | methods |"):]
    rows = {"llava": "LLaVA-1.5 (", "llava_next": "LLaVA-NeXT (", "internvl": "InternVL, HF format (",
            "qwen2_vl": "Qwen2-VL, Qwen2.5-VL", "qwen2_5_vl": "Qwen2-VL, Qwen2.5-VL", "qwen3_vl": "Qwen3-VL, Qwen3-VL-MoE",
            "qwen3_vl_moe": "Qwen3-VL, Qwen3-VL-MoE", "qwen3_5": "Qwen3-VL, Qwen3-VL-MoE",
            "qwen3_5_moe": "Qwen3-VL, Qwen3-VL-MoE",
            "llava_onevision": "LLaVA-OneVision (", "gemma4": "Gemma 4 (", "glm4v": "GLM-4.1V (",
            "gemma3": "Gemma 3 ("}
    assert set(rows) == set(SERVED_TYPES)
    anywhere = set()
    for model_type, start in rows.items():
        line = next(line for line in text.splitlines() if line.strip().startswith("| " + start))
        listed = set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[2]))
        accepted = set()
        for name in servable():
            try:
                check(name, 0.25, {}, model_type)
            except ValueError:
                continue
            accepted.add(name)
        assert listed == accepted, model_type
        anywhere |= accepted
    assert anywhere == set(servable())
    selectors = {n for n in vtprune.methods.available() if get(n).stage == "select"}
    assert selectors - anywhere == {"cdpruner", "fastvid", "flashvid", "holitom"}  # the prompt's text; clips merged


def test_a_request_budget_is_checked_and_travels_exactly():
    """A request's own keep (vtprune.serving.request_keep, no vLLM needed): checked by name and range, at most the
    server's count, and carried as integers that give back the same budget (1 token and 1.0 of them apart)."""
    from vtprune.layout import ImageLayout
    from vtprune.serving import request_keep

    server = check("uniform", 0.25, {}, "llava")
    assert request_keep.parse(server, None) is None
    for given, words in [({"keep": 0}, "must be >= 1"), ({"keep": "all"}, "keep must be a float"),
                         ({"budget": 0.1}, "takes {'keep': K}"), (0.1, "takes {'keep': K}")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            request_keep.parse(server, given)
    for keep in (0.1, 1, 1.0, 0.25, 7, 1 / 3):
        asked = request_keep.with_keep(server, keep)
        assert asked.keep == keep and type(asked.keep) is type(keep) and asked.name == "uniform"
        (back,) = request_keep.decode(server, request_keep.encode(asked)[None])
        assert back.keep == keep and type(back.keep) is type(keep)
    layout = ImageLayout.from_grids([(16, 16)])
    token = request_keep._current.set(request_keep.with_keep(server, 0.1))
    try:
        assert request_keep.kept_count(server, layout) == 26
        request_keep._current.set(request_keep.with_keep(server, 0.5))
        with pytest.raises(ValueError, match="keeps 128 of an image's 256 tokens, more than the server's keep=0.25"):
            request_keep.kept_count(server, layout)
    finally:
        request_keep._current.reset(token)
    assert request_keep.kept_count(server, layout) == 64  # outside a request: the server's
