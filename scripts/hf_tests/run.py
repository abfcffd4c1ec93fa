"""Run transformers' own model tests of the supported families stock, then with every model wrapped.

    python scripts/hf_tests/run.py TRANSFORMERS_DIR [--spec random:keep=1.0] [--families llava,qwen3_vl] [-n 2] [-k EXPR]

``TRANSFORMERS_DIR`` is a checkout of the transformers repository at the revision of the installed
release (its ``tests/``, ``utils/`` and ``conftest.py``; nothing of it is copied here).  transformers'
test tree needs ``pytest-xdist`` (its conftest uses an xdist hook), ``parameterized``, ``requests`` and
``httpx`` (imported by its test utilities).  Where the
exact revision cannot be had, a tree of model tests from an earlier revision with the installed
release's common test files (its sdist has them) compares just as well: stock and wrapped run on the
same tree, so a test that a newer library breaks fails in both (README, "Drop-in").  Both runs
write JUnit XML under ``--out`` (default ``hf_tests_out/``); the script prints per family the
tests passed / failed / skipped in each run and every test whose outcome differs, and exits 1 when
a test that passes stock does not pass wrapped.  The wrapping is done by ``vtprune_hf_plugin.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
            "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "gemma3", "glm4v", "gemma4")
HERE = Path(__file__).resolve().parent


def outcomes(xml_path: Path) -> dict:
    """``{test id: "passed" | "failed" | "skipped"}`` from a JUnit XML report."""
    result = {}
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            result[name] = "failed"
        elif "skipped" in tags:
            result[name] = "skipped"
        else:
            result[name] = "passed"
    return result


def run(tests_dir: Path, families, out: Path, label: str, spec, workers: int, extra) -> dict:
    files = [f"tests/models/{f}/test_modeling_{f}.py" for f in families]
    xml = out / f"{label}.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *files, *extra]
    if workers > 1:
        cmd[4:4] = ["-n", str(workers)]
    env = dict(os.environ)
    if spec is not None:
        cmd[3:3] = ["-p", "vtprune_hf_plugin"]
        env["VTPRUNE_HF_WRAP"] = spec
        env["VTPRUNE_HF_TALLY"] = str(out / f"{label}.tally")
        (out / f"{label}.tally").unlink(missing_ok=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    with open(out / f"{label}.log", "w") as log:
        subprocess.run(cmd, cwd=tests_dir, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return outcomes(xml)


def family_of(test_id: str) -> str:
    for f in sorted(FAMILIES, key=len, reverse=True):
        if f".{f}.test_modeling_{f}" in test_id:
            return f
    return "?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("transformers_dir", type=Path)
    parser.add_argument("--spec", default="random:keep=1.0", help="the wrap, as `vtprune eval` specs it")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--out", type=Path, default=Path("hf_tests_out"))
    parser.add_argument("-n", "--workers", type=int, default=1, help="pytest-xdist workers")
    parser.add_argument("--reuse-stock", action="store_true", help="read the stock report of an earlier run")
    parser.add_argument("-k", dest="select", help="pytest -k expression (e.g. generate)")
    args = parser.parse_args(argv)
    args.pytest_args = ["-k", args.select] if args.select else []
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - set(FAMILIES)
    if unknown:
        parser.error(f"unknown families {sorted(unknown)}; choose from {', '.join(FAMILIES)}")
    if not (args.transformers_dir / "tests" / "test_modeling_common.py").is_file():
        parser.error(f"{args.transformers_dir} is not a transformers checkout (no tests/test_modeling_common.py)")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    if args.reuse_stock and (out / "stock.xml").is_file():
        stock = outcomes(out / "stock.xml")
    else:
        stock = run(args.transformers_dir, families, out, "stock", None, args.workers, args.pytest_args)
    wrapped = run(args.transformers_dir, families, out, "wrapped", args.spec, args.workers, args.pytest_args)
    tally = out / "wrapped.tally"
    count = sum(int(line) for line in tally.read_text().split()) if tally.is_file() else 0
    print(f"models wrapped by the plugin ({args.spec}): {count}")
    if count == 0:
        print("the plugin wrapped no model: nothing was compared")
        return 1

    print(f"\n{'family':<12} {'stock pass/fail/skip':>22} {'wrapped pass/fail/skip':>24}")
    for family in families:
        s = Counter(v for k, v in stock.items() if family_of(k) == family)
        w = Counter(v for k, v in wrapped.items() if family_of(k) == family)
        print(f"{family:<12} {s['passed']:>8}/{s['failed']}/{s['skipped']:<9} {w['passed']:>10}/{w['failed']}/{w['skipped']}")
    regressions = sorted(k for k, v in stock.items() if v == "passed" and wrapped.get(k) != "passed")
    gains = sorted(k for k, v in wrapped.items() if v == "passed" and stock.get(k) not in (None, "passed"))
    print(f"\nregressions (pass stock, not wrapped): {len(regressions)}")
    for name in regressions:
        print(f"  {name}: {wrapped.get(name, 'missing')}")
    if gains:
        print(f"pass wrapped only: {len(gains)}")
        for name in gains:
            print(f"  {name}: stock {stock[name]}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
