"""The model seam: what the engine may ask of a model family, and the loaded model it asks it of.

The engine (training step, references, caches, generation, checkpoints) talks to a model
only through a :class:`ModelFamily`; each family (``models/blip.py``, the causal VLMs) is one
module that states what differs: how a question and an image become the model's inputs,
which part is frozen (its output is what the encoder cache stores), which part trains for
each ``train`` value, how an answer is scored and how answers are generated. The registry
(``models/registry.py``) maps a checkpoint config's ``model_type`` to its family.

Tensors cross the seam in one layout, whatever the family:

* ``prompt`` ids and mask ``[B, Lp]``, right-padded: the question as the model reads it
  (BLIP: the question encoder's tokens; a causal VLM: the chat-templated prompt with its
  image tokens expanded, ending where the answer starts);
* ``answer`` ids and mask ``[B, La]``, right-padded, framed by :meth:`ModelFamily.frame_answer`
  (BLIP: BOS, tokens, SEP; a causal VLM: tokens, end of turn), scored from position 1 on
  (:attr:`ModelFamily.answer_offset`);
* ``pixels`` ``[B, 3, S, S]``, normalised with the loaded model's mean and std: one image per row;
* ``features`` ``[B, ...]``: :meth:`ModelFamily.features`' output, the frozen part's result for
  the rows, computed live or read from the encoder cache.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

#: vqabench's own facts saved beside a checkpoint's weights (family, image preprocessing, origin).
META_FILE = "vqabench.json"
#: peft's adapter file: a checkpoint folder holding it is a LoRA adapter over `origin`.
ADAPTER_CONFIG = "adapter_config.json"


class ModelError(ValueError):
    """A model that cannot be loaded or used; the message is one sentence for the user."""


@dataclass
class ImageFormat:
    """How an image becomes the ``pixels`` a family reads: a square of `size`, normalised per channel."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class Savings:
    """Exact shortcuts of the scoring passes, each with its own switch so the probe can show what it saves.

    * `shared_prompt`: :meth:`ModelFamily.pair_scores` runs each prompt once and scores both
      answers from its key/value cache (a family whose attention makes that inexact keeps the
      full pass: ``shares_prompt = False``);
    * `answer_only_logits`: the LM head sees only the hidden states that predict answer tokens,
      so the batch × length × vocabulary tensor is never built for the prompt.

    A family for which a switch means nothing (BLIP's decoder already reads the question once,
    through cross-attention) accepts it and ignores it.
    """

    shared_prompt: bool = True
    answer_only_logits: bool = True
    #: Where the features are cut: True above the projector (the cache holds image-token
    #: embeddings and the projector does not run each step), False before it. Not a switch: set
    #: from :meth:`ModelFamily.projected_features` for the run's `train` (above only when frozen).
    projected_features: bool = False


#: Every saving on: the default.
ALL_SAVINGS = Savings()


@dataclass
class LoadedModel:
    """A model of some family, with its tokenizer and image format, ready for the engine."""

    family: ModelFamily
    model: Any  # a transformers PreTrainedModel (a peft.PeftModel once LoRA is attached)
    tokenizer: Any
    image: ImageFormat
    source: str  # what was loaded, for the run_started event
    #: How to rebuild these weights ({"model": folder, hub id or builder, "seed": n}); a LoRA
    #: checkpoint records it as the model its adapter belongs to.
    origin: dict[str, Any] | None = None
    #: Facts a family keeps about this model (special token ids, image-token count, ...).
    facts: dict[str, Any] = field(default_factory=dict)
    #: Which exact scoring shortcuts the engine asks of the family (the run's switches).
    savings: Savings = ALL_SAVINGS

    @property
    def image_size(self) -> int:
        return self.image.size

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.image.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.image.std

    @property
    def pad_token_id(self) -> int:
        return self.family.pad_token_id(self)

    @property
    def question_token_cap(self) -> int:
        return self.family.prompt_token_cap(self)

    @property
    def answer_token_cap(self) -> int:
        return self.family.answer_token_cap(self)

    def describe(self) -> str:
        """The family and size, for the report's Model column: ``"qwen2-vl 0.2M"``."""
        total = sum(p.numel() for p in {id(p): p for p in self.model.parameters()}.values())
        return f"{self.family.name} {_short_count(total)}"


