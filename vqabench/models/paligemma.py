"""PaliGemma: a SigLIP tower and one linear projector in front of a Gemma decoder that reads its prefix both ways.

What differs from the shared causal VLM: PaliGemma has no chat template; its processor writes
``<image>``·N + ``<bos>`` + question + ``\\n`` and the answer follows, ending with ``<eos>``.
That format is kept as the tokenizer's chat template (questions' newlines become spaces, so
the prefix ends at its one ``\\n``). Image and question form a prefix that attends
bidirectionally (token type 0), so the language model runs inside ``PaliGemmaModel``, which
builds that mask; positions count from 1, as transformers' PaliGemma does.
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
    part,
    vocabulary_size,
)
from vqabench.models.family import ImageFormat, LoadedModel, ModelError
from vqabench.models.registry import Variant
from vqabench.models.tokenizers import train_byte_bpe

PALIGEMMA_MEAN = (0.5, 0.5, 0.5)
PALIGEMMA_STD = (0.5, 0.5, 0.5)
#: Where the prefix (image and question) ends and the answer starts.
SEPARATOR = "\n"

PALIGEMMA_SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "image_token": "<image>",
    "separator": SEPARATOR,
}
#: PaliGemmaProcessor's prompt format, written as a chat template: image tokens, BOS, question, newline.
PALIGEMMA_PROMPT_TEMPLATE = (
    "{% for message in messages %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% endif %}{% endfor %}{{ bos_token }}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] | replace('\\n', ' ') }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
)


class PaliGemmaFamily(CausalVLMFamily):
    name = "paligemma"
    model_types = ("paligemma",)
    model_class = "PaliGemmaForConditionalGeneration"
    image_placeholder = "<image>"

    def vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        tower = part(model, self.vision_tower_path)
        hidden: torch.Tensor = tower(pixel_values=pixels.to(tower.dtype)).last_hidden_state
        return hidden

    def image_token_count(self, config: Any, image_size: int) -> int:
        return int((image_size // config.vision_config.patch_size) ** 2)

    def features_shape_for(self, config: Any, image_size: int) -> tuple[int, ...]:
        return (self.image_token_count(config, image_size), int(config.vision_config.hidden_size))

    def default_image_size(self, config: Any, preprocessor: dict[str, Any]) -> int:
        return int(config.vision_config.image_size)

    def make_loaded(
        self, model: Any, tokenizer: Any, image: ImageFormat, source: str, origin: dict[str, Any] | None
    ) -> LoadedModel:
        """PaliGemma checkpoints ship no chat template: its processor's prompt format serves as one."""
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = PALIGEMMA_PROMPT_TEMPLATE
        return super().make_loaded(model, tokenizer, image, source, origin)

    def prompt_ids(self, loaded: LoadedModel, question: str) -> list[int]:
        ids = super().prompt_ids(loaded, question)
        separator = self.separator_id(loaded.tokenizer)
        if ids.count(separator) != 1 or ids[-1] != separator:
            raise ModelError(
                f"the tokenizer of '{loaded.source}' does not end the prompt for {question!r} with one "
                f"separate newline token, which PaliGemma's prefix needs."
            )
        return ids

    def separator_id(self, tokenizer: Any) -> int:
        return int(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(SEPARATOR))[0])

    def position_ids(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return super().position_ids(model, ids, mask) + 1

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
        """PaliGemmaModel's forward on the embeddings: up to the first newline a row attends both ways."""
        multimodal = part(model, "model")
        separator = ids == self.separator_id_of(model)
        suffix = (separator.long().cumsum(-1) - separator.long()) > 0
        kwargs = {_cache_argument(type(multimodal).forward): cache} if cache is not None else {}
        out = multimodal(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            token_type_ids=suffix.long(),
            use_cache=use_cache,
            **kwargs,
        )
        return out.last_hidden_state, _returned_cache(out) if use_cache else None

    def separator_id_of(self, model: nn.Module) -> int:
        """The newline token's id, kept on the config by :func:`build` and :meth:`from_pretrained`."""
        return int(part(model, "config").text_config.separator_token_id)

    def from_pretrained(self, name_or_path: str) -> LoadedModel:
        loaded = super().from_pretrained(name_or_path)
        loaded.model.config.text_config.separator_token_id = self.separator_id(loaded.tokenizer)
        return loaded


FAMILY = PaliGemmaFamily()


def paligemma_tokenizer(texts: Iterable[str] | None) -> Any:
    return train_byte_bpe(texts or (), special_tokens=PALIGEMMA_SPECIAL_TOKENS, chat_template=PALIGEMMA_PROMPT_TEMPLATE)


def _with_tokens(values: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import PaliGemmaConfig

    vocab = vocabulary_size(values, tokenizer)
    values["text_config"] |= {
        "vocab_size": vocab,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "separator_token_id": FAMILY.separator_id(tokenizer),
    }
    values.pop("model_type", None)
    # The tokenizer's image token replaces the one a shipped config states (its id lies past this vocabulary).
    return PaliGemmaConfig(
        **(values | {"vocab_size": vocab, "image_token_index": tokenizer.convert_tokens_to_ids("<image>")})
    )


def tiny_config(tokenizer: Any) -> Any:
    """Two vision and two decoder layers, a 32-pixel image of 16 patches (16 image tokens), an untied LM head.

    The released PaliGemma ties its LM head to its word embeddings (paligemma-3b-random keeps
    that). At this width a tied head makes the random model repeat its input token: Gemma's
    residual stream is the input embedding times sqrt(32), and its layers, initialised with std
    0.02, add about 0.02·sqrt(32) ≈ 11% to it (about 90% at the released width 2048), so the last
    hidden state is nearly the separator's own embedding row and the LM head ranks the separator
    first. Greedy answers then start with the newline, which decodes to nothing, and a short
    fine-tune does not undo it. Gemma 3's norms after each layer avoid this; its tiny variant stays tied.
    """
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
        "model_type": "gemma",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
    }
    # transformers ties the head unless both flags are off.
    values = {
        "vision_config": vision,
        "text_config": text,
        "projection_dim": 32,
        "hidden_size": 32,
        "tie_word_embeddings": False,
    }
    return _with_tokens(values, tokenizer)


def build(config: Any, tokenizer: Any, seed: int, origin: str) -> LoadedModel:
    from transformers import PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    image = ImageFormat(int(config.vision_config.image_size), PALIGEMMA_MEAN, PALIGEMMA_STD)
    return FAMILY.make_loaded(model, tokenizer, image, f"{origin} (random weights)", {"model": origin, "seed": seed})


def _tiny(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or paligemma_tokenizer(texts)
    return build(tiny_config(tokenizer), tokenizer, seed, "paligemma-tiny-random")


def _paligemma_3b(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    tokenizer = tokenizer or paligemma_tokenizer(texts)
    config = _with_tokens(asset_config("paligemma-3b-pt-224.json"), tokenizer)
    return build(config, tokenizer, seed, "paligemma-3b-random")


VARIANTS = (
    Variant(
        "paligemma-tiny-random",
        "paligemma",
        "a tiny PaliGemma (random weights, tokenizer trained on the run's text) for tests",
        _tiny,
        needs_texts=True,
    ),
    Variant(
        "paligemma-3b-random",
        "paligemma",
        "google/paligemma-3b-pt-224's architecture, random weights, 224x224 images (256 image tokens)",
        _paligemma_3b,
        needs_texts=True,
        real_size=True,
    ),
)
