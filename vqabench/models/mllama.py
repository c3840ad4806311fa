"""Mllama (Llama 3.2 Vision): a tiled ViT whose output a Llama decoder reads through cross-attention layers.

What differs from the shared causal VLM: the prompt holds one ``<|image|>`` token, never
expanded; the image reaches the language model only through its cross-attention layers, which
read the projected vision states of every tile (``cross_attention_states``) under a mask letting
each token from ``<|image|>`` on see the image's tiles. vqabench's image is one square, so it
fills the first of ``max_num_tiles`` tiles (aspect ratio 1x1, id 1) and the other tiles are zeros,
as MllamaImageProcessor pads them. The features are the vision model's output for all tiles,
before the projector: ``[tiles, patches + 1, vision_output_dim]``. The embeddings are the plain
token embeddings; :meth:`run_language_model` projects the features and builds the masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vqabench.models.causal import (
    CLIP_MEAN,
    CLIP_STD,
    CausalVLMFamily,
    _cache_argument,
    _returned_cache,
    asset_config,
    base_model,
    part,
    vocabulary_size,
)
from vqabench.models.family import ImageFormat, LoadedModel, ModelError
from vqabench.models.registry import Variant
from vqabench.models.tokenizers import train_byte_bpe

IMAGE_TOKEN = "<|image|>"
END_OF_TURN = "<|eot_id|>"

MLLAMA_SPECIAL_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "pad_token": "<|finetune_right_pad_id|>",
    "header_start": "<|start_header_id|>",
    "header_end": "<|end_header_id|>",
    "turn_end": END_OF_TURN,
    "image_token": IMAGE_TOKEN,
}
#: Llama-3.2-11B-Vision's chat template for user turns of images and text (system turns and tools left out).
MLLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|image|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class MllamaFamily(CausalVLMFamily):
    name = "mllama"
    model_types = ("mllama",)
    model_class = "MllamaForConditionalGeneration"
    vision_tower_path = "model.vision_model"
    image_placeholder = IMAGE_TOKEN
    end_of_answer = END_OF_TURN

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_index)

    def vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The vision model's output for each square in the first tile, the other tiles padding: ``[B, T, P, D]``."""
        vision = part(model, self.vision_tower_path)
        inputs = tile_inputs(pixels.to(vision.dtype), vision.config.max_num_tiles)
        hidden: torch.Tensor = vision(**inputs).last_hidden_state
        return hidden[:, 0]

    def image_token_count(self, config: Any, image_size: int) -> int:
        """One ``<|image|>`` in the sequence: the image itself is read through cross-attention."""
        return 1

    def features_shape_for(self, config: Any, image_size: int) -> tuple[int, ...]:
        vision = config.vision_config
        return (int(vision.max_num_tiles), patch_count(config), int(vision.vision_output_dim))

    def default_image_size(self, config: Any, preprocessor: dict[str, Any]) -> int:
        return int(config.vision_config.image_size)

    def input_embeddings(self, model: nn.Module, ids: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The token embeddings alone (``<|image|>`` included): the features enter through cross-attention."""
        embeds: torch.Tensor = base_model(model).get_input_embeddings()(ids)
        return embeds

    def run_language_model(
        self,
        model: nn.Module,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        ids: torch.Tensor,
        cache: Any = None,
        use_cache: bool = False,
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """The text model reading the projected features by cross-attention, as MllamaModel's forward does.

        A pass without a cache reads the projected features (:meth:`image_embeddings`); the tokens
        from the row's ``<|image|>`` on see the first tile. A step on the cache (tokens after the
        prompt) reads the cached vision keys.
        """
        from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

        language_model = part(model, self.language_model_path)
        config = base_model(model).config
        tiles, per_tile = int(config.vision_config.max_num_tiles), patch_count(config)
        states = None
        if cache is None:
            if features is None:
                raise ModelError("an Mllama prompt pass needs the image features for its cross-attention.")
            projected = features.to(embeds.dtype)
            if tuple(projected.shape[1:3]) != (tiles, per_tile):
                raise ModelError(
                    f"the image features make {projected.shape[1]} tiles of {projected.shape[2]} positions but "
                    f"this model's cross-attention reads {tiles} tiles of {per_tile}; features must come from "
                    f"this model's vision model."
                )
            states = projected.reshape(projected.shape[0], -1, projected.shape[-1])
            sees = (ids == self.image_token_id(config)).long().cumsum(-1) > 0
        else:
            sees = torch.ones_like(ids, dtype=torch.bool)
        dense = torch.zeros(*ids.shape, 1, tiles, dtype=torch.long, device=ids.device)
        dense[..., 0, 0] = sees.long()
        cross_mask, rows = _prepare_cross_attention_mask(
            dense, num_vision_tokens=per_tile, dtype=base_model(model).dtype
        )
        kwargs = {_cache_argument(type(language_model).forward): cache} if cache is not None else {}
        out = language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cross_attention_states=states,
            cross_attention_mask=cross_mask,
            full_text_row_masked_out_mask=rows,
            use_cache=use_cache,
            **kwargs,
        )
        return out.last_hidden_state, _returned_cache(out) if use_cache else None


def patch_count(config: Any) -> int:
    """Positions per tile: the patches of one tile and the class token."""
    vision = config.vision_config
    return int((vision.image_size // vision.patch_size) ** 2 + 1)


def tile_inputs(pixels: torch.Tensor, tiles: int) -> dict[str, torch.Tensor]:
    """The vision model's inputs for one square image per row: it fills tile 0 (aspect ratio 1x1, id 1)."""
    batch = pixels.shape[0]
    tiled = torch.zeros(batch, 1, tiles, *pixels.shape[1:], dtype=pixels.dtype, device=pixels.device)
    tiled[:, 0, 0] = pixels
    ratio_ids = torch.ones(batch, 1, dtype=torch.long, device=pixels.device)
    ratio_mask = torch.zeros(batch, 1, tiles, dtype=torch.long, device=pixels.device)
    ratio_mask[:, 0, 0] = 1
    return {"pixel_values": tiled, "aspect_ratio_ids": ratio_ids, "aspect_ratio_mask": ratio_mask}


