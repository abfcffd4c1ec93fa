"""The contract between the session (``vtprune.runtime.session``) and its stage runtimes."""

from __future__ import annotations


class StageRuntime:
    """One stage of a wrap: what a kind of method does to every call of the language model.

    The session calls ``install()`` once (the hook handles it returns are removed by ``unwrap``),
    ``begin_call(call)`` before every language-model call (a ``vtprune.runtime.records.Call``, which the runtime
    may change), ``end_call(call, output)`` after it (a replacement output, or None to keep it),
    ``stats()`` for ``vtprune.stats`` (``{section: {...}}``) and ``remove()`` when unwrapped.  Each does
    nothing by default, so a runtime defines only the steps it takes: the pre-LLM cut
    (``vtprune.runtime.precut``), the size bias (``vtprune.runtime.size_bias``), the in-LLM exit (``vtprune.runtime.exit``) and the
    attention methods' runtimes (``vhr``, ``var``, ``zerotuning``, beside their configs).
    """

    def install(self) -> list:
        return []

    def begin_call(self, call):
        """Before a language-model call."""

    def end_call(self, call, output):
        """After it: a replacement output, or None."""
        return None

    def stats(self) -> dict:
        return {}

    def remove(self):
        """Undo what ``install`` did beyond its hook handles."""
