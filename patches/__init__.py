"""Family adapters (installed as ``vtprune.patches``): one per supported model class."""

if __name__ == "vtprune.patches":
    from .registry import ADAPTERS, Adapter, adapter_for, adapters, register_adapter, supported

    __all__ = ["ADAPTERS", "Adapter", "adapter_for", "adapters", "register_adapter", "supported"]
else:  # a checkout's root on sys.path, imported as a top-level `patches`: the name is not ours
    import runpy, pathlib  # noqa: E401

    runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "vtprune" / "toplevel.py"), {"NAME": __name__})
