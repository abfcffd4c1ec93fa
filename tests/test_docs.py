"""The documentation site (``mkdocs.yml``, ``docs/``): it builds with warnings as errors, and every code
block on it runs here, or says on the line before it why it does not (``<!-- not run: reason -->``).

A Python block runs in a fresh namespace that holds ``model`` and ``processor`` (the toy LLaVA) for the
blocks that wrap "your model"; a block that downloads from the hub gets the toy model in place of the
hub's (same class), and a block that needs vLLM, which the main venv lacks, is bound to the signature of
what it calls. A ``vtprune`` command on the toy runs through the CLI with ``--limit`` small.
The notebooks' pages are left to ``tests/test_notebooks.py``, which executes the notebooks."""

import contextlib
import importlib.util
import io
import pathlib
import re
import shlex
import subprocess
import sys
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"(?:^<!-- (not run[^:]*): (.+?) -->\n)?^```(\w+)\n(.*?)^```", re.M | re.S)


def blocks(language=None):
    """``(page, line, language, code, reason_not_run)`` for every fenced block outside ``docs/notebooks``."""
    found = []
    for page in sorted(DOCS.rglob("*.md")):
        rel = page.relative_to(DOCS).as_posix()
        if rel.startswith("notebooks/"):
            continue
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            if language in (None, m.group(3)):
                line = text[:m.start(3)].count("\n") + 1
                found.append((rel, line, m.group(3), m.group(4), m.group(2)))
    return found


def _ids(found):
    return [f"{page}:{line}" for page, line, *_ in found]


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: no broken link or anchor, no page outside the nav, the API reference
    rendered from the docstrings."""
    if importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is missing: pip install -e '.[dev]' (the docs extra is part of it)")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], capture_output=True, text=True, cwd=ROOT,
                         env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "Patch <code>model</code> in place" in api and "did_you_mean" in api
    assert (tmp_path / "site" / "guide" / "index.html").exists()


def test_every_method_has_its_options_on_one_method_page():
    """Each registered method's options table is generated on exactly one page of docs/methods (the
    ``<!-- options: ... -->`` marker, expanded by docs/hooks/options.py), and the methods index names it."""
    import vtprune

    listed = []
    for page in sorted((DOCS / "methods").glob("*.md")):
        for names in re.findall(r"^<!-- options: ([\w ]+) -->$", page.read_text(encoding="utf-8"), re.M):
            listed += names.split()
    assert sorted(listed) == sorted(vtprune.methods.available())
    index = (DOCS / "methods" / "index.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in index for name in vtprune.methods.available())
    sys.path.insert(0, str(DOCS / "hooks"))
    try:
        import options
    finally:
        sys.path.remove(str(DOCS / "hooks"))
    text = options.on_page_markdown("<!-- options: fastv pool -->", None, None, None)
    assert "### `fastv`" in text and "| `layer` | `2` |" in text and "### `pool`" in text


def test_every_block_is_run_or_says_why_not():
    languages = {language for _, _, language, _, _ in blocks()}
    assert languages <= {"python", "bash"}, languages
    for page, line, language, code, reason in blocks():
        if reason is None and language == "bash":
            assert all(c.startswith("vtprune ") and "--model toy" in c for c in _commands(code)), \
                f"{page}:{line}: a shell block that is not a toy vtprune command needs <!-- not run: reason -->"


def _commands(code):
    return [c for c in code.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


@contextlib.contextmanager
def _hub_stand_ins(monkeypatch):
    """``from_pretrained`` of the toy's classes returns the toy model, and ``requests.get`` a toy image."""
    import requests
    import transformers

    from vtprune import toy

    loaded, loaded_processor = toy.load()

    def model(cls, name, dtype=None, **kw):
        return loaded.to(dtype) if dtype is not None else loaded

    def processor(cls, name, **kw):
        return loaded_processor

    class Response:
        def __init__(self):
            self.raw = io.BytesIO()
            toy.eval_split(n=1)[0]["image"].save(self.raw, format="PNG")
            self.raw.seek(0)

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", classmethod(model))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(processor))
    monkeypatch.setattr(requests, "get", lambda *a, **k: Response())
    yield


@contextlib.contextmanager
def _vllm_stand_in(monkeypatch):
    """``vtprune.serving.LLM`` bound to its signature and checked as it checks before loading vLLM."""
    import inspect

    import vtprune.serving as serving

    real = serving.LLM
    calls = []

    def bound(*args, **kwargs):
        call = inspect.signature(real).bind(*args, **kwargs)
        call.apply_defaults()
        model_type = {"toy-video": "qwen3_vl"}.get(call.arguments["model"], "llava")
        config = serving.check(call.arguments["method"], call.arguments["keep"], {}, model_type)
        calls.append(call.arguments)

        def generate(requests, *rest, **options):  # each request's own budget checked as the processor checks it
            for request in requests:
                assert request["multi_modal_data"]
                request_keep.parse(config, request.get("mm_processor_kwargs", {}).get(request_keep.KEY))
            return []

        return types.SimpleNamespace(generate=generate)

    from vtprune.serving import request_keep

    monkeypatch.setattr(serving, "LLM", bound)
    yield calls
    assert calls, "the block never called vtprune.serving.LLM"


@pytest.mark.parametrize("page,line,language,code,reason", blocks("python"), ids=_ids(blocks("python")))
def test_python_block_runs(page, line, language, code, reason, monkeypatch, registries, capsys):
    import vtprune
    from vtprune import toy

    assert reason is None, f"{page}:{line} is marked not run ({reason}): every Python block runs"
    model, processor = toy.load()
    scope = {"model": model, "processor": processor, "__name__": "docs_block"}
    with contextlib.ExitStack() as stack:
        if "from_pretrained" in code:
            stack.enter_context(_hub_stand_ins(monkeypatch))
        if "vtprune.serving import LLM" in code:
            stack.enter_context(_vllm_stand_in(monkeypatch))
        try:
            exec(compile(code, f"docs/{page}:{line}", "exec"), scope)
        finally:
            for value in list(scope.values()) + [model]:
                if isinstance(value, __import__("torch").nn.Module) and vtprune.is_wrapped(value):
                    vtprune.unwrap(value)


@pytest.mark.parametrize("page,line,language,code,reason",
                         [b for b in blocks("bash") if b[4] is None], ids=_ids([b for b in blocks("bash") if b[4] is None]))
def test_toy_command_runs(page, line, language, code, reason, tmp_path, capsys):
    from vtprune.cli import main

    for command in _commands(code):
        args = shlex.split(command)[1:]
        if args[0] == "eval":
            args += ["--limit", "8", "--out", str(tmp_path / "eval")]
        assert main(args) == 0, command
    assert capsys.readouterr().out
