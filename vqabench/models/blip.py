"""BLIP VQA loading, freezing, checkpoints and per-sequence log-probabilities.

BLIP VQA is vision encoder -> question encoder (cross-attends to the image) -> answer
decoder (cross-attends to the question encoding). Its ``forward`` returns a mean loss but
no per-sequence scores, so the engine calls the three parts itself: the encoders run once
per batch and their output is shared by the chosen and the rejected answer (one
concatenated decoder pass) and by a reference decoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: BLIP's image normalisation (the OpenAI CLIP statistics its processor uses).
BLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
META_FILE = "vqabench.json"
#: peft's adapter file: a checkpoint folder holding it is a LoRA adapter over `origin`.
ADAPTER_CONFIG = "adapter_config.json"


class ModelError(ValueError):
    """A model that cannot be loaded; the message is one sentence for the user."""


@dataclass
class LoadedModel:
    """A BLIP VQA model with what it needs to turn text and images into tensors."""

    model: Any  # transformers.BlipForQuestionAnswering
    tokenizer: Any
    image_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    source: str  # what was loaded, for the run_started event
    #: How to rebuild these weights ({"model": folder, hub id or builder, "seed": n}); a LoRA
    #: checkpoint records it as the model its adapter belongs to.
    origin: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from vqabench.engine.cross_attention import honour_cross_attention_mask

        honour_cross_attention_mask(self.model)

    @property
    def bos_token_id(self) -> int:
        return int(self.model.config.text_config.bos_token_id)

    @property
    def sep_token_id(self) -> int:
        return int(self.model.config.text_config.sep_token_id)

    @property
    def pad_token_id(self) -> int:
        return int(self.model.config.text_config.pad_token_id)

    @property
    def question_token_cap(self) -> int:
        """Most question tokens ([CLS] and [SEP] included) the question encoder has positions for."""
        return int(self.model.text_encoder.config.max_position_embeddings)

    @property
    def answer_token_cap(self) -> int:
        """Most answer tokens the decoder has positions for, leaving room for BOS and SEP."""
        return int(self.model.text_decoder.config.max_position_embeddings) - 2


def _asset(*parts: str) -> Path:
    return Path(str(resources.files("vqabench").joinpath("assets", *parts)))


def embedded_config() -> Any:
    """The shipped config of the small embedded BLIP (64x64 images, 1.5M parameters)."""
    from transformers import BlipConfig

    data = json.loads(_asset("embedded", "config.json").read_text())
    data.pop("_comment", None)
    return BlipConfig.from_dict(data)


def embedded_tokenizer() -> Any:
    """A BERT word-piece tokenizer over the shipped easy-VQA vocabulary."""
    from transformers import BertTokenizer

    tok = BertTokenizer(str(_asset("embedded", "vocab.txt")), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def embedded_fingerprint() -> str:
    """Hash of the shipped config and vocabulary, part of the base checkpoint's cache key."""
    h = hashlib.sha256()
    for name in ("config.json", "vocab.txt"):
        h.update(_asset("embedded", name).read_bytes())
    return h.hexdigest()[:16]


def build_embedded(seed: int) -> LoadedModel:
    """The embedded small BLIP with freshly initialised weights (deterministic for a seed)."""
    from transformers import BlipForQuestionAnswering

    config = embedded_config()
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config)
    size = int(config.vision_config.image_size)
    return LoadedModel(
        model,
        embedded_tokenizer(),
        size,
        BLIP_IMAGE_MEAN,
        BLIP_IMAGE_STD,
        "embedded small BLIP (random init)",
        {"model": "embedded-init", "seed": seed},
    )


