"""GLM-4.1V in vLLM with vtprune's pre-LLM selection: the Qwen binding (``vtprune.serving.qwen``), whose layout, rows,
tower tap and positions GLM shares — (t, h, w) mrope positions, 2 x 2 patch groups merged before the projector,
no [CLS].  Two things differ.  vLLM's GLM numbers a prompt's positions from each image's placeholder span and
asserts that it holds the whole grid: here the first numbering reads the image's grid only, and
``recompute_mrope_positions`` (EVS's, as on Qwen, keyed on GLM's ``image_start_token_id``) then puts the kept
tokens at their (t, h, w) positions and the text after the image at its unpruned ones.  Images only: vLLM refuses
video requests for a served GLM model (``limit_mm_per_prompt`` video 0)."""

from __future__ import annotations

import functools

from ..families.glm4v import GLM4V
from .bindings import bind
from .qwen import pruned_qwen


class ImageGrids:
    """vLLM's ``iter_mm_grid_thw`` for images whose placeholders were cut: each image's (offset, t, h, w) on its
    merged-token grid, read off the grid, not off the (shorter) placeholder span."""

    def iter_mm_grid_thw(self, mm_features):
        merge = self.config.vision_config.spatial_merge_size
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise ValueError(f"vtprune serving prunes images; this GLM model was given a {feature.modality}")
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            yield feature.mm_position.offset, t, h // merge, w // merge


bind(GLM4V)(functools.partial(pruned_qwen, model_type="glm4v", mixin=ImageGrids))
