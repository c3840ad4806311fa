"""BLIP VQA behind the model seam: the study's model, and the embedded default.

BLIP VQA is vision encoder -> question encoder (cross-attends to the image) -> answer
decoder (cross-attends to the question encoding). Its ``forward`` returns a mean loss but
no per-sequence scores, so this family calls the three parts itself. The frozen part is
both encoders: their output, the question encoding, is what the encoder cache stores, and
it is shared by the chosen and the rejected answer (one concatenated decoder pass) and by
a reference decoder. Its language model is the answer decoder (``train = "decoder"``, the
study's setting, or ``"lm"``, the same thing under the causal families' name).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    BlipConfig,
    BlipForQuestionAnswering,
    BlipVisionConfig,
)

from vqabench.models.family import (
    ALL_SAVINGS,
    AnswerScores,
    ImageFormat,
    LoadedModel,
    ModelError,
    ModelFamily,
    Savings,
    pad_right,
    sequence_scores,
)
from vqabench.models.registry import Variant

log = logging.getLogger(__name__)

#: BLIP's image normalisation (the OpenAI CLIP statistics its processor uses).
BLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _asset(*parts: str) -> Path:
    return Path(str(resources.files("vqabench").joinpath("assets", *parts)))


def embedded_config() -> Any:
    """The shipped config of the small embedded BLIP (64x64 images, 1.5M parameters)."""
    data = json.loads(_asset("embedded", "config.json").read_text())
    data.pop("_comment", None)
    return BlipConfig.from_dict(data)


def embedded_tokenizer() -> Any:
    """A BERT word-piece tokenizer over the shipped easy-VQA vocabulary."""
    tok = BertTokenizer(str(_asset("embedded", "vocab.txt")), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def embedded_fingerprint() -> str:
    """Hash of the shipped config and vocabulary, part of the base checkpoint's cache key."""
    h = hashlib.sha256()
    for name in ("config.json", "vocab.txt"):
        h.update(_asset("embedded", name).read_bytes())
    return h.hexdigest()[:16]


def vision_image_size(config: Any) -> int:
    """The square input size of a BLIP config's vision tower."""
    vision = config.vision_config
    if not isinstance(vision, BlipVisionConfig):
        raise ModelError(f"the model config has no BLIP vision config (found {type(vision).__name__}).")
    size = vision.image_size
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ModelError(f"the model's vision config has image_size {size!r}; vqabench needs square images.")


def rgb(values: Any, where: object) -> tuple[float, float, float]:
    """An image mean or std: three numbers, one per colour channel."""
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 3:
        raise ModelError(f"{where}: an image mean/std needs 3 values (one per RGB channel), not {len(numbers)}.")
    return numbers[0], numbers[1], numbers[2]


