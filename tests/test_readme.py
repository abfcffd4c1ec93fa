"""The README's promises that can be checked: the toy Quickstart runs exactly as pasted, and the
table of contents points at headings that exist."""

import contextlib
import io
import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _text():
    with open(README, encoding="utf-8") as f:
        return f.read()


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return "#" + text.replace(" ", "-")


def test_toy_quickstart_runs_as_pasted():
    text = _text()
    section = text[text.index("## Quickstart"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "toy.load()" in block
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README Quickstart", "exec"), {})
    out = printed.getvalue()
    assert "| truth:" in out and "'tokens_out': 26" in out and "visual_tokens_per_layer" in out


def test_table_of_contents_matches_the_headings():
    text = _text()
    toc = text[text.index("## Contents"):]
    toc = toc[:toc.index("\n## ", 3)]
    links = re.findall(r"\]\((#[^)]+)\)", toc)
    headings = [h for h in re.findall(r"^#{2,3} (.+)$", text, re.M) if h != "Contents"]
    assert links == [anchor(h) for h in headings]


def test_extending_example_registers_a_working_method():
    import torch

    import vtprune
    from vtprune.methods import base
    from vtprune.testing import tiny_inputs, tiny_model

    text = _text()
    section = text[text.index("## Extending"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = tiny_model("llava")
    try:
        exec(compile(block, "README Extending", "exec"), {"model": model})
        assert vtprune.is_wrapped(model)
        with torch.no_grad():
            model(**tiny_inputs(model, "llava"))
        kept = vtprune.last_kept(model)[0][0]
        features = model.model.get_image_features(pixel_values=tiny_inputs(model, "llava")["pixel_values"])
        norms = features.pooler_output[0].float().norm(dim=-1)
        assert set(kept.tolist()) == set(norms.topk(kept.numel()).indices.tolist())
        assert "feature norm" in vtprune.spec.describe("feature_norm")["summary"]
    finally:
        if vtprune.is_wrapped(model):
            vtprune.unwrap(model)
        base._REGISTRY.pop("feature_norm", None)
