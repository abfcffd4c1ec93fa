"""Qwen3.5 (``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``): Qwen3-VL's tower and
token layout without deepstack, and a language model whose linear-attention (Gated DeltaNet) layers alternate
with full-attention ones.

A linear-attention layer reads every token of the sequence into a recurrent state: a token masked out of
attention still changes it.  So a cut sequence is the stock model fed only the kept tokens (their features,
their original (t, h, w) positions), not the stock model with the dropped tokens masked; the tests compare
against the former (``tests/test_qwen3_5.py``).  The padding slots the cut puts before a row's tokens are zero
inputs to those layers, as left padding is.  In-LLM exits cannot remove a token from a recurrent state: they
raise here.
"""

from __future__ import annotations

from vtprune.families.qwen_vl import QWEN3_5, QWEN3_5_MOE

from .qwen_vl import QwenVLAdapter


class Qwen35Adapter(QwenVLAdapter):
    facts = QWEN3_5

    def exit_refusal(self):
        return (f"{self.family}'s linear-attention layers carry every token in a recurrent state, from which a token "
                "cannot leave: use a pre-LLM method (e.g. fastervlm, divprune) on it")


class Qwen35MoeAdapter(Qwen35Adapter):
    facts = QWEN3_5_MOE