def attention_bias(mask: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """A [B, L] 0/1 padding mask as the [B, 1, 1, L] additive bias `module`'s attention adds to its scores.

    transformers builds this same bias (0 where attended, the dtype's minimum where padded), but
    first asks ``mask.all()`` to see whether it can skip it: a blocking host sync on every call.
    A 4D mask is taken as already prepared, so passing the bias keeps the step sync-free.
    """
    dtype = next(module.parameters()).dtype
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def encode_questions(
    model: nn.Module, pixel_values: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor
) -> torch.Tensor:
    """Vision encoder then question encoder: the question encoding the decoder attends to."""
    image_embeds = model.get_submodule("vision_model")(pixel_values=pixel_values).last_hidden_state
    text_encoder = model.get_submodule("text_encoder")
    out = text_encoder(
        input_ids=question_ids,
        attention_mask=attention_bias(question_mask, text_encoder),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=None,  # every image position is attended: same as an all-ones mask
        return_dict=True,
    )
    return out.last_hidden_state


def decoder_scores(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    vocab_mean: bool = False,
) -> AnswerScores:
    """Each answer's summed log-prob and token count from the answer decoder (the first token, BOS, is given)."""
    logits = decoder(
        input_ids=answer_ids,
        attention_mask=answer_mask,
        encoder_hidden_states=question_embeds,
        encoder_attention_mask=attention_bias(question_mask, decoder),
        return_logits=True,
        use_cache=False,
    )
    return sequence_scores(logits, answer_ids[:, 1:], answer_mask[:, 1:], vocab_mean)


@cache
def _cache_argument(forward: Any) -> str:
    """The decoder's name for its cache argument: ``cache`` (newer transformers 5) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


@torch.no_grad()
def greedy_tokens(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    *,
    bos_id: int,
    sep_id: int,
    pad_id: int,
    max_new_tokens: int,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy token ids after BOS for each question, up to SEP (excluded) or `max_new_tokens`.

    The decoder runs one token per step on its cache of earlier keys and values (self-attention)
    and of the question's projections (cross-attention); ``use_cache=False`` re-runs the prefix.
    """
    n, device = question_embeds.shape[0], question_embeds.device
    seq = torch.full((n, 1), bos_id, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    past = None
    cache_arg = _cache_argument(type(decoder).forward)
    for _ in range(max_new_tokens):
        step_ids = seq[:, -1:] if past is not None else seq
        kwargs: dict[str, Any] = {cache_arg: past} if use_cache and past is not None else {}
        out = decoder(
            input_ids=step_ids,
            attention_mask=torch.ones_like(seq),
            encoder_hidden_states=question_embeds,
            encoder_attention_mask=question_mask,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        if use_cache:
            past = _returned_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        done |= nxt == sep_id
        if bool(done.all()):
            break
    rows = []
    for row in seq[:, 1:].tolist():
        if sep_id in row:
            row = row[: row.index(sep_id)]
        rows.append(row)
    return rows


def _part(model: nn.Module, name: str) -> nn.Module:
    """A BLIP part by attribute (a peft wrapper passes attribute lookups through to the model)."""
    found = getattr(model, name)
    assert isinstance(found, nn.Module)
    return found


class BlipFamily(ModelFamily):
    """BLIP VQA: the question encoding is the frozen part's output; the answer decoder is its language model."""

    name = "blip"
    model_types = ("blip",)
    train_parts: ClassVar[dict[str, str]] = {
        "decoder": "the answer decoder; both encoders frozen, the study's setting",
        "lm": "the same as 'decoder': BLIP's language model is its answer decoder",
        "lora": "LoRA adapters on the answer decoder",
        "all": "every weight, encoders included",
    }
    #: The decoder's attention (self and cross: query, key, value and output projections) and
    #: feed-forward projections, matched as module-name suffixes.
    lora_targets = ("query", "key", "value", "output.dense", "intermediate.dense")
    answer_offset = 1
    features_read_question = True
    prompts_can_be_cut = True

    def make_loaded(
        self,
        model: Any,
        tokenizer: Any,
        image: ImageFormat,
        source: str,
        origin: dict[str, Any] | None,
    ) -> LoadedModel:
        from vqabench.models.blip_masks import honour_cross_attention_mask

        honour_cross_attention_mask(model)
        return LoadedModel(self, model, tokenizer, image, source, origin)

    def from_pretrained(self, name_or_path: str) -> LoadedModel:
        try:
            model = BlipForQuestionAnswering.from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"could not load BLIP VQA model '{name_or_path}': {first}") from exc
        image = ImageFormat(vision_image_size(model.config), BLIP_IMAGE_MEAN, BLIP_IMAGE_STD)
        try:
            from transformers import BlipImageProcessor  # imported here: without torchvision it warns

            proc = BlipImageProcessor.from_pretrained(name_or_path)
            size = int(proc.size.get("height", image.size)) if isinstance(proc.size, dict) else image.size
            image = ImageFormat(size, rgb(proc.image_mean, name_or_path), rgb(proc.image_std, name_or_path))
        except (OSError, ValueError):
            log.info("no image processor config in %s; using BLIP's defaults", name_or_path)
        path = Path(name_or_path)
        origin = {"model": str(path.resolve()) if path.exists() else name_or_path}
        return self.make_loaded(model, tokenizer, image, name_or_path, origin)

    # -- text layout
    def prompt_ids(self, loaded: LoadedModel, question: str) -> list[int]:
        """Question tokens with the tokenizer's [CLS]/[SEP]."""
        return list(loaded.tokenizer(question)["input_ids"])

    def frame_answer(self, loaded: LoadedModel, tokens: list[int], complete: bool) -> list[int]:
        text = loaded.model.config.text_config
        return [int(text.bos_token_id), *tokens, *([int(text.sep_token_id)] if complete else [])]

    def cut_prompt(self, loaded: LoadedModel, ids: list[int], limit: int) -> list[int]:
        """Cut, keeping the closing [SEP] as the tokenizer's truncation does."""
        return [*ids[: limit - 1], ids[-1]]

    def pad_token_id(self, loaded: LoadedModel) -> int:
        return int(loaded.model.config.text_config.pad_token_id)

    def prompt_token_cap(self, loaded: LoadedModel) -> int:
        """Most question tokens ([CLS] and [SEP] included) the question encoder has positions for."""
        return int(loaded.model.text_encoder.config.max_position_embeddings)

    def answer_token_cap(self, loaded: LoadedModel) -> int:
        """Most answer tokens the decoder has positions for, leaving room for BOS and SEP."""
        return int(loaded.model.text_decoder.config.max_position_embeddings) - 2

    # -- parts
    def trainable_modules(self, model: nn.Module, train: str) -> list[nn.Module]:
        return [model] if train == "all" else [_part(model, "text_decoder")]

    def frozen_modules(self, model: nn.Module, train: str) -> list[tuple[str, nn.Module]]:
        if train == "all":
            return []
        return [(name, _part(model, name)) for name in ("vision_model", "text_encoder")]

    def lora_scope(self, model: nn.Module) -> str:
        return "text_decoder"

    # -- forward passes
    def features(
        self,
        model: nn.Module,
        pixels: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        savings: Savings = ALL_SAVINGS,
    ) -> torch.Tensor:
        return encode_questions(model, pixels, prompt_ids, prompt_mask)

    def features_shape(self, loaded: LoadedModel, prompt_width: int) -> tuple[int, ...]:
        return (prompt_width, int(loaded.model.config.text_config.hidden_size))

    def answer_scores(
        self,
        model: nn.Module,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        answer: tuple[torch.Tensor, torch.Tensor],
        vocab_mean: bool = False,
        savings: Savings = ALL_SAVINGS,
    ) -> AnswerScores:
        """The decoder reads the question once, through cross-attention, and predicts only answer tokens:
        neither saving changes anything here."""
        return decoder_scores(_part(model, "text_decoder"), features, prompt[1], *answer, vocab_mean=vocab_mean)

    def generate(
        self,
        loaded: LoadedModel,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        max_new_tokens: int,
        use_cache: bool = True,
    ) -> list[list[int]]:
        text = loaded.model.config.text_config
        return greedy_tokens(
            loaded.model.text_decoder,
            features,
            prompt[1],
            bos_id=int(text.bos_token_id),
            sep_id=int(text.sep_token_id),
            pad_id=int(text.pad_token_id),
            max_new_tokens=max_new_tokens,
            use_cache=use_cache,
        )


FAMILY = BlipFamily()


def build_embedded(seed: int) -> LoadedModel:
    """The embedded small BLIP with freshly initialised weights (deterministic for a seed)."""
    config = embedded_config()
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config)
    image = ImageFormat(int(config.vision_config.image_size), BLIP_IMAGE_MEAN, BLIP_IMAGE_STD)
    return FAMILY.make_loaded(
        model,
        embedded_tokenizer(),
        image,
        "embedded small BLIP (random init)",
        {"model": "embedded-init", "seed": seed},
    )


def build_random_blip_vqa_base(seed: int) -> LoadedModel:
    """BLIP with Salesforce/blip-vqa-base's architecture and sizes and random weights.

    Timing and memory do not depend on weight values, so this measures efficiency at real
    scale with no hub access. Text is tokenized with the embedded word vocabulary, whose
    ids all lie inside blip-vqa-base's vocabulary; BLIP's own frame tokens are kept, so
    generation starts and stops like the real model.
    """
    from vqabench.models.blip_configs import blip_vqa_base_config

    config = blip_vqa_base_config()
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config)
    image = ImageFormat(vision_image_size(config), BLIP_IMAGE_MEAN, BLIP_IMAGE_STD)
    return FAMILY.make_loaded(
        model,
        embedded_tokenizer(),
        image,
        "blip-vqa-base architecture (random weights)",
        {"model": "blip-vqa-base-random", "seed": seed},
    )


