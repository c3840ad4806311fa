"""What every causal vision-language model shares behind the seam; each family overrides only what differs.

A causal VLM reads ``[chat-templated prompt, its image placeholder expanded to the image's
tokens][answer][end of turn]`` left to right. The frozen part is the vision tower, and the
projector too unless it trains: :meth:`features` (what the encoder cache stores) is cut below
the first trained module, before the projector for ``lm+projector`` and ``all``, above it for
``lm`` and ``lora`` (:meth:`projected_features`), so the projector then runs once per image.
:meth:`answer_scores` projects the features where they were cut before it, scatters them into
the image-token positions of the input embeddings (what each model's own forward does with
``pixel_values``) and runs the language model.

Layout: the right-padded prompt is followed by the right-padded answer, so a short prompt's
padding sits between its prompt and its answer. Position ids come from the attention mask
(:meth:`position_ids`), never from the column, so a row scores the same alone and in any batch;
the first answer token is predicted from each row's last prompt token, the others from the
column before them, and only those hidden states reach the LM head. Left padding cannot occur:
every prompt and answer the seam reads, in training, scoring and generation alike, is padded on
the right by batching's ``_pad`` and :func:`pad_right`, and a row's last prompt token is found
as its mask's sum less one (:func:`answer_columns`, :meth:`generate`), which holds only for that.

Hooks a family overrides (LLaMA-Factory's ``mm_plugin`` and vLLM's model interfaces work the
same way): the class attributes naming its transformers class and the paths of its parts,
:meth:`vision_features`, :meth:`image_token_count`, :meth:`features_shape_for`, and where
needed :meth:`project`, :meth:`vision_parts`, :meth:`position_ids`, :meth:`run_language_model`,
:meth:`input_embeddings`, :meth:`default_image_size`, :meth:`stated_image_tokens` and
:meth:`chat_messages`.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

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

#: The image statistics most VLM image processors use (OpenAI CLIP's), when a folder states none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: Where a checkpoint folder states its image preprocessing and, for some families, its image-token count.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def base_model(model: nn.Module) -> Any:
    """The transformers model under a peft wrapper (LoRA layers sit inside it, so calling its parts applies them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def part(model: nn.Module, path: str) -> Any:
    """A submodule by attribute path ("model.language_model"), looked up in the transformers model."""
    return functools.reduce(getattr, path.split("."), base_model(model))


@functools.cache
def _cache_argument(forward: Any) -> str:
    """A language model's name for its key/value cache argument: ``cache`` (transformers ≥5.2x) or the older one."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(output: Any) -> Any:
    found = getattr(output, "cache", None)
    return found if found is not None else getattr(output, "past_key_values", None)


def _folder_file(name_or_path: str, filename: str) -> Path | None:
    """A file of a local folder or of a hub id already in the local cache (never downloaded)."""
    local = Path(name_or_path) / filename
    if local.is_file():
        return local
    try:
        from transformers.utils import cached_file

        found = cached_file(
            name_or_path,
            filename,
            local_files_only=True,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def _read_json(name_or_path: str, filename: str) -> dict[str, Any]:
    found = _folder_file(name_or_path, filename)
    if found is None:
        return {}
    try:
        data = json.loads(found.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{found} is not valid JSON ({exc.msg} at line {exc.lineno}).") from exc
    return data if isinstance(data, dict) else {}


def _rgb(values: Any, where: str) -> tuple[float, float, float]:
    numbers = tuple(float(v) for v in values)
    if len(numbers) != 3:
        raise ModelError(f"{where}: an image mean/std needs 3 values (one per RGB channel), not {len(numbers)}.")
    return numbers[0], numbers[1], numbers[2]


class CausalVLMFamily(ModelFamily):
    """A decoder-only language model reading image tokens made by a vision tower and a projector."""

    answer_offset = 0
    features_read_question = False
    train_parts: ClassVar[dict[str, str]] = {
        "lm": "the language model, embeddings and LM head included; vision tower and projector frozen",
        "lm+projector": "the language model and the multimodal projector; vision tower frozen",
        "lora": "LoRA adapters on the language model only",
        "all": "every weight, vision tower included",
    }
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    #: The transformers class (a name in ``transformers``) that loads and builds this family.
    model_class: ClassVar[str] = ""
    #: Attribute paths of the parts inside that class.
    language_model_path: ClassVar[str] = "model.language_model"
    vision_tower_path: ClassVar[str] = "model.vision_tower"
    projector_path: ClassVar[str] = "model.multi_modal_projector"
    lm_head_path: ClassVar[str] = "lm_head"
    #: The attribute of each of the language model's ``layers`` that holds its MLP block.
    mlp_attribute: ClassVar[str] = "mlp"
    #: The token the chat template writes for the image, expanded to :meth:`image_token_count` copies.
    image_placeholder: ClassVar[str] = "<image>"
    #: The token that ends an answer (the end of the assistant's turn); None: the tokenizer's EOS.
    end_of_answer: ClassVar[str | None] = None
    #: Whether a prompt starts with the tokenizer's BOS when the chat template does not write it.
    prompt_bos: ClassVar[bool] = False
    #: Whether answers scored on the prompt's key/value cache equal the full pass (the prompt's
    #: attention does not depend on what follows it); False keeps the full pass for pairs.
    shares_prompt: ClassVar[bool] = True

    # -- family hooks ------------------------------------------------------------------------
    def vision_features(self, model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """The vision tower's output for ``[B, 3, S, S]`` pixels, before the projector: ``[B, N, D]``."""
        raise NotImplementedError

    def image_token_count(self, config: Any, image_size: int) -> int:
        """How many image tokens the projected features of one `image_size` square make."""
        raise NotImplementedError

    def features_shape_for(self, config: Any, image_size: int) -> tuple[int, ...]:
        """One row of :meth:`vision_features` for an `image_size` square."""
        raise NotImplementedError

    def project(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """Vision features ``[B, N, D]`` → image-token embeddings ``[B, T, H]`` (the projector)."""
        projected: torch.Tensor = part(model, self.projector_path)(features)
        return projected

    def vision_parts(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The named modules that make the features (the frozen part, the encoder cache's fingerprint)."""
        return [(self.vision_tower_path, part(model, self.vision_tower_path))]

    def projector_parts(self, model: nn.Module) -> list[nn.Module]:
        """The modules that turn vision features into image-token embeddings."""
        return [part(model, self.projector_path)]

    def image_token_id(self, config: Any) -> int:
        return int(config.image_token_id)

    def position_ids(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Positions counted over attended tokens only, so padding anywhere leaves them unchanged: ``[B, L]``."""
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def input_embeddings(self, model: nn.Module, ids: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """Token embeddings with each row's projected image features scattered into its image tokens."""
        base = base_model(model)
        embeds: torch.Tensor = base.get_input_embeddings()(ids)
        image = ids == self.image_token_id(base.config)
        projected = projected.to(embeds.dtype)
        counts = image.sum(-1)
        if bool((counts != projected.shape[1]).any()):
            found = int(counts[counts != projected.shape[1]][0])
            raise ModelError(
                f"a prompt holds {found} image tokens but the image features make {projected.shape[1]}; "
                f"prompts must come from this model's prompt_ids."
            )
        return embeds.masked_scatter(image.unsqueeze(-1).expand_as(embeds), projected.reshape(-1, embeds.shape[-1]))

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
        """The language model's last hidden states (before the LM head) and its cache; `mask` covers the cache too.

        `features` (the rows' projected image features, :meth:`image_embeddings`) are for a family
        whose language model reads the image beside the embeddings (Mllama's cross-attention); the
        others find the image in `embeds`.
        """
        language_model = part(model, self.language_model_path)
        kwargs = {_cache_argument(type(language_model).forward): cache} if cache is not None else {}
        out = language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=use_cache, **kwargs
        )
        return out.last_hidden_state, _returned_cache(out) if use_cache else None

    def default_image_size(self, config: Any, preprocessor: dict[str, Any]) -> int:
        """The square a loaded checkpoint reads when its preprocessor_config.json states no fixed size."""
        raise NotImplementedError

    def stated_image_tokens(self, config: Any, name_or_path: str, image_size: int) -> dict[str, int]:
        """Image-token counts the checkpoint states (by where), each checked against the features' count."""
        stated: dict[str, int] = {}
        # Read from the file, not the config object: a class default (LLaVA's 576) is no statement.
        written = _read_json(name_or_path, "config.json").get("image_seq_length")
        if isinstance(written, int):
            stated["config.json image_seq_length"] = written
        for filename in PROCESSOR_FILES:
            data = _read_json(name_or_path, filename)
            for key in ("image_seq_length", "num_image_tokens"):
                if isinstance(data.get(key), int):
                    stated[f"{filename} {key}"] = int(data[key])
        return stated

    def chat_messages(self, question: str) -> list[dict[str, Any]]:
        """The user turn the chat template renders: the image, then the question."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]

    # -- loading -----------------------------------------------------------------------------
    def transformers_class(self) -> Any:
        import transformers

        return getattr(transformers, self.model_class)

    def make_loaded(
        self,
        model: Any,
        tokenizer: Any,
        image: ImageFormat,
        source: str,
        origin: dict[str, Any] | None,
    ) -> LoadedModel:
        """Wrap a model, checking its image token and end-of-answer token exist, and keeping their ids."""
        config = model.config
        if not getattr(tokenizer, "chat_template", None):
            raise ModelError(
                f"the tokenizer of '{source}' has no chat template (tokenizer_config.json, chat_template.jinja "
                f"or chat_template.json); vqabench builds every prompt from it."
            )
        image_id = self.image_token_id(config)
        if tokenizer.convert_ids_to_tokens(image_id) != self.image_placeholder:
            raise ModelError(
                f"the config of '{source}' has image token id {image_id}, which its tokenizer spells "
                f"{tokenizer.convert_ids_to_tokens(image_id)!r}, not {self.image_placeholder!r}."
            )
        end = (
            tokenizer.eos_token_id
            if self.end_of_answer is None
            else tokenizer.convert_tokens_to_ids(self.end_of_answer)
        )
        if end is None or end == tokenizer.unk_token_id:
            raise ModelError(f"the tokenizer of '{source}' has no end-of-answer token {self.end_of_answer!r}.")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
        facts = {
            "image_token_id": image_id,
            "image_tokens": self.image_token_count(config, image.size),
            "end_id": int(end),
            "pad_id": int(pad),
            "max_positions": int(config.get_text_config().max_position_embeddings),
        }
        loaded = LoadedModel(self, model, tokenizer, image, source, origin, facts)
        loaded.facts["shortest_prompt"] = len(self.prompt_ids(loaded, ""))
        return loaded

    def from_pretrained(self, name_or_path: str) -> LoadedModel:
        """A checkpoint by hub id (already downloaded) or local folder; its family is picked from its config."""
        from transformers import AutoConfig, AutoTokenizer

        from vqabench.models.registry import family_for

        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not read a model config from '{name_or_path}': {_first_line(exc)}") from exc
        if config.model_type not in self.model_types:
            return family_for(config.model_type).from_pretrained(name_or_path)
        try:
            model = self.transformers_class().from_pretrained(name_or_path)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load {self.name} model '{name_or_path}': {_first_line(exc)}") from exc
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = self._folder_chat_template(name_or_path)
        preprocessor = _read_json(name_or_path, "preprocessor_config.json")
        image = self._image_format(config, preprocessor, name_or_path)
        features = self.image_token_count(config, image.size)
        for where, count in self.stated_image_tokens(config, name_or_path, image.size).items():
            if count != features:
                raise ModelError(
                    f"'{name_or_path}' states {count} image tokens ({where}) but its vision tower's features "
                    f"for a {image.size}x{image.size} image make {features}."
                )
        path = Path(name_or_path)
        origin = {"model": str(path.resolve()) if path.exists() else name_or_path}
        return self.make_loaded(model, tokenizer, image, name_or_path, origin)

    def _folder_chat_template(self, name_or_path: str) -> str | None:
        jinja = _folder_file(name_or_path, "chat_template.jinja")
        if jinja is not None:
            return jinja.read_text(encoding="utf-8")
        template = _read_json(name_or_path, "chat_template.json").get("chat_template")
        return template if isinstance(template, str) else None

    def _image_format(self, config: Any, preprocessor: dict[str, Any], name_or_path: str) -> ImageFormat:
        where = f"{name_or_path}/preprocessor_config.json"
        size = preprocessor.get("size")
        fixed = size.get("height") if isinstance(size, dict) and size.get("height") == size.get("width") else None
        side = int(fixed) if fixed else self.default_image_size(config, preprocessor)
        mean = _rgb(preprocessor.get("image_mean", CLIP_MEAN), where)
        std = _rgb(preprocessor.get("image_std", CLIP_STD), where)
        return ImageFormat(side, mean, std)

    def save_extra(self, loaded: LoadedModel, folder: Any) -> None:
        """The image preprocessing (square size, mean, std) as preprocessor_config.json, which from_pretrained reads."""
        image = loaded.image
        data = {"size": {"height": image.size, "width": image.size}, "image_mean": image.mean, "image_std": image.std}
        (Path(folder) / "preprocessor_config.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    # -- text layout ---------------------------------------------------------------------------
    def prompt_ids(self, loaded: LoadedModel, question: str) -> list[int]:
        """The chat template's user turn (image, question) and generation prompt, the image placeholder expanded."""
        tokenizer = loaded.tokenizer
        text = tokenizer.apply_chat_template(self.chat_messages(question), tokenize=False, add_generation_prompt=True)
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = tokenizer.bos_token_id
        if self.prompt_bos and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        image_id = loaded.facts["image_token_id"]
        if ids.count(image_id) != 1:
            raise ModelError(
                f"the chat template of '{loaded.source}' writes {ids.count(image_id)} image placeholders "
                f"{self.image_placeholder!r} for one image; it must write exactly one."
            )
        at = ids.index(image_id)
        return [*ids[:at], *[image_id] * loaded.facts["image_tokens"], *ids[at + 1 :]]

    def frame_answer(self, loaded: LoadedModel, tokens: list[int], complete: bool) -> list[int]:
        """The answer's tokens, then the end of the assistant's turn when the answer was not cut."""
        return [*tokens, loaded.facts["end_id"]] if complete else list(tokens)

    def cut_prompt(self, loaded: LoadedModel, ids: list[int], limit: int) -> list[int]:
        raise ModelError(
            f"a prompt of {len(ids)} tokens (image tokens included) is longer than the {limit} positions "
            f"of '{loaded.source}'; causal VLM prompts are never cut."
        )

    def pad_token_id(self, loaded: LoadedModel) -> int:
        return int(loaded.facts["pad_id"])

    def prompt_token_cap(self, loaded: LoadedModel) -> int:
        """The language model's positions, less one for the answer's end token."""
        return int(loaded.facts["max_positions"]) - 1

    def answer_token_cap(self, loaded: LoadedModel) -> int:
        """Positions left after the shortest prompt (an empty question's) and the end token."""
        return int(loaded.facts["max_positions"]) - int(loaded.facts["shortest_prompt"]) - 1

    # -- parts ---------------------------------------------------------------------------------
    def trainable_modules(self, model: nn.Module, train: str) -> list[nn.Module]:
        self.check_train(train)
        if train == "all":
            return [base_model(model)]
        language = [part(model, self.language_model_path)]
        if train == "lora":
            return language
        head = part(model, self.lm_head_path)
        projector = self.projector_parts(model) if train == "lm+projector" else []
        return [*language, head, *projector]

    def frozen_modules(self, model: nn.Module, train: str) -> list[tuple[str, nn.Module]]:
        """The vision tower, and the projector too when the features are cut above it."""
        self.check_train(train)
        if train == "all":
            return []
        projector = [(self.projector_path, part(model, self.projector_path))] if self.projected_features(train) else []
        return [*self.vision_parts(model), *projector]

    #: Config values (the model's or its vision config's) that change the features but no weight.
    IMAGE_CONFIG_KEYS: ClassVar[tuple[str, ...]] = (
        "patch_size",
        "spatial_merge_size",
        "temporal_patch_size",
        "max_num_tiles",
        "scale_factor",
        "mm_tokens_per_image",
        "vision_feature_layer",
        "vision_feature_select_strategy",
        "image_seq_length",
    )

    def image_settings(self, loaded: LoadedModel) -> dict[str, Any]:
        """The square, mean and std, and the grid values of the configs (patch, merge, tiles, feature layer)."""
        settings = super().image_settings(loaded)
        config = base_model(loaded.model).config
        for where, values in (("", config), ("vision.", getattr(config, "vision_config", None))):
            for key in self.IMAGE_CONFIG_KEYS:
                value = getattr(values, key, None)
                if isinstance(value, (int, float, str, list, tuple)):
                    settings[where + key] = list(value) if isinstance(value, tuple) else value
        return settings

    def projected_features(self, train: str) -> bool:
        """Above the projector when it is frozen (``lm``, ``lora``): the projector then runs once per image."""
        return train in ("lm", "lora")

    def lora_scope(self, model: nn.Module) -> str:
        return self.language_model_path

    def checkpointed_blocks(self, model: nn.Module) -> list[nn.Module]:
        """Each decoder layer's MLP: it never reads the key/value cache, so recomputing it is exact."""
        layers = part(model, self.language_model_path).layers
        return [getattr(layer, self.mlp_attribute) for layer in layers]

    # -- forward passes ------------------------------------------------------------------------
    def features(
        self,
        model: nn.Module,
        pixels: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        savings: Savings = ALL_SAVINGS,
    ) -> torch.Tensor:
        """The vision tower's output for each row's image (the question is not read), projected if cut above."""
        vision = self.vision_features(model, pixels)
        return self.project(model, vision) if savings.projected_features else vision

    def image_embeddings(self, model: nn.Module, features: torch.Tensor, savings: Savings) -> torch.Tensor:
        """What the language model reads for the image: `features` projected, unless they were cut above it."""
        return features if savings.projected_features else self.project(model, features)

    def features_shape(self, loaded: LoadedModel, prompt_width: int) -> tuple[int, ...]:
        shape = self.features_shape_for(loaded.model.config, loaded.image.size)
        if not loaded.savings.projected_features:
            return shape
        parameter = next(part(loaded.model, self.projector_path).parameters())
        with torch.no_grad():  # the projector's output shape, on one zero row
            probe = torch.zeros(1, *shape, dtype=parameter.dtype, device=parameter.device)
            return tuple(self.project(loaded.model, probe).shape[1:])

    def answer_logits(
        self,
        model: nn.Module,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        answer: tuple[torch.Tensor, torch.Tensor],
        savings: Savings = ALL_SAVINGS,
    ) -> torch.Tensor:
        """Logits ``[B, La, V]`` predicting each answer token, from one pass over prompt and answer.

        `savings.answer_only_logits`: the LM head sees only the columns that predict answer tokens;
        off, it makes logits for every column and those are picked after (what a plain forward does).
        """
        ids = torch.cat([prompt[0], answer[0]], dim=1)
        mask = torch.cat([prompt[1], answer[1]], dim=1)
        image = self.image_embeddings(model, features, savings)
        embeds = self.input_embeddings(model, ids, image)
        positions = self.position_ids(model, ids, mask)
        hidden, _ = self.run_language_model(model, embeds, mask, positions, ids, features=image)
        columns = answer_columns(prompt[1], answer[0].shape[1])
        return self.picked_logits(model, hidden, columns, savings.answer_only_logits)

    def picked_logits(
        self, model: nn.Module, hidden: torch.Tensor, columns: torch.Tensor, answer_only: bool
    ) -> torch.Tensor:
        """The LM head's logits at `columns` ``[B, K]`` of `hidden`: on those columns alone, or on all then picked."""
        head = part(model, self.lm_head_path)
        if answer_only:
            picked = hidden.gather(1, columns.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            logits: torch.Tensor = head(picked)
            return logits
        every: torch.Tensor = head(hidden)
        return every.gather(1, columns.unsqueeze(-1).expand(-1, -1, every.shape[-1]))

    def answer_scores(
        self,
        model: nn.Module,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        answer: tuple[torch.Tensor, torch.Tensor],
        vocab_mean: bool = False,
        savings: Savings = ALL_SAVINGS,
    ) -> AnswerScores:
        logits = self.answer_logits(model, features, prompt, answer, savings)
        return sequence_scores(logits, answer[0], answer[1], vocab_mean)

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
        """Both answers of each pair; with `savings.shared_prompt`, on ONE pass over each prompt.

        The prompt pass keeps its key/value cache; the cache is repeated per row (chosen, rejected
        interleaved) and both answers run on it in one batch, at the positions the full pass gives
        them (the row's last prompt position + 1 + k, M-RoPE's three included), under a mask that
        covers the prompt's padding. The first answer token is predicted by the prompt's last
        hidden state. Gradients reach the prompt pass through the cache.
        """
        if not (savings.shared_prompt and self.shares_prompt):
            return super().pair_scores(model, features, prompt, chosen, rejected, pad_id, savings)
        width = max(chosen[0].shape[1], rejected[0].shape[1])
        c_ids, c_mask = pad_right(*chosen, width, pad_id)
        r_ids, r_mask = pad_right(*rejected, width, pad_id)
        a_ids = torch.stack([c_ids, r_ids], dim=1).flatten(0, 1)
        a_mask = torch.stack([c_mask, r_mask], dim=1).flatten(0, 1)
        ids, mask = prompt
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = mask.long().sum(-1) - 1
        positions = self.position_ids(model, ids, mask)
        image = self.image_embeddings(model, features, savings)
        embeds = self.input_embeddings(model, ids, image)
        hidden, cache = self.run_language_model(model, embeds, mask, positions, ids, use_cache=True, features=image)
        cache.batch_repeat_interleave(2)
        start = positions[..., rows, last].repeat_interleave(2, dim=-1).unsqueeze(-1) + 1
        a_positions = start + torch.arange(width, device=ids.device)
        a_hidden, _ = self.run_language_model(
            model,
            base_model(model).get_input_embeddings()(a_ids),
            torch.cat([mask.repeat_interleave(2, dim=0), a_mask], dim=1),
            a_positions,
            a_ids,
            cache=cache,
            use_cache=True,
            features=image.repeat_interleave(2, dim=0),
        )
        # The first answer token is predicted by the row's last prompt column, the others by the
        # answer's own columns; off, the LM head runs on every column (prompt's and answers').
        head = part(model, self.lm_head_path)
        if savings.answer_only_logits:
            prompt_last, answers = hidden[rows, last], a_hidden[:, :-1]
            logits = head(torch.cat([prompt_last.repeat_interleave(2, dim=0).unsqueeze(1), answers], dim=1))
        else:
            prompt_logits, answer_logits = head(hidden), head(a_hidden)
            first = prompt_logits[rows, last].repeat_interleave(2, dim=0).unsqueeze(1)
            logits = torch.cat([first, answer_logits[:, :-1]], dim=1)
        both = sequence_scores(logits, a_ids, a_mask)
        return (
            AnswerScores(both.logps[0::2], both.lengths[0::2]),
            AnswerScores(both.logps[1::2], both.lengths[1::2]),
        )

    @torch.no_grad()
    def generate(
        self,
        loaded: LoadedModel,
        features: torch.Tensor,
        prompt: tuple[torch.Tensor, torch.Tensor],
        max_new_tokens: int,
        use_cache: bool = True,
    ) -> list[list[int]]:
        """Greedy tokens: one prompt pass, then one token a step on the key/value cache (or the whole prefix again)."""
        model, end, pad = loaded.model, loaded.facts["end_id"], loaded.facts["pad_id"]
        head = part(model, self.lm_head_path)
        ids, mask = prompt
        rows = torch.arange(ids.shape[0], device=ids.device)
        last = mask.long().sum(-1) - 1
        positions = self.position_ids(model, ids, mask)
        image = self.image_embeddings(model, features, loaded.savings)
        hidden, cache = self.run_language_model(
            model,
            self.input_embeddings(model, ids, image),
            mask,
            positions,
            ids,
            use_cache=use_cache,
            features=image,
        )
        state = hidden[rows, last]
        last_position = positions[..., rows, last]
        done = torch.zeros_like(rows, dtype=torch.bool)
        tokens: list[torch.Tensor] = []
        for step in range(1, max_new_tokens + 1):
            token = head(state).argmax(-1).masked_fill(done, pad)
            tokens.append(token)
            done |= token == end
            if step == max_new_tokens or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if use_cache:
                step_ids = token.unsqueeze(1)
                embeds = base_model(model).get_input_embeddings()(step_ids)
                step_positions = (last_position + step).unsqueeze(-1)
                hidden, cache = self.run_language_model(
                    model, embeds, mask, step_positions, step_ids, cache=cache, use_cache=True, features=image
                )
            else:
                ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
                embeds = self.input_embeddings(model, ids, image)
                positions = self.position_ids(model, ids, mask)
                hidden, _ = self.run_language_model(model, embeds, mask, positions, ids, features=image)
            state = hidden[:, -1]
        answers = []
        for row in torch.stack(tokens, dim=1).tolist():
            answers.append(row[: row.index(end)] if end in row else row)
        return answers


def answer_columns(prompt_mask: torch.Tensor, answer_width: int) -> torch.Tensor:
    """Per row, the columns whose hidden states predict the answer tokens ``[B, La]``.

    The first answer token is predicted by the row's last prompt token; the k-th (k ≥ 1) by
    the answer token before it, which sits at column ``Lp + k - 1`` whatever the prompt's length.
    """
    width = prompt_mask.shape[1]
    columns = (width - 1 + torch.arange(answer_width, device=prompt_mask.device)).expand(prompt_mask.shape[0], -1)
    first = prompt_mask.long().sum(-1, keepdim=True) - 1
    return torch.cat([first, columns[:, 1:]], dim=1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def asset_config(filename: str) -> dict[str, Any]:
    """The ``config`` values of a real-size architecture shipped in ``vqabench/assets/`` (sources named there)."""
    from importlib import resources

    text = resources.files("vqabench").joinpath("assets", filename).read_text(encoding="utf-8")
    config: dict[str, Any] = json.loads(text)["config"]
    return config


def vocabulary_size(values: dict[str, Any], tokenizer: Any) -> int:
    """The language model's vocabulary: a shipped config's (the released embedding size) or the tokenizer's, the larger.

    A real-size variant keeps the released embedding and LM-head sizes, so its parameter count
    is the released one; a trained tokenizer's ids all lie inside it.
    """
    stated = values.get("text_config", {}).get("vocab_size") or values.get("vocab_size") or 0
    return max(int(stated), len(tokenizer))