def build_random_blip_vqa_base(seed: int) -> LoadedModel:
    """BLIP with Salesforce/blip-vqa-base's architecture and sizes and random weights.

    Timing and memory do not depend on weight values, so this measures efficiency at real
    scale with no hub access. Text is tokenized with the embedded word vocabulary, whose
    ids all lie inside blip-vqa-base's vocabulary.
    """
    from transformers import BlipForQuestionAnswering

    from vqabench.engine.model_configs import blip_vqa_base_config

    config = blip_vqa_base_config()
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(config)
    tok = embedded_tokenizer()
    # Keep BLIP's own frame tokens so generation starts and stops like the real model.
    return LoadedModel(
        model,
        tok,
        vision_image_size(config),
        BLIP_IMAGE_MEAN,
        BLIP_IMAGE_STD,
        "blip-vqa-base architecture (random weights)",
        {"model": "blip-vqa-base-random", "seed": seed},
    )


def vision_image_size(config: Any) -> int:
    """The square input size of a BLIP config's vision tower."""
    from transformers import BlipVisionConfig

    vision = config.vision_config
    if not isinstance(vision, BlipVisionConfig):
        raise ModelError(f"the model config has no BLIP vision config (found {type(vision).__name__}).")
    size = vision.image_size
    if isinstance(size, int):
        return size
    if len(size) == 2 and size[0] == size[1]:
        return int(size[0])
    raise ModelError(f"the model's vision config has image_size {size!r}; vqabench needs square images.")


def _rgb(values: Any, where: object) -> tuple[float, float, float]:
    """An image mean or std: three numbers, one per colour channel."""
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 3:
        raise ModelError(f"{where}: an image mean/std needs 3 values (one per RGB channel), not {len(numbers)}.")
    return numbers[0], numbers[1], numbers[2]


def load_pretrained(name_or_path: str) -> LoadedModel:
    """Any BLIP VQA checkpoint by hub id or local folder, via ``from_pretrained``."""
    from transformers import AutoTokenizer, BlipForQuestionAnswering

    path = Path(name_or_path)
    local = path.exists()
    if local and (path / ADAPTER_CONFIG).exists():
        from vqabench.engine.lora import load_adapter_checkpoint

        return load_adapter_checkpoint(path)
    if not local and (name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1):
        raise ModelError(
            f"model '{name_or_path}' is neither an existing folder nor a hub id like 'Salesforce/blip-vqa-base'."
        )
    try:
        model = BlipForQuestionAnswering.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"could not load BLIP VQA model '{name_or_path}': {first}") from exc
    size = vision_image_size(model.config)
    mean, std = BLIP_IMAGE_MEAN, BLIP_IMAGE_STD
    meta_path = path / META_FILE if local else None
    if meta_path is not None and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        mean, std = _rgb(meta["image_mean"], meta_path), _rgb(meta["image_std"], meta_path)
    else:
        try:
            from transformers import BlipImageProcessor

            proc = BlipImageProcessor.from_pretrained(name_or_path)
            mean, std = _rgb(proc.image_mean, name_or_path), _rgb(proc.image_std, name_or_path)
            size = int(proc.size.get("height", size)) if isinstance(proc.size, dict) else size
        except (OSError, ValueError):
            log.info("no image processor config in %s; using BLIP's defaults", name_or_path)
    origin = {"model": str(path.resolve()) if local else name_or_path}
    return LoadedModel(model, tokenizer, size, mean, std, f"{name_or_path}", origin)


def save_checkpoint(loaded: LoadedModel, folder: Path) -> None:
    """Save model (or only its LoRA adapter), tokenizer and preprocessing facts for ``load_pretrained``."""
    folder.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    meta = {
        "image_size": loaded.image_size,
        "image_mean": list(loaded.image_mean),
        "image_std": list(loaded.image_std),
        "source": loaded.source,
        "origin": loaded.origin,
    }
    (folder / META_FILE).write_text(json.dumps(meta, indent=2))


