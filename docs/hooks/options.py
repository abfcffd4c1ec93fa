"""MkDocs hook: ``<!-- options: NAME [NAME ...] -->`` on a page becomes, for each method, its paper and a
table of its options (default, valid values) read from the registry (``vtprune.spec.describe``), so the
method pages list what ``vtprune info --method NAME`` prints and cannot fall behind the code."""

import re

MARKER = re.compile(r"^<!-- options: ([\w ]+) -->$", re.M)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(name: str) -> str:
    from vtprune.spec import describe

    d = describe(name)
    lines = [f"### `{name}`", "", f"{d['summary']}", ""]
    if d["paper"]:
        lines += [f"Paper: {d['paper']}.", ""]
    lines += ["| option | default | valid values |", "|---|---|---|"]
    lines += [f"| `{o['name']}` | `{o['default']!r}` | {_cell(o['range']) or '–'} |" for o in d["options"]]
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown, page, config, files):
    return MARKER.sub(lambda m: "\n".join(table(n) for n in m.group(1).split()), markdown)
