"""The checkout's top-level folders never shadow an installed package of the same name.

``python -m pytest`` (and any ``python -m`` or notebook started at the root) puts the root first on
``sys.path``.  transformers 5.25 depends on Hugging Face's ``kernels`` and imports it; our
``kernels/`` folder (installed as ``vtprune.kernels``) must not answer that import.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = sorted(p.name for p in ROOT.iterdir()
                 if p.is_dir() and not p.name.startswith((".", "_")) and any(p.glob("*.py")) and p.name != "vtprune")

PROBE = """
import importlib, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        out[name] = {"error": str(e)}
        continue
    out[name] = {"file": getattr(module, "__file__", None), "path": list(getattr(module, "__path__", []) or []),
                 "owner": getattr(module, "OWNER", None)}
import vtprune.kernels, vtprune.patches, vtprune.eval.sweep  # ours still import under their own names
out["ours"] = [vtprune.kernels.gather_seq.__module__, vtprune.patches.adapter_for.__module__]
print(json.dumps(out))
"""


def probe(names, pythonpath=None) -> dict:
    """Import ``names`` in a fresh interpreter started at the root (its first ``sys.path`` entry)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", PROBE, *names], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out.pop("ours") == ["vtprune.kernels.dispatch", "vtprune.patches.registry"]
    return out


def inside(path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(ROOT)


def test_the_folders_that_hold_code_are_checked():
    assert {"kernels", "patches", "eval", "scripts", "tests"} <= set(FOLDERS)


def test_a_package_installed_under_a_folder_name_wins(tmp_path):
    """An installed package named like each top-level folder (here: fakes later on ``sys.path``) is
    what ``import NAME`` gives at the root, submodules included."""
    for name in FOLDERS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"OWNER = 'elsewhere'\nfrom .part import PART\n")
        (tmp_path / name / "part.py").write_text(f"PART = {name!r}\n")
    out = probe(FOLDERS, pythonpath=tmp_path)
    for name in FOLDERS:
        assert out[name]["owner"] == "elsewhere", (name, out[name])
        assert Path(out[name]["file"]).parent == tmp_path / name


def test_without_an_owner_no_code_of_ours_runs_under_a_top_level_name():
    """What transformers' availability checks import to read a version (``import_module("kernels")``
    when the distribution has no metadata) must not run our package: an empty namespace, no file."""
    out = probe(FOLDERS)
    owners = importlib.metadata.packages_distributions()
    for name in FOLDERS:
        if name in owners:
            continue
        assert "error" not in out[name], (name, out[name])
        assert out[name]["file"] is None, (name, out[name])  # a namespace: no __init__ of ours ran


@pytest.mark.parametrize("name", FOLDERS)
def test_installed_distributions_are_not_shadowed(name):
    """Against what is installed here (``kernels`` with transformers >= 5.25, ``tests`` with lmms-eval)."""
    owners = importlib.metadata.packages_distributions()
    if name not in owners:
        pytest.skip(f"no installed distribution provides {name!r} here")
    out = probe([name])[name]
    assert "error" not in out, out
    assert not inside(out["file"]), f"{name!r} imported from the checkout ({out['file']}), not from {owners[name]}"


def _import_graph(root: Path) -> dict:
    """``{module: modules it imports}`` over vtprune's own modules (installed names), function-level
    imports included: a module imported by name counts as that module, not its package."""
    tops = {"vtprune": root / "vtprune", "vtprune.patches": root / "patches", "vtprune.kernels": root / "kernels",
            "vtprune.eval": root / "eval"}
    files = {}
    for package, folder in tops.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if package == "vtprune" and parts[0] in ("patches", "kernels", "eval", "assets"):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([package] + parts)] = path
    graph = {}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != module:
                    deps.add(target)
        graph[module] = deps
    return graph


def test_no_import_circles():
    """No module of vtprune imports, directly or through others, a module that imports it (lazy imports
    inside functions count too)."""
    graph = _import_graph(ROOT)
    assert len(graph) > 60 and graph["vtprune.api"]
    circles, seen = [], set()
    for start in graph:  # a path back to ``start``
        stack, visited = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start and frozenset(path) not in seen:
                    seen.add(frozenset(path))
                    circles.append(path)
                elif nxt not in visited:
                    visited.add(nxt)
                    stack.append((nxt, path + [nxt]))
    assert circles == []


def test_no_class_over_250_lines():
    """Small pieces: every class of the library fits in 250 lines."""
    long = []
    for folder in ("vtprune", "patches", "kernels", "eval"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
                    long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


def test_every_package_is_installed():
    """Every package folder of the library is listed in setup.cfg (a non-editable install would lack it)."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {".".join(("vtprune",) + p.parent.relative_to(ROOT / "vtprune").parts).rstrip(".")
             for p in (ROOT / "vtprune").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)


def test_module_names_say_what_they_hold():
    """No two modules of the library share a name, except a family's own modules (its description in
    ``vtprune/families/``, its HF adapter in ``patches/``, its vLLM binding in ``vtprune/serving/``) and the
    packages' ``base.py``."""
    from collections import Counter

    from vtprune import families

    stems = Counter(p.stem for folder in ("vtprune", "patches", "kernels", "eval")
                    for p in (ROOT / folder).rglob("*.py"))
    family_modules = set(families.known()) | {p.stem for p in (ROOT / "vtprune" / "families").glob("*.py")}
    shared = {stem for stem, n in stems.items() if n > 1}
    assert shared - family_modules - {"__init__", "base"} == set()
