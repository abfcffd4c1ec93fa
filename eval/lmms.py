"""lmms-eval model plugin: lmms-eval's own Hugging Face model classes, wrapped by vtprune.

lmms-eval finds these through the ``lmms_eval.models`` entry point (``manifests``)::

    python -m lmms_eval --model vtprune_llava_hf \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=fastervlm,keep=0.1 --tasks mme

Every class is a thin subclass of the lmms-eval class of the same family (no copied evaluation
loop): vtprune's own ``--model_args`` are taken out, the rest goes to lmms-eval's class, and the
loaded model is wrapped with ``vtprune.wrap``:

- ``method``: one method or several joined by ``+`` (``fastervlm+vhr``); ``none`` or absent runs
  the stock model (still counted, so a sweep's keep-1 cell uses the same code path).
- ``keep`` and any method option (``alpha=2``, ``layer=2``, ``source=received``, ...).
- ``strict`` (default ``True``): lmms-eval's classes catch an exception raised by ``generate`` and
  score an empty answer; with ``strict`` the plugin raises it instead.
- ``pretrained=toy`` loads the toy LLaVA shipped with vtprune (``vtprune.toy``); ``pretrained=toy-video``
  (``vtprune_qwen3_vl``) the toy video model (``vtprune.toy_video``), its clips taken whole (16 frames of
  128 x 128 unless ``max_num_frames``, ``min_pixels``, ``max_pixels`` say otherwise).
- ``dtype`` (``float32``, ``bfloat16``...): the model's weights read again in that dtype after lmms-eval loads
  it (its Qwen classes load bfloat16; the toy models are float32).

Qwen clips without torchvision: lmms-eval's Qwen classes read images and clips through ``qwen_vl_utils`` and
transformers' processors, which need torchvision.  Where ``qwen_vl_utils`` cannot import, the plugin's Qwen
classes read them with ``vtprune.eval.qwen_clips`` (its definitions, clips read with decord), and where
transformers' processor does not load they lay them out with ``vtprune.qwen_processor.QwenProcessor`` (the
folder's tokenizer and, where it has one, its image processor's settings).  Where
torchvision loads, lmms-eval's own path runs unchanged.

``vtprune.stats(model)["totals"]`` of the wrapped model counts the visual tokens the LLM saw;
the classes log them at the end of each ``generate_until`` and expose them as ``vtprune_totals``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys

# model id -> (module of lmms-eval's class, class name, chat?)
BASES = {
    "vtprune_llava_hf": ("lmms_eval.models.chat.llava_hf", "LlavaHf", True),
    "vtprune_llava_hf_simple": ("lmms_eval.models.simple.llava_hf", "LlavaHf", False),
    "vtprune_qwen2_vl": ("lmms_eval.models.simple.qwen2_vl", "Qwen2_VL", False),
    "vtprune_qwen2_5_vl": ("lmms_eval.models.chat.qwen2_5_vl", "Qwen2_5_VL", True),
    "vtprune_qwen3_vl": ("lmms_eval.models.chat.qwen3_vl", "Qwen3_VL", True),
    "vtprune_internvl_hf": ("lmms_eval.models.chat.internvl_hf", "InternVLHf", True),
    "vtprune_gemma3": ("lmms_eval.models.simple.gemma3", "Gemma3", False),
    "vtprune_qwen3_5": ("lmms_eval.models.chat.qwen3_5", "Qwen3_5", True),
    "vtprune_glm4v": ("lmms_eval.models.simple.glm4v", "GLM4V", False),
    "vtprune_gemma4": ("lmms_eval.models.simple.gemma4", "Gemma4", False),
}
# transformers model_type -> the model id that evaluates it
FOR_MODEL_TYPE = {
    "llava": "vtprune_llava_hf", "llava_next": "vtprune_llava_hf", "llava_onevision": "vtprune_llava_hf",
    "qwen2_vl": "vtprune_qwen2_vl",
    "qwen2_5_vl": "vtprune_qwen2_5_vl", "qwen3_vl": "vtprune_qwen3_vl", "qwen3_vl_moe": "vtprune_qwen3_vl",
    "internvl": "vtprune_internvl_hf", "gemma3": "vtprune_gemma3", "qwen3_5": "vtprune_qwen3_5",
    "qwen3_5_moe": "vtprune_qwen3_5", "glm4v": "vtprune_glm4v", "gemma4": "vtprune_gemma4",
}
VTPRUNE_ARGS = ("method", "strict", "dtype")
# model_type -> the Qwen processor layout its clips take (vtprune.qwen_processor)
QWEN_LAYOUTS = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl",
                "qwen3_5": "qwen3_vl", "qwen3_5_moe": "qwen3_vl"}
TOY_VIDEO_ARGS = {"max_num_frames": 16, "min_pixels": 128 * 128, "max_pixels": 128 * 128}  # a toy clip, whole


def _class_name(model_id):
    return "".join(part.capitalize() for part in model_id.split("_"))


def manifests():
    """The entry point lmms-eval reads: one manifest per wrapped class."""
    from lmms_eval.models.registry_v2 import ModelManifest

    out = []
    for model_id, (_, _, chat) in BASES.items():
        path = f"{__name__}.{_class_name(model_id)}"
        out.append(ModelManifest(model_id=model_id, chat_class_path=path if chat else None,
                                 simple_class_path=None if chat else path))
    return out


def parse_method(method):
    """A method spec (``vtprune.spec``: ``"fastervlm+vhr:alpha=2"``) -> ``(names, options)``;
    ``None``/``"none"``/``"stock"`` -> ``([], {})``."""
    if method is None or (isinstance(method, str) and method.strip().lower() in ("", "none", "stock")):
        return [], {}
    if isinstance(method, str):
        from vtprune.spec import parse_spec

        return parse_spec(method)
    return list(method), {}


def parse_methods(method):
    """``"fastervlm+vhr"`` -> ``["fastervlm", "vhr"]``; ``None``/``"none"`` -> ``[]``."""
    return parse_method(method)[0]


class VtpruneModel:
    """Mixin placed before lmms-eval's class: splits the arguments, wraps the loaded model."""

    def __init__(self, pretrained=None, method=None, strict=True, dtype=None, **kwargs):
        from vtprune import toy, toy_video

        base = self._lmms_base()
        accepted = set(inspect.signature(base.__init__).parameters) - {"self", "args", "kwargs"}
        if dtype is not None:  # checked before lmms-eval loads anything
            import torch

            name, dtype = dtype, getattr(torch, str(dtype).replace("torch.", ""), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"dtype must name a torch dtype (float32, bfloat16, float16), got {name!r}")
        if pretrained == "toy":
            pretrained = toy.DEFAULT_PATH
        elif pretrained == "toy-video":
            pretrained = toy_video.DEFAULT_PATH
            kwargs = {**{k: v for k, v in TOY_VIDEO_ARGS.items() if k in accepted}, **kwargs}
        own = {k: kwargs.pop(k) for k in list(kwargs) if k not in accepted}
        if pretrained is not None:
            kwargs["pretrained"] = pretrained
        if "device_map" in accepted and not kwargs.get("device_map"):
            # llava_hf's default "" is refused by transformers 5; a single device is what it means
            kwargs["device_map"] = str(kwargs.get("device") or "cpu")
        with self._processor_fallback(kwargs.get("pretrained")):
            super().__init__(**kwargs)
        if dtype is not None:
            self._reload_as(kwargs.get("pretrained"), dtype)
        self.vtprune_strict = bool(strict) if not isinstance(strict, str) else strict.lower() != "false"
        self.vtprune_method, self.vtprune_options = None, {}
        self.rewrap(method, **own)

    def _reload_as(self, pretrained, dtype):
        """The model's weights read again from ``pretrained`` in ``dtype`` (lmms-eval's Qwen classes load bfloat16:
        a cast afterwards would keep bfloat16's rounding)."""
        model = self.model
        if model.dtype == dtype:
            return
        fresh = type(model).from_pretrained(pretrained, dtype=dtype)
        model.to(dtype)
        model.load_state_dict(fresh.state_dict())

    @classmethod
    @contextlib.contextmanager
    def _processor_fallback(cls, pretrained):
        """While lmms-eval's Qwen class loads: where ``AutoProcessor`` cannot build the model's processor (no
        torchvision for its video processor, or a folder with only a tokenizer, as the toy video model's),
        ``vtprune.qwen_processor.load`` builds ``QwenProcessor`` instead."""
        module = cls._lmms_module("__init__")
        real = module.__dict__.get("AutoProcessor")
        layout = None
        if real is not None and pretrained is not None:
            from transformers import AutoConfig

            try:
                layout = QWEN_LAYOUTS.get(getattr(AutoConfig.from_pretrained(pretrained), "model_type", None))
            except (OSError, ValueError):  # lmms-eval's own load says what is wrong with ``pretrained``
                layout = None
        if layout is None:
            yield
            return

        class AutoProcessor:
            @staticmethod
            def from_pretrained(path, **kwargs):
                try:
                    return real.from_pretrained(path, **kwargs)
                except (ImportError, OSError) as error:
                    from loguru import logger

                    from vtprune.qwen_processor import load

                    logger.info(f"vtprune: transformers' processor did not load ({str(error).splitlines()[0]}); "
                                "using vtprune.qwen_processor.QwenProcessor")
                    return load(path, layout, **kwargs)

        module.AutoProcessor = AutoProcessor
        try:
            yield
        finally:
            module.AutoProcessor = real

    @classmethod
    def _lmms_module(cls, method: str):
        """The module of the lmms-eval class whose ``method`` this class runs (where its globals live)."""
        owner = next(c for c in cls.__mro__[1:] if c is not VtpruneModel and method in c.__dict__)
        return sys.modules[owner.__module__]

    @classmethod
    def _lmms_base(cls):
        return next(c for c in cls.__mro__[1:] if c is not VtpruneModel and c.__module__.startswith("lmms_eval"))

    def rewrap(self, method, **options):
        """Re-wrap the loaded model with another method/options (the sweep reuses one load).

        ``downsample`` swaps lmms-eval's processor for ``vtprune.downsample(processor, keep)``; the
        other methods wrap the model.
        """
        import vtprune

        model = self.model
        if vtprune.is_wrapped(model):
            vtprune.unwrap(model)
        if getattr(self, "_stock_handle", None) is not None:
            self._stock_handle.remove()
            self._stock_handle = None
        saved = getattr(self, "_vtprune_processor", None)
        if saved is not None:
            setattr(self, saved[0], saved[1])
            self._vtprune_processor = None
        names, spec_options = parse_method(method)
        options = {**spec_options, **options}
        from vtprune.downsample import split

        keep, names, options = split(names, options)
        if keep is not None:
            self._downsample(keep)
        if names:
            vtprune.wrap(model, names, **options)
        elif options:
            raise TypeError(f"vtprune options {sorted(options)} given without a method")
        self.vtprune_method = "+".join(parse_methods(method)) or None
        self.vtprune_options = dict(options)
        self._stock_totals = stock_totals()
        if not names:  # count the visual tokens of the unwrapped model too (a hook that changes nothing)
            self._stock_handle = count_visual_tokens(model, self._stock_totals)

    def _downsample(self, keep):
        import vtprune

        for attr in ("_image_processor", "processor"):
            processor = getattr(self, attr, None)
            if processor is not None and hasattr(processor, "tokenizer"):
                setattr(self, attr, vtprune.downsample(processor, keep))
                self._vtprune_processor = (attr, processor)
                return
        raise TypeError(f"{type(self).__name__}: no processor attribute to downsample")

    vtprune_reuse = False  # the sweep sets it: lmms-eval's clean() would free the model after each task

    def clean(self):
        if not self.vtprune_reuse:
            super().clean()

    @property
    def vtprune_totals(self) -> dict:
        import vtprune

        model = self.model
        if vtprune.is_wrapped(model):
            return vtprune.stats(model)["totals"]
        return dict(self._stock_totals)

    def generate_until(self, requests):
        from loguru import logger

        errors = []
        sink = logger.add(lambda message: errors.append(str(message).strip()), level="ERROR")
        module = self._reader_module()
        try:
            if module is not None:  # qwen_vl_utils did not import there (torchvision): vtprune's reader instead
                from vtprune.eval.qwen_clips import process_vision_info

                module.process_vision_info = process_vision_info
            out = super().generate_until(requests)
        finally:
            logger.remove(sink)
            if module is not None:
                module.process_vision_info = None
        if errors and self.vtprune_strict:
            raise RuntimeError("lmms-eval caught an error inside generate (strict=True re-raises it): " + errors[0])
        logger.info(f"vtprune[{self.vtprune_method or 'stock'}] visual tokens: {self.vtprune_totals}")
        return out

    def _reader_module(self):
        """The module of lmms-eval's ``generate_until`` this class runs, where its ``process_vision_info`` is
        ``None`` (lmms-eval's ``optional_import`` of ``qwen_vl_utils`` failed); ``None`` otherwise."""
        module = self._lmms_module("generate_until")
        has = "process_vision_info" in module.__dict__
        return module if has and module.process_vision_info is None else None


