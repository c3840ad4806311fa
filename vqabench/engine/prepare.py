"""A run's preparation: its data, its starting model, and the caches it trains from.

Each node's first process does this while the others wait outside any collective (see
`vqabench.engine.distributed.NodePreparation`). `vqabench probe` loads its start model
and batches through the same functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqabench import events as ev
from vqabench.engine.base_checkpoint import ensure_base_checkpoint
from vqabench.engine.cache import ArrayStore
from vqabench.engine.data import easyvqa
from vqabench.engine.data.batching import EncodedData, TextEncoder, encode
from vqabench.engine.data.records import DataSplits
from vqabench.engine.data.token_limits import resolve_token_limits
from vqabench.engine.encoder_cache import attach_encoder_cache
from vqabench.engine.out_of_memory import explain_out_of_memory
from vqabench.engine.progress import Emit, Throttled
from vqabench.engine.reference import assign_mismatched
from vqabench.models import checkpoints, registry
from vqabench.models.family import LoadedModel, ModelError, Savings
from vqabench.spec import RunSpec


@dataclass
class Prepared:
    """What the run trains from: its spec with resolved token limits, the encoded data, and how
    the frozen-encoder cache was set up (run_started's ``data.encoder_cache``)."""

    spec: RunSpec
    encoded: EncodedData
    encoder_cache: dict[str, Any]


def load_data(spec: RunSpec, cache_dir: Path) -> DataSplits:
    """The run's splits; a tuning trial's (``score_test`` false) hold no test pairs at all."""
    if spec.dataset.source == "easyvqa":
        data = easyvqa.load_splits(spec.dataset, seed=spec.dataset.seed, limit=spec.limit)
    else:
        from vqabench.engine.data.hub import load_splits

        data = load_splits(spec.dataset, seed=spec.dataset.seed, limit=spec.limit, cache_dir=cache_dir / "datasets")
    # The test split is still carved (so train and eval are the same pairs as the final run's), then
    # dropped before anything reads it: a trial cannot score, tokenise or cache a test question.
    return data if spec.score_test else dataclasses.replace(data, test=[])


def load_model_and_data(spec: RunSpec, cache_dir: Path, emit: Emit) -> tuple[RunSpec, LoadedModel, DataSplits]:
    """The spec with its ``train`` resolved, the starting model (init checkpoint, embedded base, built-in variant
    or hub) and the data.

    A spec without a train line (``"auto"``, a model the host could not place before loading)
    gets its family's default here. Raises ModelError when the family cannot train the ``train`` value.
    """
    loaded: LoadedModel | None = None
    if spec.init_checkpoint is not None:
        if not Path(spec.init_checkpoint).is_dir():
            raise ModelError(
                f"the starting checkpoint '{spec.init_checkpoint}' does not exist; "
                f"run the preset named in 'after' first."
            )
        loaded = checkpoints.load_pretrained(spec.init_checkpoint)
    elif spec.model != "embedded" and registry.variant(spec.model) is None:
        loaded = checkpoints.load_pretrained(spec.model)
    data = load_data(spec, cache_dir)
    if loaded is None and spec.model == "embedded":
        # Always made from easy-VQA's base split, whatever the fine-tuning data, so it is the
        # same "pretrained" model for every dataset. Built on the CPU whatever the run's device,
        # so it is the same bytes everywhere and its cache key holds.
        folder = ensure_base_checkpoint(
            seed=spec.dataset.seed, samples=spec.base_samples, cache_dir=cache_dir, emit=emit
        )
        loaded = checkpoints.load_pretrained(str(folder))
    elif loaded is None:  # a built-in variant; a tiny one trains its tokenizer on the run's own text
        loaded = checkpoints.build_variant(spec.model, spec.seed, texts=fitting_texts(data))
    spec = spec.with_default_train(registry.default_train_of(loaded.family))
    loaded.family.check_train(spec.train)
    if spec.activation_checkpointing == "mlp":  # a family without such blocks refuses before any work
        loaded.family.checkpointed_blocks(loaded.model)
    loaded.savings = Savings(
        shared_prompt=spec.shared_prompt,
        answer_only_logits=spec.answer_only_logits,
        projected_features=loaded.family.projected_features(spec.train),
    )
    return spec, loaded, data


def fitting_texts(data: DataSplits) -> list[str]:
    """The questions and answers a tokenizer may be trained on: the train and eval splits, never test."""
    return [t for p in (*data.train, *data.eval) for t in (p.question, p.chosen, p.rejected) if t]


def encode_for_run(
    spec: RunSpec,
    data: DataSplits,
    loaded: LoadedModel,
    store: ArrayStore | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[RunSpec, EncodedData]:
    """Resolve the token limits from the data (recorded in its quality report), encode it, fix KTO's pairing.

    Images go to the array cache in `store` (None: kept in memory). Returns the spec with
    integer limits, and the encoded data.
    """
    text = TextEncoder(loaded)
    if not spec.lora_targets:  # the family's defaults, recorded in run_started's config
        spec = spec.replace(lora_targets=list(loaded.family.lora_targets))
    limits = resolve_token_limits(
        data,
        question_setting=spec.max_question_tokens,
        answer_setting=spec.max_answer_tokens,
        question_length=text.question_length,
        answer_length=text.answer_length,
        question_cap=loaded.question_token_cap,
        answer_cap=loaded.answer_token_cap,
        prompts_can_be_cut=loaded.family.prompts_can_be_cut,
    )
    spec = spec.replace(max_question_tokens=limits.question, max_answer_tokens=limits.answer)
    encoded = encode(
        data, loaded, limits.question, limits.answer, text, store=store, num_workers=spec.num_workers, progress=progress
    )
    assign_mismatched(encoded, spec.batch_size, spec.dataset.seed)
    return spec, encoded


def data_and_model(
    spec: RunSpec, cache_dir: Path, device: torch.device, emit: Emit
) -> tuple[RunSpec, LoadedModel, DataSplits]:
    """The spec with its ``train`` resolved, the starting model on the run's device, and the data."""
    spec, loaded, data = load_model_and_data(spec, cache_dir, emit)
    with explain_out_of_memory(f"moving the model to {device}", spec.batch_size):
        loaded.model.to(device)
    return spec, loaded, data


def caches(
    spec: RunSpec,
    data: DataSplits,
    loaded: LoadedModel,
    device: torch.device,
    cache_dir: Path,
    emit: Emit,
    progress: Throttled,
) -> Prepared:
    """The encoded data (images in the array cache) and, where the spec uses it, the frozen-encoder cache.

    From here on the run uses the resolved token limits; run_started's data keeps the settings.
    """
    store = ArrayStore(cache_dir / "arrays")
    spec, encoded = encode_for_run(
        spec,
        data,
        loaded,
        store=store,
        progress=progress.reporter("images", "writing preprocessed images to the cache"),
    )
    encoder_cache: dict[str, Any] = {"on": False}
    if spec.uses_encoder_cache:
        with explain_out_of_memory("encoding the images and questions once", spec.batch_size):
            info = attach_encoder_cache(
                loaded,
                encoded,
                data_fingerprint=data.fingerprint,
                dtype=spec.encoder_cache_dtype,
                batch_size=spec.batch_size,
                device=device,
                store=store,
                train=spec.train,
                progress=progress.reporter("encode", "encoding images and questions once"),
            )
        emit(ev.EncoderCached(**info.to_dict()))
        encoder_cache = {"on": True, **info.to_dict()}
    return Prepared(spec, encoded, encoder_cache)