def _short_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


@dataclass
class AnswerScores:
    """Per-answer scores: summed log-prob, token count and (if asked) the summed vocabulary-mean log-prob."""

    logps: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B], float
    vocab_means: torch.Tensor | None = None  # [B]; what label smoothing needs


class ModelFamily:
    """What every family does; subclasses override what differs. One instance per family."""

    #: The name users see ("blip", "qwen2-vl"); also the report's Model column.
    name: ClassVar[str] = ""
    #: The config ``model_type`` values this family loads.
    model_types: ClassVar[tuple[str, ...]] = ()
    #: The ``train`` values it supports, and what each means, for the error that refuses the others.
    train_parts: ClassVar[dict[str, str]] = {}
    #: Default LoRA targets: module-name suffixes inside :meth:`lora_scope`.
    lora_targets: ClassVar[tuple[str, ...]] = ()
    #: The answer's first scored position (BLIP's BOS is given, not scored: 1; causal: 0).
    answer_offset: ClassVar[int] = 1
    #: Whether the frozen part's output depends on the question too (BLIP: yes; a vision tower: no).
    features_read_question: ClassVar[bool] = True
    #: Whether a long prompt may be cut (BLIP's question); a causal VLM's never is: it would cut image tokens.
    prompts_can_be_cut: ClassVar[bool] = False

    # -- loading ---------------------------------------------------------------------------
    def make_loaded(
        self,
        model: Any,
        tokenizer: Any,
        image: ImageFormat,
        source: str,
        origin: dict[str, Any] | None,
    ) -> LoadedModel:
        """Wrap a model of this family for the engine (a family may hook the model here first)."""
        return LoadedModel(self, model, tokenizer, image, source, origin)

    def from_pretrained(self, name_or_path: str) -> LoadedModel:
        """A model of this family by hub id or local folder."""
        raise NotImplementedError

    # -- text layout -----------------------------------------------------------------------
    def prompt_ids(self, loaded: LoadedModel, question: str) -> list[int]:
        """The question as the model reads it, untruncated (with the image's tokens, where it has them)."""
        raise NotImplementedError

    def answer_ids(self, loaded: LoadedModel, answer: str) -> list[int]:
        """An answer's content tokens, untruncated and unframed."""
        return list(loaded.tokenizer(answer, add_special_tokens=False)["input_ids"])

    def frame_answer(self, loaded: LoadedModel, tokens: list[int], complete: bool) -> list[int]:
        """Answer tokens as scored; `complete` is False when they were cut (no end marker: it did not end there)."""
        raise NotImplementedError

    def cut_prompt(self, loaded: LoadedModel, ids: list[int], limit: int) -> list[int]:
        """A prompt longer than `limit`: cut it, or raise ModelError when this family's prompts cannot be cut."""
        raise ModelError(f"a prompt of {len(ids)} tokens is longer than the model's {limit} positions allow.")

    def pad_token_id(self, loaded: LoadedModel) -> int:
        raise NotImplementedError

    def prompt_token_cap(self, loaded: LoadedModel) -> int:
        """Most prompt tokens the model has positions for."""
        raise NotImplementedError

    def answer_token_cap(self, loaded: LoadedModel) -> int:
        """Most answer content tokens the model has positions for (after the prompt, for causal models)."""
        raise NotImplementedError

    # -- parts -----------------------------------------------------------------------------
    def check_train(self, train: str) -> None:
        """ModelError unless this family supports `train`."""
        if train not in self.train_parts:
            allowed = "; ".join(f"'{k}' ({v})" for k, v in self.train_parts.items())
            raise ModelError(f"train = {train!r} is not available for {self.name} models; use {allowed}.")

    def trainable_modules(self, model: nn.Module, train: str) -> list[nn.Module]:
        """The modules whose weights train for `train` (with LoRA: the modules the adapters sit in)."""
        raise NotImplementedError

    def frozen_modules(self, model: nn.Module, train: str) -> list[tuple[str, nn.Module]]:
        """The named frozen modules whose output :meth:`features` returns: what the encoder cache depends on."""
        raise NotImplementedError

    def lora_scope(self, model: nn.Module) -> str:
        """The submodule path LoRA's targets are matched inside (the language model)."""
        raise NotImplementedError

    def checkpointed_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The blocks ``activation_checkpointing = "mlp"`` recomputes in backward: each decoder layer's MLP."""
        raise ModelError(f"activation_checkpointing = 'mlp' is not available for {self.name} models; use 'off'.")

    def projected_features(self, train: str) -> bool:
        """Whether :meth:`features` for `train` are cut above a frozen projector (BLIP has none)."""
        return False

    def image_settings(self, loaded: LoadedModel) -> dict[str, Any]:
        """How an image becomes features beyond the weights (the encoder cache's key): size, mean, std."""
        image = loaded.image
        return {"size": image.size, "mean": list(image.mean), "std": list(image.std)}

    # -- forward passes ----------------------------------------------------------------------
    def features(
        self,
        model: nn.Module,
        pixels: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        savings: Savings = ALL_SAVINGS,
    ) -> torch.Tensor:
        """The frozen part's output for a batch: what the trainable part reads, and what the encoder cache stores."""
        raise NotImplementedError

    def features_shape(self, loaded: LoadedModel, prompt_width: int) -> tuple[int, ...]:
        """The shape of one row of :meth:`features`, for preallocating the encoder cache."""
        raise NotImplementedError

    def trim_features(self, features: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """Cached features made at the split's full prompt width, trimmed to a batch's width."""
        return features[:, :prompt_width] if self.features_read_question else features

    def answer_scores(
        self,
        model: nn.Module,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        answer: tuple[torch.Tensor, torch.Tensor],
        vocab_mean: bool = False,
        savings: Savings = ALL_SAVINGS,
    ) -> AnswerScores:
        """Each answer's summed log-prob and token count given its prompt and the features."""
        raise NotImplementedError

    def pair_scores(
        self,
        model: nn.Module,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        chosen: tuple[torch.Tensor, torch.Tensor],
        rejected: tuple[torch.Tensor, torch.Tensor],
        pad_id: int,
        savings: Savings = ALL_SAVINGS,
    ) -> tuple[AnswerScores, AnswerScores]:
        """Chosen and rejected answers to the same prompts, scored in ONE pass concatenated along the batch."""
        n = features.shape[0]
        width = max(chosen[0].shape[1], rejected[0].shape[1])
        c_ids, c_mask = pad_right(*chosen, width, pad_id)
        r_ids, r_mask = pad_right(*rejected, width, pad_id)
        both = self.answer_scores(
            model,
            torch.cat([features, features]),
            (torch.cat([prompt[0], prompt[0]]), torch.cat([prompt[1], prompt[1]])),
            (torch.cat([c_ids, r_ids]), torch.cat([c_mask, r_mask])),
            savings=savings,
        )
        return (
            AnswerScores(both.logps[:n], both.lengths[:n]),
            AnswerScores(both.logps[n:], both.lengths[n:]),
        )

    def generate(
        self,
        loaded: LoadedModel,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        max_new_tokens: int,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Greedy answer tokens per row, without the end marker; `use_cache=False` re-runs the prefix each step."""
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------
    def save_extra(self, loaded: LoadedModel, folder: Any) -> None:
        """Anything beyond weights, tokenizer and vqabench.json a checkpoint needs (a chat template)."""


def pad_right(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ids and mask to `length` columns."""
    extra = length - ids.shape[1]
    if extra <= 0:
        return ids, mask
    pad = torch.nn.functional.pad
    return pad(ids, (0, extra), value=pad_id), pad(mask, (0, extra), value=0)


def sequence_scores(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, vocab_mean: bool = False
) -> AnswerScores:
    """Summed log-probs of `targets` under `logits` (aligned: logits[:, i] predicts targets[:, i]) where `mask` is 1.

    The log-softmax runs in float32 whatever the autocast dtype, as TRL does.
    """
    weights = mask.to(torch.float32)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    logp = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    means = (log_probs.mean(-1) * weights).sum(-1) if vocab_mean else None
    return AnswerScores((logp * weights).sum(-1), weights.sum(-1), means)


def fingerprint_modules(named: Sequence[tuple[str, nn.Module]]) -> str:
    """Hash of the named modules' weights and buffers: keys caches derived from their output."""
    h = hashlib.sha256()
    for part, module in named:
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{part}.{name} {t.dtype} {tuple(t.shape)}\n".encode())
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:24]