def _embedded(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    return build_embedded(seed)


def _blip_vqa_base(seed: int, texts: Iterable[str] | None = None, tokenizer: Any | None = None) -> LoadedModel:
    return build_random_blip_vqa_base(seed)


VARIANTS = (
    Variant(
        "embedded-init",
        "blip",
        "the embedded small BLIP, random weights (the base checkpoint's start)",
        _embedded,
        fingerprint=embedded_fingerprint,
    ),
    Variant(
        "blip-vqa-base-random",
        "blip",
        "Salesforce/blip-vqa-base's architecture, random weights",
        _blip_vqa_base,
        real_size=True,
    ),
)


def answer_logps(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each answer and its token count, from BLIP's answer decoder."""
    scores = decoder_scores(decoder, question_embeds, question_mask, answer_ids, answer_mask)
    return scores.logps, scores.lengths


def pair_logps(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    chosen: tuple[torch.Tensor, torch.Tensor],
    rejected: tuple[torch.Tensor, torch.Tensor],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected answers scored by `decoder` in one pass: (chosen, rejected, their lengths)."""
    n = question_embeds.shape[0]
    width = max(chosen[0].shape[1], rejected[0].shape[1])
    c_ids, c_mask = pad_right(*chosen, width, pad_id)
    r_ids, r_mask = pad_right(*rejected, width, pad_id)
    logps, lengths = answer_logps(
        decoder,
        torch.cat([question_embeds, question_embeds]),
        torch.cat([question_mask, question_mask]),
        torch.cat([c_ids, r_ids]),
        torch.cat([c_mask, r_mask]),
    )
    return logps[:n], logps[n:], lengths[:n], lengths[n:]
