"""vtprune on a model dispatched by accelerate with parts offloaded to disk (CPU only).

``from_pretrained(dir, device_map=MAP, offload_folder=...)`` puts some vision-tower layers, the
projector / merger, a decoder layer, the final norm and the LM head on "disk": their parameters sit
on the ``meta`` device except inside their own forward, where accelerate's ``AlignDevicesHook``
loads them.  Every registered method must then give exactly what it gives on the same weights
loaded in memory (logits, kept tokens, in-LLM drops, greedy tokens), and ``unwrap`` must leave
the dispatched model as it was: stock logits, accelerate's hooks in place.
"""

import pytest
import torch
from reference import always_exit_routers

import vtprune
from vtprune.testing import disk_offload_map, tiny_inputs, tiny_model

FAMILIES = ["llava", "qwen2_vl", "internvl"]

# Modules offloaded to disk; everything else goes to "cpu".  They include the tower layers the
# [CLS] / received-attention hooks read, the module visionzip pre-hooks (projector), the decoder
# layer whose pre-hooks exit / var / vhr use, and the norm that dart calls.
DISK = {
    "llava": ["model.vision_tower.encoder.layers.0", "model.vision_tower.encoder.layers.1",
              "model.multi_modal_projector", "model.language_model.layers.1", "model.language_model.norm",
              "lm_head"],
    "qwen2_vl": ["model.visual.blocks.1", "model.visual.merger", "model.language_model.layers.1",
                 "model.language_model.norm", "lm_head"],
    # Qwen2 text config ties lm_head to embed_tokens: both offloaded together
    "internvl": ["model.vision_tower.encoder.layer.1", "model.multi_modal_projector",
                 "model.language_model.embed_tokens", "model.language_model.layers.1", "model.language_model.norm",
                 "lm_head"],
}




# name -> options for ``vtprune.wrap`` (a callable for options that must be built per wrap)
OPTIONS = {
    "random": {"keep": 0.5, "seed": 0},
    "uniform": {"keep": 0.5},
    "pool": {"keep": 0.5},
    "divprune": {"keep": 0.5},
    "fastervlm": {"keep": 0.5},
    "vtc_cls": {"keep": 0.5, "start_layer": 0},
    "visionzip": {"keep": 0.5},
    "vispruner": {"keep": 0.5},
    "cdpruner": {"keep": 0.5, "theta": 0.5},
    "holov": {"keep": 0.5, "crops": 3},
    "evs": {"keep": 0.5},
    "vidcom2": {"keep": 0.5},
    "uniform_time": {"keep": 0.5},
    "fastvid": {"keep": 0.5},
    "flashvid": {"keep": 0.4, "alpha": 0.5},
    "holitom": {"keep": 0.4, "contextual_share": 0.5},
    "dycoke": {"keep": 0.5},
    "pdkv": {"layer": 1, "keep": 0.5},
    "pdrop": {"layer_list": [1]},
    "sparsevlm": {"pruning_loc": [0]},
    "framefusion": {"cost": 0.6},
    "holitom_merge": {"layer": 1},
    "exit": {"layer": 1},
    "fastv": {"layer": 1, "keep": 0.5},
    "dart": {"layer": 1, "keep": 0.5, "pivot_image": 2, "pivot_text": 2},
    "dyvte": lambda: {"weights": always_exit_routers()},
    "vhr": {"alpha": 2.0, "layers": [0, 1]},
    "var": {"sink_dims": [0, 1], "tau": 1.5, "rho": 0.3, "summ": 0.05, "layers": [1]},
    "zerotuning": {"gamma": 3.0, "layers": [1]},
}
# keep a still image whole (its first and only frame), or act only while decoding: the prefill's logits are stock
STILL = {"evs", "uniform_time", "dycoke", "pdkv"}
RAISES = {  # name -> (families or None for all, error, match)
    "downsample": (None, ValueError, "processor"),
    "visionzip": (("qwen2_vl",), ValueError, "merge"),
}


def _dyvte_row_zero_only():
    """DyVTE whose row 0 exits after layer 0 and row 1 never (as in tests/test_exit.py): the per-row
    masked path, where no token leaves physically."""
    from vtprune.methods import DyVTE

    class RowZeroOnly(DyVTE):
        def decide(self, runtime, j, hidden):
            return torch.tensor([True, False])

    return RowZeroOnly(weights=always_exit_routers())


EXTRA = {  # config objects: a pre-LLM selector with an in-LLM method, and DyVTE rows exiting apart
    "fastervlm+fastv": lambda: [vtprune.methods.get("fastervlm")(keep=0.5),
                                vtprune.methods.get("fastv")(layer=1, keep=0.5)],
    "dyvte_rows_apart": _dyvte_row_zero_only,
}



def _prepare(model):
    model.eval()
    model.generation_config.eos_token_id = None  # always generate max_new_tokens
    model.generation_config.pad_token_id = 0
    return model