def checkpoint_fingerprint(folder: Path) -> str:
    """Hash of a checkpoint's weight files: keys caches derived from those weights."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ModelError(f"checkpoint folder '{folder}' has no weight files (.safetensors or .bin).")
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if (Path(folder) / ADAPTER_CONFIG).exists():  # an adapter is only as fixed as the model under it
        origin = json.loads((Path(folder) / META_FILE).read_text()).get("origin") or {}
        base = Path(str(origin.get("model", "")))
        h.update((checkpoint_fingerprint(base) if base.is_dir() else json.dumps(origin, sort_keys=True)).encode())
    return h.hexdigest()[:16]


def trainable_part(model: nn.Module, train: str) -> nn.Module:
    """The module that trains: the answer decoder (the paper's setting, and where LoRA adapters sit) or all."""
    return model if train == "all" else model.get_submodule("text_decoder")


def freeze_for_training(model: nn.Module, train: str) -> None:
    """Freeze everything outside the trainable part (with LoRA: all but the adapters); encoders stay in eval mode."""
    part = trainable_part(model, train)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in part.named_parameters():
        p.requires_grad_(train != "lora" or "lora_" in name)


def disable_dropout(model: nn.Module) -> int:
    """Set the model's own dropout probabilities to 0 (TRL's ``disable_dropout``); returns how many.

    The reference always runs in eval mode; with the policy's dropout off as well, policy and
    reference give identical log-probs at step 0, so DPO starts at exactly log 2. LoRA's
    dropout (peft's ``lora_dropout`` modules) is left at the spec's ``lora_dropout``: it is a
    setting of its own, and with the adapters starting at zero it does not move step 0.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name.split("."):
            module.p = 0.0
            count += 1
    return count


def set_train_mode(model: nn.Module, train: str) -> None:
    model.eval()
    trainable_part(model, train).train()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


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


def answer_logps(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each answer and its token count (the first token, BOS, is given)."""
    logps, lengths, _ = answer_logps_with_vocab_mean(
        decoder, question_embeds, question_mask, answer_ids, answer_mask, vocab_mean=False
    )
    return logps, lengths


def answer_logps_with_vocab_mean(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    answer_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    vocab_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`answer_logps` plus, per answer, the vocabulary-mean log-prob summed over its tokens.

    The third value is what label smoothing needs (``objectives.sft_loss``); None unless asked.
    """
    logits = decoder(
        input_ids=answer_ids,
        attention_mask=answer_mask,
        encoder_hidden_states=question_embeds,
        encoder_attention_mask=attention_bias(question_mask, decoder),
        return_logits=True,
        use_cache=False,
    )
    targets = answer_ids[:, 1:]
    mask = answer_mask[:, 1:].to(torch.float32)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    means = (log_probs.mean(-1) * mask).sum(-1) if vocab_mean else None
    return (logp * mask).sum(-1), mask.sum(-1), means


def pad_to(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, mask
    return (torch.nn.functional.pad(ids, (0, extra), value=pad_id), torch.nn.functional.pad(mask, (0, extra), value=0))


def pair_logps(
    decoder: nn.Module,
    question_embeds: torch.Tensor,
    question_mask: torch.Tensor,
    chosen: tuple[torch.Tensor, torch.Tensor],
    rejected: tuple[torch.Tensor, torch.Tensor],
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chosen and rejected answers scored in ONE decoder pass, concatenated along the batch.

    Returns (chosen_logps, rejected_logps, chosen_lengths, rejected_lengths).
    """
    n = question_embeds.shape[0]
    length = max(chosen[0].shape[1], rejected[0].shape[1])
    c_ids, c_mask = pad_to(*chosen, length, pad_id)
    r_ids, r_mask = pad_to(*rejected, length, pad_id)
    logps, lengths = answer_logps(
        decoder,
        torch.cat([question_embeds, question_embeds]),
        torch.cat([question_mask, question_mask]),
        torch.cat([c_ids, r_ids]),
        torch.cat([c_mask, r_mask]),
    )
    return logps[:n], logps[n:], lengths[:n], lengths[n:]
