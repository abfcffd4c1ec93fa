"""What a wrap attaches to a model: the session (``session.py``) and its stage runtimes behind one contract
(``stage.py``): the pre-LLM cut (``precut.py``, with ``selection.py`` and ``cut.py``), the size bias
(``size_bias.py``), the in-LLM exit (``exit.py``, ``exit_inputs.py``); around them the tower capture
(``capture.py``), ``generate``'s bookkeeping (``generation.py``), the loss (``loss.py``), the counts
(``counts.py``), one state per KV cache (``sequences.py``), masks (``masks.py``), hooks (``hooks.py``) and
the typed records (``records.py``).  Nothing here is public API: ``vtprune.wrap`` and its siblings are."""
