"""The notebooks run top to bottom on the toy model (nbclient), and are committed without outputs."""

import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "notebooks")
NOTEBOOKS = ["compare_ratios.ipynb", "hallucination.ipynb"]


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
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = _required()
    from nbclient import NotebookClient

    monkeypatch.setenv("VTPRUNE_NOTEBOOK_LIMIT", "24")
    monkeypatch.setenv("VTPRUNE_NOTEBOOK_OUT", str(tmp_path / "runs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("VTPRUNE_MODEL", raising=False)
    nb = nbformat.read(os.path.join(ROOT, name), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "every notebook draws at least one figure"
    text = "".join(o.get("text", "") for o in outputs) + "".join(str(o.get("data", {}).get("text/plain", ""))
                                                                 for o in outputs)
    if name == "compare_ratios.ipynb":
        assert "| fastervlm | 0.1 | 26.0 |" in text and "VTPRUNE_MODEL is not set: skipped" in text
        assert (tmp_path / "runs" / "results.csv").exists()
    else:
        assert "fastervlm keep 0.1 + vhr" in text and "false yes, hard negatives" in text and "var (tau 4)" in text
