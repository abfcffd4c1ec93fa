"""Evaluation (installed as ``vtprune.eval``): the lmms-eval plugin and ``vtprune eval`` live here."""

if __name__ != "vtprune.eval":  # a checkout's root on sys.path, imported as a top-level `eval`: the name is not ours
    import runpy, pathlib  # noqa: E401

    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "vtprune" / "toplevel.py"), {"NAME": __name__})