FAMILY = MllamaFamily()


def mllama_tokenizer(texts: Iterable[str] | None) -> Any:
    return train_byte_bpe(texts or (), special_tokens=MLLAMA_SPECIAL_TOKENS, chat_template=MLLAMA_CHAT_TEMPLATE)


def mllama_config(values: dict[str, Any], tokenizer: Any) -> Any:
    """An MllamaConfig from architecture `values`, with this tokenizer's token ids (a shipped config's replaced)."""
    from transformers import MllamaConfig

    values = dict(values)
    values.pop("model_type", None)
    values["text_config"] = values["text_config"] | {
        "vocab_size": vocabulary_size(values, tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return MllamaConfig(**(values | {"image_token_index": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}))


def tiny_values() -> dict[str, Any]:
    """A 32-pixel tile of 16 patches (+ class), 2 tiles, 2+1 vision layers; 3 decoder layers, the middle one cross."""
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "attention_heads": 2,
        "vision_output_dim": 64,  # the last layer's output and one intermediate layer's
        "intermediate_layers_indices": [0],
        "image_size": 32,
        "patch_size": 8,
        "max_num_tiles": 2,
        "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
    }
    text = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "cross_attention_layers": [1],
        "max_position_embeddings": 256,
    }
    return {"vision_config": vision, "text_config": text}


def build(config: Any, tokenizer: Any, seed: int, origin: str) -> LoadedModel:
    """Random weights; the cross-attention gates start at zero in transformers (image unread), so they are opened."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(math.pi / 4)
    image = ImageFormat(int(config.vision_config.image_size), CLIP_MEAN, CLIP_STD)
    return FAMILY.make_loaded(model, tokenizer, image, f"{origin} (random weights)", {"model": origin, "seed": seed})


def _tiny(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or mllama_tokenizer(texts)
    return build(mllama_config(tiny_values(), tokenizer), tokenizer, seed, "mllama-tiny-random")


def _llama_32_11b_vision(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or mllama_tokenizer(texts)
    config = mllama_config(asset_config("llama-3.2-11b-vision.json"), tokenizer)
    return build(config, tokenizer, seed, "llama-3.2-11b-vision-random")


VARIANTS = (
    Variant(
        "mllama-tiny-random",
        "mllama",
        "a tiny Mllama (random weights, tokenizer trained on the run's text) for tests",
        _tiny,
        needs_texts=True,
    ),
    Variant(
        "llama-3.2-11b-vision-random",
        "mllama",
        "meta-llama/Llama-3.2-11B-Vision's architecture, random weights, one 560x560 tile of 4 (1601 positions each)",
        _llama_32_11b_vision,
        needs_texts=True,
        real_size=True,
    ),
)
