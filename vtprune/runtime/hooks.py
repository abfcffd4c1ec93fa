"""What a runtime installs on a model, so that ``remove`` takes exactly that away: hook handles and
instance attributes that wrap a method (never a class attribute, never modelling code)."""

from __future__ import annotations

import functools


class Installed:
    def __init__(self):
        self.handles = []
        self.patched = []  # (object, attribute name)

    def add(self, *handles):
        self.handles.extend(handles)

    def wrap(self, obj, name, make, default=None):
        """Set ``obj.name`` (an instance attribute) to ``make(original)``."""
        if name in vars(obj):
            raise ValueError(f"{type(obj).__name__}.{name} is already patched on this instance; "
                             "vtprune cannot wrap a model another tool has patched the same way")
        setattr(obj, name, make(getattr(obj, name, default)))
        self.patched.append((obj, name))

    def after(self, obj, name, after, before=None, failed=None):
        """Wrap method ``obj.name``: ``before(args, kwargs)``, the call, ``after(args, kwargs, out)`` (or
        ``failed()`` when the call raises)."""
        def make(original):
            @functools.wraps(original)
            def patched(*args, **kwargs):
                if before is not None:
                    before(args, kwargs)
                try:
                    out = original(*args, **kwargs)
                except BaseException:
                    if failed is not None:
                        failed()
                    raise
                after(args, kwargs, out)
                return out

            return patched

        self.wrap(obj, name, make)

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for obj, name in self.patched:
            if name in vars(obj):
                delattr(obj, name)
        self.patched.clear()
