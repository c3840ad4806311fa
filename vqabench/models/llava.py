"""LLaVA (1.5 and the other single-image ``llava`` checkpoints): a CLIP-style tower, an MLP projector, a LLaMA-style LM.

What differs from the shared causal VLM: the features are one hidden layer of the tower
(``vision_feature_layer``, the second to last in LLaVA-1.5), without the CLS position under
the ``default`` strategy, so a square of side S makes (S / patch)² image tokens; the image is
the tower's own square (its position embeddings are fixed); the prompt starts with BOS.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vqabench.models.causal import CLIP_MEAN, CLIP_STD, CausalVLMFamily, asset_config, part
from vqabench.models.family import ImageFormat, LoadedModel
from vqabench.models.registry import Variant
from vqabench.models.tokenizers import train_byte_bpe

LLAVA_SPECIAL_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "image_token": "<image>",
}
#: llava-hf/llava-1.5-7b-hf's chat template for user turns of images and text: "USER: <image>\n... ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class LlavaFamily(CausalVLMFamily):
    name = "llava"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    image_placeholder = "<image>"
    prompt_bos = True

    def vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The chosen hidden layer(s) of the tower, concatenated along features, CLS dropped under ``default``."""
        config: Any = model.config
        tower = part(model, self.vision_tower_path)
        states = tower(pixels.to(tower.dtype), output_hidden_states=True, return_dict=True).hidden_states
        layers = config.vision_feature_layer
        chosen = [states[i] for i in ([layers] if isinstance(layers, int) else layers)]
        if config.vision_feature_select_strategy == "default":
            chosen = [state[:, 1:] for state in chosen]
        return torch.cat(chosen, dim=-1)

    def image_token_count(self, config: Any, image_size: int) -> int:
        patches = (image_size // config.vision_config.patch_size) ** 2
        return patches + (0 if config.vision_feature_select_strategy == "default" else 1)

    def features_shape_for(self, config: Any, image_size: int) -> tuple[int, ...]:
        layers = config.vision_feature_layer
        width = config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))
        return (self.image_token_count(config, image_size), width)

    def default_image_size(self, config: Any, preprocessor: dict[str, Any]) -> int:
        return int(config.vision_config.image_size)


FAMILY = LlavaFamily()


def llava_tokenizer(texts: Iterable[str] | None) -> Any:
    return train_byte_bpe(texts or (), special_tokens=LLAVA_SPECIAL_TOKENS, chat_template=LLAVA_CHAT_TEMPLATE)


def llava_config(values: dict[str, Any], tokenizer: Any) -> Any:
    """A LlavaConfig from architecture `values`, its token ids taken from `tokenizer` (ids inside the vocabulary)."""
    from transformers import LlavaConfig

    ids = tokenizer.convert_tokens_to_ids
    text = values["text_config"] | {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    return LlavaConfig(**(values | {"text_config": text, "image_token_id": ids("<image>")}))


def tiny_values(tokenizer: Any) -> dict[str, Any]:
    """Two CLIP layers over 14-pixel patches of a 56-pixel image (16 image tokens), two LLaMA layers."""
    return {
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "projection_dim": 32,
        },
        "text_config": {
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        "image_seq_length": 16,
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }


def build(config: Any, tokenizer: Any, seed: int, origin: str) -> LoadedModel:
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image = ImageFormat(int(config.vision_config.image_size), CLIP_MEAN, CLIP_STD)
    return FAMILY.make_loaded(model, tokenizer, image, f"{origin} (random weights)", {"model": origin, "seed": seed})


def _tiny(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or llava_tokenizer(texts)
    return build(llava_config(tiny_values(tokenizer), tokenizer), tokenizer, seed, "llava-tiny-random")


def _llava_15_7b(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or llava_tokenizer(texts)
    config = llava_config(asset_config("llava-1.5-7b-hf.json"), tokenizer)
    return build(config, tokenizer, seed, "llava-1.5-7b-random")


VARIANTS = (
    Variant(
        "llava-tiny-random",
        "llava",
        "a tiny LLaVA (random weights, tokenizer trained on the run's text) for tests",
        _tiny,
        needs_texts=True,
    ),
    Variant(
        "llava-1.5-7b-random",
        "llava",
        "llava-hf/llava-1.5-7b-hf's architecture, random weights, 336x336 images (576 image tokens)",
        _llava_15_7b,
        needs_texts=True,
        real_size=True,
    ),
)
