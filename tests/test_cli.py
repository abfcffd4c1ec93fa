"""The command line: info, demo (on the shipped toy model, or an untrained one if weights are absent)."""

import os

from PIL import Image

from vtprune.cli import main


def test_info_lists_families_methods_and_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("transformers", "kernels", "llava_next", "qwen3_vl", "fastervlm", "dyvte", "vhr"):
        assert word in out


def test_info_gives_each_method_a_whole_sentence(capsys):
    """Each method's line is the first sentence of its summary, wrapped, never cut (``pdrop`` and
    ``sparsevlm`` once stopped mid-sentence)."""
    import re

    import vtprune
    from vtprune.spec import describe, headline

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    listing = " ".join(out[out.index("methods ("):].split())
    for name in vtprune.methods.available():
        sentence = headline(name)
        assert sentence.endswith((".", ")")) and describe(name)["summary"].startswith(sentence), name
        assert re.search(re.escape(name) + r" " + re.escape(" ".join(sentence.split())), listing), name
    assert "PyramidDrop, CVPR 2025" in listing and "SparseVLM, ICML 2025" in listing
    assert all(len(line) <= 100 for line in out.splitlines() if line.startswith("  "))


def test_help_without_command(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_demo_writes_png(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--keep", "1.0,0.1", "--n", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert os.path.exists(out)
    with Image.open(out) as image:
        assert image.width > 2 * image.height  # the input and one panel per budget side by side
    assert "keep=0.1" in text and "correct" in text


def test_demo_video_writes_png(tmp_path, capsys):
    out = tmp_path / "demo_video.png"
    assert main(["demo", "--video", "--keep", "1.0,0.1", "--n", "5", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    with Image.open(out) as image:
        assert image.width > 2 * image.height  # one row per run, one column per temporal slice
    assert "trained toy video model" in text and "event questions" in text
    rows = [line.split() for line in text.splitlines() if line.startswith(("keep=1.0 ", "keep=0.1 "))]
    assert [float(r[1]) for r in rows] == [128.0, 16.0]  # per clip the LLM saw: evs keeps a whole slice at least
