"""Method specs as text, and checking them without a model.

A spec is ``name[+name...][:option=value;...]`` — ``fastervlm``, ``fastervlm:source=received``,
``fastervlm+vhr:alpha=2`` (options after the last name go to every method that takes them) — or,
with options after other names too, per method: ``fastervlm:keep=0.25+fastv:layer=2;keep=0.5``
(each segment's options are that method's: ``fastv.keep`` in ``wrap``'s terms).  Values are ints,
floats, ``true``/``false``/``none``, lists in brackets (``bias_layers=[0,1]``) or strings.
``check`` validates names, options and values (every budget included) the way ``wrap`` will, so a
command line can fail in one line before it loads a model.
"""

from __future__ import annotations

import dataclasses
import inspect
import re

from .errors import did_you_mean


def split_specs(text: str) -> list:
    """A comma-separated list of specs, commas inside ``[...]`` (list values) kept:
    ``"random,fastervlm:bias_layers=[0,1]"`` -> ``["random", "fastervlm:bias_layers=[0,1]"]``."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def parse_value(text: str):
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):  # a list: [0,1], []
        return [parse_value(t) for t in text[1:-1].split(",") if t.strip()]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def method_class(name: str):
    """The registered config class ``name``; ``ValueError`` with the closest names otherwise."""
    from . import methods

    if name not in methods.available():
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, methods.available())}; "
                         f"registered methods: {', '.join(methods.available())}")
    return methods.get(name)


def options_of(name: str) -> set:
    return {f.name for f in dataclasses.fields(method_class(name)) if f.init}


def _options(text: str, spec: str) -> dict:
    options = {}
    for item in filter(None, (i.strip() for i in text.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"method option {item!r} in {spec!r} is not key=value")
        options[key.strip()] = parse_value(value.strip())
    return options


def parse_spec(spec: str):
    """``"fastervlm+vhr:alpha=2;layer=1"`` -> ``(["fastervlm", "vhr"], {"alpha": 2, "layer": 1})``;
    ``"fastervlm:keep=0.25+fastv:keep=0.5"`` -> ``(["fastervlm", "fastv"], {"fastervlm.keep": 0.25,
    "fastv.keep": 0.5})``."""
    segments = [s.strip() for s in spec.strip().split("+")]
    if not any(segments):
        raise ValueError(f"empty method spec {spec!r}")
    per_method = any(":" in s for s in segments[:-1])
    names, options = [], {}
    for s in segments:
        name, _, extra = s.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"empty method name in spec {spec!r}")
        method_class(name)
        names.append(name)
        for key, value in _options(extra, spec).items():
            options[f"{name}.{key}" if per_method else key] = value
    return names, options


def check(names, options: dict, keeps=(None,)):
    """Raise ``ValueError``/``TypeError`` for anything ``wrap`` would refuse (without a model):
    unknown options (with the closest accepted one), bad values, methods that cannot be combined.
    ``keeps``: the budgets the methods will run at (``None``: their own ``keep``).  ``downsample``
    (which acts on the processor) is checked on its own."""
    from .methods import resolve

    accepted = set().union(*(options_of(n) for n in names))
    for key in options:
        owner, dot, option = key.rpartition(".")
        scope, choices = (option, options_of(owner)) if dot and owner in names else (key, accepted)
        if scope not in choices:
            who = owner if dot and owner in names else "+".join(names)
            raise TypeError(f"option {scope!r} is not accepted by {who}{did_you_mean(scope, choices)}; "
                            f"options: {', '.join(sorted(choices)) or 'none'}")
    model_names = [n for n in names if n != "downsample"]
    for keep in keeps:
        opts = dict(options) if keep is None else {**options, "keep": keep}
        if "downsample" in names:
            own = {k.rpartition(".")[2]: v for k, v in opts.items() if k.startswith("downsample.")}
            shared = {k: v for k, v in opts.items() if k in options_of("downsample")}
            method_class("downsample")(**{**shared, **own}).validate()
        if model_names:
            takes = set().union(*map(options_of, model_names))
            resolve(model_names, {k: v for k, v in opts.items()
                                  if k in takes or k.rpartition(".")[0] in model_names})


STAGES = {"select": "before the LLM (a selection of each image's visual tokens)",
          "llm": "inside the LLM (visual tokens leave at a decoder layer)",
          "attention": "attention (changes how the LLM attends; no token is dropped)",
          "input": "the processor (a smaller image)"}


def headline(name: str) -> str:
    """The first sentence of a method's summary (its docstring's first paragraph), whole: ``vtprune info``."""
    summary = describe(name)["summary"]
    end = re.search(r"\.(?=\s+[A-Z`(]|$)", summary)
    return summary[:end.end()] if end else summary


def describe(name: str) -> dict:
    """What ``vtprune info --method NAME`` prints: stage, summary, paper, options with defaults and ranges."""
    cls = method_class(name)
    ranges = {}
    for klass in reversed(cls.__mro__):
        ranges.update(vars(klass).get("ranges", {}))
    options = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        options.append({"name": f.name, "type": str(f.type), "default": default, "range": ranges.get(f.name, "")})
    doc = inspect.cleandoc(cls.__doc__ or "")
    return {"name": name, "stage": cls.stage, "stage_words": STAGES.get(cls.stage, cls.stage),
            "summary": doc.split("\n\n")[0].replace("\n", " "), "details": doc, "paper": cls.paper,
            "options": options}
