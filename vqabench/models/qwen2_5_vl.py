"""Qwen2.5-VL: Qwen2-VL's layout with a windowed vision tower (RMSNorm, SwiGLU) and an MLP merger.

Its blocks see the patches in window order and its own forward restores image order after
the merger; here the features are put back in image order first, so the merger (the
projector) reads them exactly as Qwen2-VL's does and everything else is inherited.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from vqabench.models.qwen2_vl import Qwen2VLFamily, real_size_builder, tiny_builder
from vqabench.models.registry import Variant


class Qwen25VLFamily(Qwen2VLFamily):
    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    tiny_vision: ClassVar[dict[str, Any]] = {
        "hidden_size": 32,
        "out_hidden_size": 64,
        "intermediate_size": 64,
        "fullatt_block_indexes": [0],
    }

    def vision_width(self, vision: Any) -> int:
        return int(vision.hidden_size)

    def image_order(self, visual: Any, hidden: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Undo the window order the blocks worked in (merge windows of spatial_merge_size² patches move whole)."""
        from transformers.vision_utils import get_vision_window_index

        vision = visual.config
        window, _ = get_vision_window_index(grid, vision.spatial_merge_size, vision.window_size, vision.patch_size)
        unit = vision.spatial_merge_size**2
        return hidden.reshape(-1, unit, hidden.shape[-1])[torch.argsort(window)].reshape(hidden.shape)


FAMILY = Qwen25VLFamily()


VARIANTS = (
    Variant(
        "qwen2.5-vl-tiny-random",
        "qwen2.5-vl",
        "a tiny Qwen2.5-VL (random weights, tokenizer trained on the run's text) for tests",
        tiny_builder(FAMILY, "qwen2.5-vl-tiny-random"),
        needs_texts=True,
    ),
    Variant(
        "qwen2.5-vl-3b-random",
        "qwen2.5-vl",
        "Qwen/Qwen2.5-VL-3B-Instruct's architecture, random weights, 448x448 images (256 image tokens)",
        real_size_builder(FAMILY, "qwen2.5-vl-3b-instruct.json", "qwen2.5-vl-3b-random"),
        needs_texts=True,
        real_size=True,
    ),
)