def stock_totals() -> dict:
    return {"forwards": 0, "samples": 0, "visual_tokens_in": 0, "visual_tokens_out": 0, "visual_tokens_llm": 0}


def count_visual_tokens(model, totals):
    """Hook an unwrapped model: add its image and video tokens per prefill to ``totals``; returns the handle.

    Counted like ``vtprune.stats(model)["totals"]``, so the stock cell of a sweep is comparable.
    """
    import torch

    ids_visual = [_image_token_id(model)]
    video = getattr(model.config, "video_token_id", None) or getattr(model.config, "video_token_index", None)
    if video is not None:
        ids_visual.append(video)

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        visual = torch.isin(ids, torch.tensor(ids_visual, device=ids.device))
        if visual.any():  # decode steps carry no image tokens
            n = int(visual.sum())
            totals["forwards"] += 1
            totals["samples"] += int(visual.any(1).sum())
            for key in ("visual_tokens_in", "visual_tokens_out", "visual_tokens_llm"):
                totals[key] += n

    return model.register_forward_pre_hook(pre, with_kwargs=True)


def _image_token_id(model):
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return value
    raise TypeError(f"{type(model).__name__}: no image token id in its config")


def _make(model_id):
    module, name, _ = BASES[model_id]
    base = getattr(importlib.import_module(module), name)
    cls = type(_class_name(model_id), (VtpruneModel, base), {"__module__": __name__, "__doc__":
               f"lmms-eval's ``{module}.{name}`` with ``vtprune.wrap`` applied (model id ``{model_id}``)."})
    return cls


def __getattr__(attr):
    for model_id in BASES:
        if _class_name(model_id) == attr:
            cls = _make(model_id)
            globals()[attr] = cls
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
