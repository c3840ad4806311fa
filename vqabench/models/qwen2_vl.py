"""Qwen2-VL (and the base of Qwen2.5-VL): a ViT over 14-pixel patches; its merger projects 2x2 of them to a token.

What differs from the shared causal VLM: the pixels are cut into the processor's flat patch
layout (``Qwen2VLImageProcessorPil.patchify``: merge windows together, each patch repeated
over the two temporal slots a still image fills); the projector is the tower's own
``merger``, so the features are the tower's blocks' output; positions are M-RoPE
(``get_rope_index`` from the image-token types and the image grid). Qwen2.5-VL's blocks see
patches in window order (``qwen2_5_vl.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from vqabench.models.causal import CausalVLMFamily, base_model, part
from vqabench.models.family import ImageFormat, LoadedModel
from vqabench.models.registry import Variant
from vqabench.models.tokenizers import train_byte_bpe

#: The image statistics of Qwen2-VL's preprocessor_config.json (OpenAI CLIP's).
QWEN_MEAN = (0.48145466, 0.4578275, 0.40821073)
QWEN_STD = (0.26862954, 0.26130258, 0.27577711)

QWEN_SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "eos_token": "<|im_end|>",
    "turn_start": "<|im_start|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
}
#: Qwen2-VL-Instruct's chat template for one user turn of images and text (videos left out).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, C, S, S]`` → the tower's flat patches ``[B*g*g, C*temporal*patch²]`` and each image's grid ``[B, 3]``."""
    b, c, side, _ = pixels.shape
    g = side // patch
    x = pixels.reshape(b, c, g // merge, merge, patch, g // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (b, gh, gw, mh, mw, c, ph, pw)
    x = x.unsqueeze(6).expand(*x.shape[:6], temporal, patch, patch)
    grid = torch.tensor([[1, g, g]] * b, device=pixels.device)
    return x.reshape(b * g * g, c * temporal * patch * patch), grid


class Qwen2VLFamily(CausalVLMFamily):
    name = "qwen2-vl"
    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    vision_tower_path = "model.visual"
    projector_path = "model.visual.merger"
    image_placeholder = "<|image_pad|>"
    end_of_answer = "<|im_end|>"
    #: The tiny variant's vision sizes (the keys differ between Qwen2-VL and Qwen2.5-VL).
    tiny_vision: ClassVar[dict[str, Any]] = {"embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2}

    def vision_width(self, vision: Any) -> int:
        return int(vision.embed_dim)

    def vision_parts(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The tower without its merger (the projector, which ``lm+projector`` trains)."""
        visual = part(model, self.vision_tower_path)
        return [(f"{self.vision_tower_path}.{n}", getattr(visual, n)) for n in ("patch_embed", "blocks")]

    def vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        visual = part(model, self.vision_tower_path)
        vision = visual.config
        flat, grid = patchify(pixels, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        hidden = self.image_order(visual, visual(flat.to(visual.dtype), grid_thw=grid).last_hidden_state, grid)
        return hidden.reshape(pixels.shape[0], -1, hidden.shape[-1])

    def image_order(self, visual: Any, hidden: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The blocks' output in the processor's patch order (Qwen2-VL keeps it)."""
        return hidden

    def project(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        merged: torch.Tensor = part(model, self.projector_path)(features.reshape(-1, features.shape[-1]))
        return merged.reshape(features.shape[0], -1, merged.shape[-1])

    def image_token_count(self, config: Any, image_size: int) -> int:
        vision = config.vision_config
        return int((image_size // vision.patch_size) ** 2 // vision.spatial_merge_size**2)

    def features_shape_for(self, config: Any, image_size: int) -> tuple[int, ...]:
        vision = config.vision_config
        return ((image_size // vision.patch_size) ** 2, self.vision_width(vision))

    def default_image_size(self, config: Any, preprocessor: dict[str, Any]) -> int:
        """448 (a multiple of patch x merge), shrunk or grown into the processor's pixel bounds."""
        vision = config.vision_config
        unit = vision.patch_size * vision.spatial_merge_size
        low = math.isqrt(int(preprocessor.get("min_pixels", unit * unit))) // unit + 1
        high = max(1, math.isqrt(int(preprocessor.get("max_pixels", 448 * 448))) // unit)
        return unit * min(max(448 // unit, low), high)

    def stated_image_tokens(self, config: Any, name_or_path: str, image_size: int) -> dict[str, int]:
        """The processor's own patch and merge sizes give a count too (a mismatch breaks the merger's input)."""
        from vqabench.models.causal import _read_json

        stated = super().stated_image_tokens(config, name_or_path, image_size)
        processor = _read_json(name_or_path, "preprocessor_config.json")
        if "patch_size" in processor or "merge_size" in processor:
            patch = int(processor.get("patch_size", config.vision_config.patch_size))
            merge = int(processor.get("merge_size", config.vision_config.spatial_merge_size))
            stated["preprocessor_config.json patch_size/merge_size"] = (image_size // patch) ** 2 // merge**2
        return stated

    def position_ids(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """M-RoPE positions ``[3, B, L]``: the image's tokens on its grid, text after it from the grid's far corner."""
        base = base_model(model)
        image = ids == self.image_token_id(base.config)
        side = math.isqrt(int(image[0].sum())) * base.config.vision_config.spatial_merge_size
        grid = torch.tensor([[1, side, side]] * ids.shape[0], device=ids.device)
        positions, _ = base.model.get_rope_index(
            ids, mm_token_type_ids=image.int(), image_grid_thw=grid, attention_mask=mask
        )
        return positions


FAMILY = Qwen2VLFamily()


def qwen_tokenizer(texts: Iterable[str] | None) -> Any:
    return train_byte_bpe(texts or (), special_tokens=QWEN_SPECIAL_TOKENS, chat_template=QWEN_CHAT_TEMPLATE)


def tiny_config(family: Qwen2VLFamily, tokenizer: Any) -> Any:
    """A few-hundred-thousand-parameter config: one vision block, two decoder layers, a 56-pixel image (4 tokens)."""
    import transformers

    vision = {"depth": 1, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,
    }
    config_class = getattr(transformers, family.model_class.replace("ForConditionalGeneration", "Config"))
    return config_class(vision_config=vision | family.tiny_vision, text_config=text, **token_ids(tokenizer))


def token_ids(tokenizer: Any) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def build(family: Qwen2VLFamily, config: Any, tokenizer: Any, size: int, seed: int, origin: str) -> LoadedModel:
    torch.manual_seed(seed)
    model = family.transformers_class()(config).eval()
    image = ImageFormat(size, QWEN_MEAN, QWEN_STD)
    return family.make_loaded(model, tokenizer, image, f"{origin} (random weights)", {"model": origin, "seed": seed})


def tiny_builder(family: Qwen2VLFamily, name: str) -> Any:
    def make(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
        tokenizer = tokenizer or qwen_tokenizer(texts)
        return build(family, tiny_config(family, tokenizer), tokenizer, 56, seed, name)

    return make


def asset_qwen_config(family: Qwen2VLFamily, filename: str, tokenizer: Any) -> Any:
    """A released checkpoint's architecture (``assets/<filename>``) with this tokenizer's token ids."""
    import transformers

    from vqabench.models.causal import asset_config

    values = asset_config(filename)
    values["text_config"]["pad_token_id"] = tokenizer.pad_token_id
    values["text_config"]["eos_token_id"] = tokenizer.eos_token_id
    values["text_config"]["bos_token_id"] = None
    config_class = getattr(transformers, family.model_class.replace("ForConditionalGeneration", "Config"))
    return config_class(**(values | token_ids(tokenizer)))


def real_size_builder(family: Qwen2VLFamily, filename: str, name: str) -> Any:
    """A real-size variant: the asset's architecture, random weights, 448x448 images (256 image tokens)."""

    def make(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
        tokenizer = tokenizer or qwen_tokenizer(texts)
        return build(family, asset_qwen_config(family, filename, tokenizer), tokenizer, 448, seed, name)

    return make


VARIANTS = (
    Variant(
        "qwen2-vl-tiny-random",
        "qwen2-vl",
        "a tiny Qwen2-VL (random weights, tokenizer trained on the run's text) for tests",
        tiny_builder(FAMILY, "qwen2-vl-tiny-random"),
        needs_texts=True,
    ),
    Variant(
        "qwen2-vl-2b-random",
        "qwen2-vl",
        "Qwen/Qwen2-VL-2B-Instruct's architecture, random weights, 448x448 images (256 image tokens)",
        real_size_builder(FAMILY, "qwen2-vl-2b-instruct.json", "qwen2-vl-2b-random"),
        needs_texts=True,
        real_size=True,
    ),
    Variant(
        "qwen2-vl-7b-random",
        "qwen2-vl",
        "Qwen/Qwen2-VL-7B-Instruct's architecture, random weights, 448x448 images (256 image tokens)",
        real_size_builder(FAMILY, "qwen2-vl-7b-instruct.json", "qwen2-vl-7b-random"),
        needs_texts=True,
        real_size=True,
    ),
)
