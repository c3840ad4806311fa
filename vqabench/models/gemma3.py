"""Gemma 3: a SigLIP tower whose patches are average-pooled to a fixed number of soft tokens for a Gemma 3 decoder.

What differs from the shared causal VLM: the chat template writes ``<start_of_image>``, which
the processor widens to ``\\n\\n<start_of_image>`` + ``<image_soft_token>``·N + ``<end_of_image>\\n\\n``;
the image's soft tokens attend to each other both ways. Its sliding-window layers count the
window in positions here, not columns (transformers counts columns, which padding between a
prompt and its answer would stretch), so both masks are built from the attention mask and the
key/value cache keeps every column. The features are the tower's patches before the pooling
projector.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vqabench.models.causal import (
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

GEMMA_MEAN = (0.5, 0.5, 0.5)
GEMMA_STD = (0.5, 0.5, 0.5)
START_OF_IMAGE = "<start_of_image>"
END_OF_IMAGE = "<end_of_image>"

GEMMA3_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "turn_start": "<start_of_turn>",
    "turn_end": "<end_of_turn>",
    "image_start": START_OF_IMAGE,
    "image_end": END_OF_IMAGE,
    "image_token": "<image_soft_token>",
}
#: gemma-3-4b-it's chat template for one user turn of images and text (system turns left out).
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


class Gemma3Family(CausalVLMFamily):
    name = "gemma3"
    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"
    image_placeholder = "<image_soft_token>"
    end_of_answer = "<end_of_turn>"

    def vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        tower = part(model, self.vision_tower_path)
        hidden: torch.Tensor = tower(pixel_values=pixels.to(tower.dtype)).last_hidden_state
        return hidden

    def image_token_count(self, config: Any, image_size: int) -> int:
        return int(config.mm_tokens_per_image)

    def features_shape_for(self, config: Any, image_size: int) -> tuple[int, ...]:
        vision = config.vision_config
        return ((image_size // vision.patch_size) ** 2, int(vision.hidden_size))

    def default_image_size(self, config: Any, preprocessor: dict[str, Any]) -> int:
        return int(config.vision_config.image_size)

    def prompt_ids(self, loaded: LoadedModel, question: str) -> list[int]:
        """The chat template's prompt with its ``<start_of_image>`` widened as Gemma3Processor does."""
        tokenizer = loaded.tokenizer
        text = tokenizer.apply_chat_template(self.chat_messages(question), tokenize=False, add_generation_prompt=True)
        if text.count(START_OF_IMAGE) != 1:
            raise ModelError(
                f"the chat template of '{loaded.source}' writes {text.count(START_OF_IMAGE)} {START_OF_IMAGE} "
                f"markers for one image; it must write exactly one."
            )
        soft = self.image_placeholder * loaded.facts["image_tokens"]
        text = text.replace(START_OF_IMAGE, f"\n\n{START_OF_IMAGE}{soft}{END_OF_IMAGE}\n\n")
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

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
        """The language model under masks of :func:`attention_masks`, on a cache of full (unwindowed) layers."""
        from transformers import DynamicCache

        language_model = part(model, self.language_model_path)
        config = base_model(model).config
        image = ids == self.image_token_id(config)
        masks = attention_masks(mask, image, config.text_config.sliding_window, embeds.dtype)
        if use_cache and cache is None:
            cache = DynamicCache()
        kwargs = {_cache_argument(type(language_model).forward): cache} if cache is not None else {}
        out = language_model(
            inputs_embeds=embeds, attention_mask=masks, position_ids=positions, use_cache=use_cache, **kwargs
        )
        return out.last_hidden_state, _returned_cache(out) if use_cache else None


def attention_masks(
    mask: torch.Tensor, image: torch.Tensor, window: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Additive masks ``[B, 1, Lq, Lkv]`` for Gemma 3's global and sliding layers; `mask` covers the cache too.

    A query sees earlier attended columns (global), those fewer than `window` positions back
    (sliding), and in a pass over the whole sequence every token of its own image.
    """
    queries = image.shape[1]
    attended = mask.bool()
    position = mask.long().cumsum(-1) - 1
    column = torch.arange(mask.shape[1], device=mask.device)
    q_column = column[-queries:]
    causal = (column[None, :] <= q_column[:, None]).unsqueeze(0) & attended[:, None, :]
    if queries == mask.shape[1]:
        causal = causal | (image[:, :, None] & image[:, None, :] & attended[:, None, :])
    near = (position[:, -queries:, None] - position[:, None, :]) < window
    lowest = torch.finfo(dtype).min
    return {
        name: torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, lowest).unsqueeze(1)
        for name, allowed in (("full_attention", causal), ("sliding_attention", causal & near))
    }


FAMILY = Gemma3Family()


def gemma3_tokenizer(texts: Iterable[str] | None) -> Any:
    return train_byte_bpe(texts or (), special_tokens=GEMMA3_SPECIAL_TOKENS, chat_template=GEMMA3_CHAT_TEMPLATE)


def _with_tokens(values: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import Gemma3Config

    ids = tokenizer.convert_tokens_to_ids
    values["text_config"] |= {
        "vocab_size": vocabulary_size(values, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": [tokenizer.eos_token_id, ids("<end_of_turn>")],
    }
    values.pop("model_type", None)
    # The tokenizer's image tokens replace those a shipped config states (ids of the released vocabulary).
    tokens = {
        "image_token_index": ids("<image_soft_token>"),
        "boi_token_index": ids(START_OF_IMAGE),
        "eoi_token_index": ids(END_OF_IMAGE),
    }
    return Gemma3Config(**(values | tokens))


def tiny_config(tokenizer: Any) -> Any:
    """Two vision layers over a 32-pixel image (16 patches pooled to 4 tokens); one sliding and one global layer."""
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        "vision_use_head": False,
    }
    text = {
        "model_type": "gemma3_text",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "max_position_embeddings": 256,
    }
    return _with_tokens({"vision_config": vision, "text_config": text, "mm_tokens_per_image": 4}, tokenizer)


def build(config: Any, tokenizer: Any, seed: int, origin: str) -> LoadedModel:
    """Random weights; the projector's matrix starts at zero in transformers, so it is drawn like the others."""
    from transformers import Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    image = ImageFormat(int(config.vision_config.image_size), GEMMA_MEAN, GEMMA_STD)
    return FAMILY.make_loaded(model, tokenizer, image, f"{origin} (random weights)", {"model": origin, "seed": seed})


def _tiny(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or gemma3_tokenizer(texts)
    return build(tiny_config(tokenizer), tokenizer, seed, "gemma3-tiny-random")


def _gemma3_4b(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or gemma3_tokenizer(texts)
    return build(_with_tokens(asset_config("gemma-3-4b-it.json"), tokenizer), tokenizer, seed, "gemma3-4b-random")


VARIANTS = (
    Variant(
        "gemma3-tiny-random",
        "gemma3",
        "a tiny Gemma 3 (random weights, tokenizer trained on the run's text) for tests",
        _tiny,
        needs_texts=True,
    ),
    Variant(
        "gemma3-4b-random",
        "gemma3",
        "google/gemma-3-4b-it's architecture, random weights, 896x896 images (256 image tokens)",
        _gemma3_4b,
        needs_texts=True,
        real_size=True,
    ),
)
