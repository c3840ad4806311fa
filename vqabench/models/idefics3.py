"""Idefics3 and SmolVLM: a SigLIP tower whose patches a pixel shuffle folds into few tokens for a Llama decoder.

What differs from the shared causal VLM: the parts are ``vision_model``, ``connector`` (pixel
shuffle and linear: the projector) and ``text_model``; one image is read as one global tile
(image splitting off), so its tokens are ``<fake_token_around_image><global-img><image>*N
<fake_token_around_image>``, N = (side / patch)² / scale_factor², as the processor writes them.
The features are the tower's output before the shuffle. SmolVLM checkpoints say ``idefics3``
in their config; SmolVLM2's ``smolvlm`` class has the same parts and layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vqabench.models.causal import CausalVLMFamily, _read_json, asset_config, part, vocabulary_size
from vqabench.models.family import ImageFormat, LoadedModel, ModelError
from vqabench.models.registry import Variant
from vqabench.models.tokenizers import train_byte_bpe

#: SmolVLM's preprocessor_config.json image statistics.
SMOLVLM_MEAN = (0.5, 0.5, 0.5)
SMOLVLM_STD = (0.5, 0.5, 0.5)
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"

SMOLVLM_SPECIAL_TOKENS = {
    "pad_token": "<|endoftext|>",
    "bos_token": "<|im_start|>",
    "eos_token": "<end_of_utterance>",
    "fake_token": FAKE_TOKEN,
    "global_token": GLOBAL_TOKEN,
    "image_token": "<image>",
}
#: SmolVLM-Instruct's chat template, one user turn of images and text: "User:<image>q<end_of_utterance>\nAssistant:".
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class Idefics3Family(CausalVLMFamily):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    model_class = "Idefics3ForConditionalGeneration"
    language_model_path = "model.text_model"
    vision_tower_path = "model.vision_model"
    projector_path = "model.connector"
    image_placeholder = "<image>"
    end_of_answer = "<end_of_utterance>"

    def transformers_class(self) -> Any:
        """Idefics3's class, or SmolVLM2's (same parts) for a ``smolvlm`` checkpoint, via the auto class."""
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    def vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        tower = part(model, self.vision_tower_path)
        hidden: torch.Tensor = tower(pixel_values=pixels.to(tower.dtype)).last_hidden_state
        return hidden

    def image_token_count(self, config: Any, image_size: int) -> int:
        return int((image_size // config.vision_config.patch_size) ** 2 // config.scale_factor**2)

    def features_shape_for(self, config: Any, image_size: int) -> tuple[int, ...]:
        vision = config.vision_config
        return ((image_size // vision.patch_size) ** 2, int(vision.hidden_size))

    def default_image_size(self, config: Any, preprocessor: dict[str, Any]) -> int:
        """One global tile: the processor's ``max_image_size`` (the tower's own size when it states none)."""
        tile = preprocessor.get("max_image_size")
        side = tile.get("longest_edge") if isinstance(tile, dict) else None
        return int(side or config.vision_config.image_size)

    def stated_image_tokens(self, config: Any, name_or_path: str, image_size: int) -> dict[str, int]:
        stated = super().stated_image_tokens(config, name_or_path, image_size)
        for filename in ("processor_config.json", "preprocessor_config.json"):
            count = _read_json(name_or_path, filename).get("image_seq_len")
            if isinstance(count, int):
                stated[f"{filename} image_seq_len"] = count
        return stated

    def prompt_ids(self, loaded: LoadedModel, question: str) -> list[int]:
        """The chat template's prompt, its image tokens framed as one global tile is."""
        ids = super().prompt_ids(loaded, question)
        fake, global_img = loaded.tokenizer.convert_tokens_to_ids([FAKE_TOKEN, GLOBAL_TOKEN])
        if loaded.tokenizer.unk_token_id in (fake, global_img) or None in (fake, global_img):
            raise ModelError(f"the tokenizer of '{loaded.source}' lacks {FAKE_TOKEN} or {GLOBAL_TOKEN}.")
        at = ids.index(loaded.facts["image_token_id"])
        end = at + loaded.facts["image_tokens"]
        return [*ids[:at], fake, global_img, *ids[at:end], fake, *ids[end:]]


FAMILY = Idefics3Family()


def smolvlm_tokenizer(texts: Iterable[str] | None) -> Any:
    return train_byte_bpe(texts or (), special_tokens=SMOLVLM_SPECIAL_TOKENS, chat_template=SMOLVLM_CHAT_TEMPLATE)


def _with_tokens(values: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import Idefics3Config

    values["text_config"] |= {
        "vocab_size": vocabulary_size(values, tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    values.pop("model_type", None)
    # The tokenizer's image token replaces the one a shipped config states (an id of the released vocabulary).
    return Idefics3Config(**(values | {"image_token_id": tokenizer.convert_tokens_to_ids("<image>")}))


def tiny_config(tokenizer: Any) -> Any:
    """Two vision and two decoder layers, a 32-pixel image of 16 patches shuffled into 4 tokens."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    text = {
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    return _with_tokens(
        {"vision_config": vision | {"image_size": 32, "patch_size": 8}, "text_config": text, "scale_factor": 2},
        tokenizer,
    )


def build(config: Any, tokenizer: Any, seed: int, origin: str) -> LoadedModel:
    from transformers import Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    image = ImageFormat(int(config.vision_config.image_size), SMOLVLM_MEAN, SMOLVLM_STD)
    return FAMILY.make_loaded(model, tokenizer, image, f"{origin} (random weights)", {"model": origin, "seed": seed})


def _tiny(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or smolvlm_tokenizer(texts)
    return build(tiny_config(tokenizer), tokenizer, seed, "idefics3-tiny-random")


def _smolvlm_256m(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or smolvlm_tokenizer(texts)
    config = _with_tokens(asset_config("smolvlm-256m-instruct.json"), tokenizer)
    return build(config, tokenizer, seed, "smolvlm-256m-random")


VARIANTS = (
    Variant(
        "idefics3-tiny-random",
        "idefics3",
        "a tiny Idefics3 (random weights, tokenizer trained on the run's text) for tests",
        _tiny,
        needs_texts=True,
    ),
    Variant(
        "smolvlm-256m-random",
        "idefics3",
        "HuggingFaceTB/SmolVLM-256M-Instruct's architecture, random weights, 512x512 images (64 image tokens)",
        _smolvlm_256m,
        needs_texts=True,
        real_size=True,
    ),
)
