"""The notebooks run top to bottom on the toy model (nbclient), and are committed without outputs."""

import importlib.util
import os
import re

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
NOTEBOOKS = ["compare_ratios.ipynb", "hallucination.ipynb", "compare_video.ipynb"]


def _required():
    if os.environ.get("VTPRUNE_REQUIRE_EVAL") == "1":  # CI installs the notebooks extra: never skip there
        import nbclient  # noqa: F401
        import nbformat  # noqa: F401
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    return pytest.importorskip("nbformat")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stripped(name):
    nbformat = _required()
    nb = nbformat.read(os.path.join(ROOT, name), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_renders(name, tmp_path, monkeypatch):
    """Executed by scripts/render_notebooks.py (as for docs/notebooks/): no errors, the expected
    outputs, and a markdown page whose figures exist and which carries the result tables."""
    _required()
    render = _load_script("render_notebooks")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("VTPRUNE_MODEL", raising=False)
    docs = tmp_path / "docs"
    nb = render.render_all([name], out=str(docs), limit=24, runs=str(tmp_path / "runs"))[name]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "every notebook draws at least one figure"
    text = "".join(o.get("text", "") for o in outputs) + "".join(
        str(o.get("data", {}).get(kind, "")) for o in outputs for kind in ("text/plain", "text/markdown"))
    page = (docs / name.replace(".ipynb", ".md")).read_text()
    linked = re.findall(r"!\[[^]]*\]\(([^)]+)\)", page)
    assert len(linked) == len(images) and all((docs / f).stat().st_size > 1000 for f in linked)
    assert "VTPRUNE_NOTEBOOK_LIMIT=24" in page and name.replace(".ipynb", ".md") in (docs / "README.md").read_text()
    assert nb.cells[0].source in page and "```python" in page
    if name == "compare_ratios.ipynb":
        assert "| fastervlm | 0.1 | 26.0 |" in text and "VTPRUNE_MODEL is not set: skipped" in text
        assert (tmp_path / "runs" / "results.csv").exists()
        assert "| fastervlm | 0.1 | 26.0 |" in page  # the sweep's table
        assert re.search(r"\| \d+ \| fastervlm \| 0\.1 \| 26\.0 \|", page)  # the per-type DataFrame, as markdown
    elif name == "compare_video.ipynb":
        assert "| evs | 0.1 | 16.0 |" in text and "| uniform_time | 0.1 |" in page  # evs: a whole slice at least
        assert re.search(r"\| \d+ \| evs \| 0\.1 \| 16\.0 \| [0-9.]+ \|", page)  # per type, with the event column
    else:
        assert "fastervlm keep 0.1 + vhr" in text and "false yes, hard negatives" in text and "var (tau 4)" in text
        assert re.search(r"\| fastervlm keep 0\.1 \+ vhr \| [0-9.]+ \|", page)


def test_html_table_to_markdown():
    render = _load_script("render_notebooks")
    html = ("<table><thead><tr><th></th><th>a|b</th><th>c</th></tr></thead>"
            "<tbody><tr><th>x</th><td>1.0</td><td>2</td></tr><tr><th>y</th><td>3</td></tr></tbody></table>")
    assert render.html_table(html).splitlines() == ["|  | a\\|b | c |", "|---|---|---|", "| x | 1.0 | 2 |", "| y | 3 |  |"]


def _load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "..", "scripts", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
