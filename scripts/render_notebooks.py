"""Execute the notebooks and publish their outputs: one markdown page per notebook, its figures as
PNGs, and an index, so a reader sees the results without running anything.

    python scripts/render_notebooks.py                      # both notebooks into docs/notebooks
    python scripts/render_notebooks.py hallucination.ipynb --out /tmp/r --limit 24

``--limit`` is ``VTPRUNE_NOTEBOOK_LIMIT`` (questions per cell, default 400). The notebooks' sweep
cells go to a temporary folder unless ``--runs DIR``. The notebooks stay committed without outputs.
"""

import argparse
import base64
import contextlib
import html.parser
import os
import sys
import tempfile
import time

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
NAMES = ["compare_ratios.ipynb", "hallucination.ipynb", "compare_video.ipynb"]


@contextlib.contextmanager
def environ(**values):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)  # the kernel inherits them
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(name, limit, runs, threads=1):
    """Run ``notebooks/<name>`` in a kernel with ``threads`` CPU threads: a multi-threaded timing is
    many times slower whenever another process takes a core, one thread at most about twice."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    os.makedirs(runs, exist_ok=True)  # the kernel's working directory, and the sweep's OUT
    with environ(VTPRUNE_NOTEBOOK_LIMIT=str(limit), VTPRUNE_NOTEBOOK_OUT=str(runs), OMP_NUM_THREADS=str(threads)):
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(runs)}}).execute()
    return nb


class _Table(html.parser.HTMLParser):
    """The rows of the first HTML table (pandas' ``to_html``), as lists of cell texts."""

    def __init__(self):
        super().__init__()
        self.rows, self.cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.rows[-1].append(self.cell.strip().replace("|", "\\|"))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_table(text) -> str:
    parser = _Table()
    parser.feed(text)
    rows = [r for r in parser.rows if r]
    if not rows:
        return ""
    width = max(len(r) for r in rows)
    rows = [r + [""] * (width - len(r)) for r in rows]
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * width]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def markdown(nb, stem, out, note="") -> str:
    """The notebook as markdown: its text, its code, its outputs; figures written to ``out``."""
    parts, figures = [], 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            parts.append(cell.source)
        elif cell.cell_type == "code":
            parts.append(f"```python\n{cell.source}\n```")
            stdout = "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")
            if stdout.strip():
                parts.append(f"```text\n{stdout.rstrip()}\n```")
            for output in cell.outputs:
                if output.output_type == "error":
                    raise RuntimeError(f"{stem}: cell {index} failed: {output.ename}: {output.evalue}")
                data = output.get("data", {})
                if "image/png" in data:
                    figures += 1
                    image = f"{stem}_{figures}.png"
                    with open(os.path.join(out, image), "wb") as f:
                        f.write(base64.b64decode(data["image/png"]))
                    parts.append(f"![{stem} figure {figures}]({image})")
                elif "text/markdown" in data:
                    parts.append(data["text/markdown"].strip())
                elif "<table" in data.get("text/html", ""):
                    parts.append(html_table(data["text/html"]))
                elif "text/plain" in data:
                    parts.append(f"```text\n{data['text/plain'].rstrip()}\n```")
        if index == 0 and note:
            parts.append(note)
    return "\n\n".join(parts) + "\n"


def _kept_entries(readme, names) -> list:
    """The index lines of notebooks rendered before and not re-rendered now."""
    if not os.path.exists(readme):
        return []
    with open(readme) as f:
        lines = [line.rstrip("\n") for line in f if line.startswith("- [")]
    return [line for line in lines if not any(f"`notebooks/{name}`" in line for name in names)]


def _order(line):
    return next((i for i, name in enumerate(NAMES) if f"`notebooks/{name}`" in line), len(NAMES))


def render_all(names=NAMES, out="docs/notebooks", limit=400, runs=None, threads=1) -> dict:
    """Execute ``names``; write ``out/<stem>.md``, its PNGs and ``out/README.md``; ``{name: notebook}``."""
    os.makedirs(out, exist_ok=True)
    done, index = {}, _kept_entries(os.path.join(out, "README.md"), names)
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            stem = os.path.splitext(name)[0]
            start = time.perf_counter()
            done[name] = nb = execute(name, limit, runs or scratch, threads)
            seconds = time.perf_counter() - start
            note = (f"> Rendered from `notebooks/{name}` by `scripts/render_notebooks.py`: "
                    f"executed with `VTPRUNE_NOTEBOOK_LIMIT={limit}` (questions per cell) on CPU "
                    f"(`OMP_NUM_THREADS={threads}`) in {seconds:.0f} s. "
                    "Timings are that machine's, under whatever else it was running.")
            with open(os.path.join(out, stem + ".md"), "w") as f:
                f.write(markdown(nb, stem, out, note))
            title = next((c.source.splitlines()[0].lstrip("# ") for c in nb.cells if c.cell_type == "markdown"), stem)
            index.append(f"- [{title}]({stem}.md) (`notebooks/{name}`, {seconds:.0f} s)")
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("# Notebooks, executed\n\nThe notebooks under `notebooks/` are committed without outputs; "
                "these pages show them run top to bottom on the toy models "
                "(regenerate with `python scripts/render_notebooks.py`; each page says how many questions per "
                "cell it ran).\n\n" + "\n".join(sorted(index, key=_order)) + "\n")
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=NAMES, help="notebooks under notebooks/ (default: all)")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "notebooks"))
    parser.add_argument("--limit", type=int, default=int(os.environ.get("VTPRUNE_NOTEBOOK_LIMIT", "400")))
    parser.add_argument("--runs", default=None, help="keep the notebooks' sweep cells here (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the kernel (default 1: steadier timings)")
    args = parser.parse_args(argv)
    render_all(args.names, args.out, args.limit, args.runs, args.threads)
    print("wrote", os.path.join(args.out, "README.md"))


if __name__ == "__main__":
    sys.exit(main())