def _hooked(model):
    return {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")}


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"offload_{family}")
    source = tiny_model(family)
    source.save_pretrained(root / "model")
    cls = type(source)
    device_map = disk_offload_map(source, DISK[family])
    memory = _prepare(cls.from_pretrained(root / "model"))
    offloaded = _prepare(cls.from_pretrained(root / "model", device_map=device_map,
                                             offload_folder=str(root / "offload")))
    inputs = tiny_inputs(memory, family, images_per_row=(1, 1))
    assert inputs["attention_mask"][:, 0].tolist() == [0, 1]  # a left-padded batch of two
    # the dispatch really offloads: meta parameters outside forward, accelerate hooks on the disk modules
    modules = dict(offloaded.named_modules())
    for name in DISK[family]:
        assert hasattr(modules[name], "_hf_hook"), name
        assert all(p.device.type == "meta" for p in modules[name].parameters()), name
    with torch.no_grad():
        stock = offloaded(**inputs).logits
        assert torch.equal(stock, memory(**inputs).logits)
    forwards = {n: vars(m)["forward"] for n, m in modules.items() if "forward" in vars(m)}  # accelerate's
    return {"family": family, "memory": memory, "offloaded": offloaded, "inputs": inputs, "stock": stock,
            "hooks": _hooked(offloaded), "forwards": forwards}


def _options(name):
    options = OPTIONS[name]
    return options() if callable(options) else dict(options)


def _run(model, inputs, method, options):
    """Wrap, run a forward and a greedy generate, unwrap; returns what the two models must share."""
    vtprune.wrap(model, method, **options)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits
            kept = None
            items = method if isinstance(method, (list, tuple)) else [method]
            if any((vtprune.methods.get(m) if isinstance(m, str) else m).stage == "select" for m in items):
                kept = [[idx.tolist() for idx in images] for images in vtprune.last_kept(model)]
            record = vtprune.record(model)
            exits = record.exit.drop.clone() if record.exit is not None and record.exit.drop is not None else None
            stats = vtprune.stats(model)
            tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    finally:
        vtprune.unwrap(model)
    for key in ("time_score_s", "time_gather_s"):
        stats.pop(key, None)
    return {"logits": logits, "kept": kept, "exits": exits, "stats": stats, "tokens": tokens}


def _check_unwrapped(setup):
    model = setup["offloaded"]
    assert not vtprune.is_wrapped(model)
    hooks = _hooked(model)
    assert hooks.keys() == setup["hooks"].keys()
    assert all(hooks[n] is h for n, h in setup["hooks"].items())
    modules = dict(model.named_modules())
    for name, forward in setup["forwards"].items():  # accelerate's replaced forwards are untouched
        assert vars(modules[name]).get("forward") is forward, name
    assert "get_image_features" not in vars(model.model) and "get_placeholder_mask" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(**setup["inputs"]).logits, setup["stock"])


def _compare(setup, label, make):
    """``make()`` -> ``(method, options)``, built afresh for each of the two models."""
    family, inputs = setup["family"], setup["inputs"]
    try:
        ours = _run(setup["offloaded"], inputs, *make())
    finally:
        _check_unwrapped(setup)
    ref = _run(setup["memory"], inputs, *make())
    torch.testing.assert_close(ours["logits"], ref["logits"], atol=1e-6, rtol=1e-6)
    if label not in STILL:
        assert not torch.equal(ref["logits"], setup["stock"]), f"{label} changed nothing on {family}"
    assert ours["kept"] == ref["kept"]
    assert (ours["exits"] is None) == (ref["exits"] is None)
    if ref["exits"] is not None:
        assert torch.equal(ours["exits"], ref["exits"])
    assert ours["stats"] == ref["stats"]
    assert ours["tokens"].shape == (2, 3)
    assert torch.equal(ours["tokens"], ref["tokens"])
    return ours["stats"]


@pytest.mark.parametrize("method", vtprune.methods.available())
def test_method_under_disk_offload_equals_in_memory(setup, method):
    family = setup["family"]
    raises = RAISES.get(method)
    if raises is not None and (raises[0] is None or family in raises[0]):
        _, error, match = raises
        for model in (setup["offloaded"], setup["memory"]):
            with pytest.raises(error, match=match):
                vtprune.wrap(model, method, **(_options(method) if method in OPTIONS else {}))
            assert not vtprune.is_wrapped(model)
        _check_unwrapped(setup)
        return
    assert method in OPTIONS, f"no offload test options for the new method {method!r}: add them to OPTIONS"
    _compare(setup, method, lambda: (method, _options(method)))


@pytest.mark.parametrize("case", sorted(EXTRA))
def test_method_configs_under_disk_offload(setup, case):
    stats = _compare(setup, case, lambda: (EXTRA[case](), {}))
    if case == "dyvte_rows_apart":
        assert stats["exit"]["exit_layers"] == [1, None]
