"""GLM-4.1V in vLLM with vtprune's pre-LLM selection: the Qwen binding (``vtprune.serving.qwen``), whose layout, rows,
tower tap and positions GLM shares — (t, h, w) mrope positions, 2 x 2 patch groups merged before the projector,
no [CLS].  vLLM's GLM numbers a prompt's positions from each image's placeholder span and asserts that it holds the
whole grid: the binding numbers the prompt with each image's grid restored (``qwen.restored_media``), and
``recompute_mrope_positions`` (``vtprune.serving.mrope``, as on Qwen) then puts the kept
tokens at their (t, h, w) positions and the text after the image at its unpruned ones.  Images only: vLLM refuses
video requests for a served GLM model (``limit_mm_per_prompt`` video 0)."""

from __future__ import annotations

import functools

from ..families.glm4v import GLM4V
from .bindings import bind
from .qwen import pruned_qwen

bind(GLM4V)(functools.partial(pruned_qwen, model_type="glm4v"))
