"""The README is the front page: at most 250 lines, its Quickstart the documentation's (and it runs as
pasted), its links resolve, and every number in it is checked here against what it counts."""

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _text():
    return (ROOT / "README.md").read_text(encoding="utf-8")


def _section(text, heading):
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else None]


def test_the_readme_is_a_front_page():
    assert len(_text().splitlines()) <= 250


def test_the_quickstart_is_the_documented_one_and_runs_as_pasted():
    text = _text()
    page = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
    for heading in ("## Set up (two commands)", "## Quickstart"):
        code = re.findall(r"```\w+\n.*?```", _section(text, heading), re.S)
        assert code and code == re.findall(r"```\w+\n.*?```", _section(page, heading), re.S), heading
    block = re.search(r"```python\n(.*?)```", _section(text, "## Quickstart"), re.S).group(1)
    assert "toy.load()" in block
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, "README Quickstart", "exec"), {})
    out = printed.getvalue()
    assert "| truth:" in out and "'tokens_out': 26" in out and "'tokens_in': 256" in out and "visual_tokens_per_layer" in out
    assert "sees 26 of the 256 visual tokens" in block and "256 visual tokens per image" in block


def test_links_resolve():
    text = _text()
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_the_numbers_it_states():
    import vtprune

    text = _text()
    methods = int(re.search(r"\*\*(\d+) methods\*\*", text).group(1))
    assert methods == len(vtprune.methods.available())
    constraints = (ROOT / "constraints.txt").read_text()
    for package, version in re.findall(r"(torch|lmms-eval) \(?(\d+\.\d+\.\d+)", text):
        assert f"{package}=={version}" in constraints, (package, version)
    setup = (ROOT / "setup.cfg").read_text()
    for pin in re.findall(r"`((?:torch|transformers)>=[^`]+)`", text):
        assert pin in setup.replace(" ", ""), pin
    megabytes = int(re.search(r"offline, (\d+) MB", text).group(1))
    size = (ROOT / "vtprune" / "assets" / "toy_llava" / "model.safetensors").stat().st_size
    assert round(size / 1e6) == megabytes


def test_the_test_count(request):
    """"about N tests" within 10% of what this run collected, when it collected the whole suite."""
    collected = request.session.testscollected
    if collected < 500 or request.config.args not in ([], [str(ROOT)], [str(ROOT / "tests")], ["tests"]):
        pytest.skip(f"this run collected {collected} tests, not the whole suite")
    stated = int(re.search(r"about ([\d,]+) tests", _text()).group(1).replace(",", ""))
    assert abs(stated - collected) <= 0.1 * collected, (stated, collected)


def test_the_family_table_is_the_documented_one_and_names_every_family():
    from vtprune import families

    def table(text):
        rows = [line for line in text.splitlines() if line.startswith("| ")]
        return [re.sub(r"\]\((?:docs/)?([^)]*)\)", r"](\1)", row) for row in rows]

    readme = table(_section(_text(), "## Families and methods"))
    assert readme == table((ROOT / "docs" / "families.md").read_text(encoding="utf-8"))
    classes = set(re.findall(r"\(`(\w+ForConditionalGeneration)`", "\n".join(readme)))
    assert classes == {a for f in families.known().values() for a in f.architectures}
    header = readme[0]
    import vtprune

    named = set(re.findall(r"`([a-z_0-9]+)`", header))
    assert named == set(vtprune.methods.available()) - {"downsample"}, named ^ set(vtprune.methods.available())


def test_extending_example_registers_a_working_method():
    import torch

    import vtprune
    from vtprune.methods import base
    from vtprune.testing import tiny_inputs, tiny_model

    section = (ROOT / "docs" / "extending.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model = tiny_model("llava")
    try:
        exec(compile(block, "docs/extending.md", "exec"), {"model": model})
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


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` runs the README's test command (after its venv), as pasted, plus pytest's own flags."""
    command = re.findall(r"```bash\n(.*?)\n```", _section(_text(), "## Set up (two commands)"), re.S)[1]
    venv, activate, rest = command.split(" && ", 2)
    assert venv.startswith("python3 -m venv") and activate.startswith(". ")
    assert any(line.startswith(rest) for line in (ROOT / ".ci" / "run").read_text().splitlines()), rest
