"""The frozen-encoder cache: the frozen part's output computed once per study, read by every step.

Unless ``train = "all"`` a model's frozen part (vision and question encoders, or a vision tower) is
in eval mode and never changes, so its output for a row (the family's *features*:
:meth:`~vqabench.models.family.ModelFamily.features`) never changes either. It is computed
once, in one batched pass (progress phase ``encode``), into the array cache
(:mod:`vqabench.engine.cache`, kind ``encoder``), read back by rows from the file. Two layouts:

* **Per pair** (an encoder-decoder, whose features read the question: ``family.features_read_question``): one
  ``[pairs, *feature shape]`` array per split, named after the split.
* **Per image** (a causal VLM, whose features are its vision tower's output: the image only): one
  ``"images"`` array ``[images, *feature shape]`` holding each image that a present split refers to
  once (easy-VQA asks about 10 questions per image), and per split an int64 array
  ``"<split>.rows"`` ``[pairs]``: each pair's row of ``"images"``. The key says ``layout = image``
  (a per-pair key has no layout field, so per-pair entries keep the key they had).

Training steps, eval, test generation, the
precompute reference pass and KTO's mismatched pairs all read it through
:meth:`vqabench.engine.data.batching.Batch.features_of`.

The key names the frozen modules' weights only (the encoders or the vision tower, and a causal
VLM's projector when the features are cut above it; not the language model), so SFT and every
run that starts from SFT's checkpoint share one entry; plus the family, where the features are
cut, the data, the prompt token ids (tokenizer and width), the image preprocessing (size, mean,
std and the family's grid settings: patch, merge, tiles, feature layer), the dtype, the device
type and the torch/transformers versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from vqabench.engine.cache import ArraySpec, ArrayStore, CacheError, CacheKey, EntryWriter
from vqabench.engine.data.batching import IMAGES, EncodedData, rows_array
from vqabench.models.family import LoadedModel, fingerprint_modules

log = logging.getLogger(__name__)

#: Bump when what the cached encodings mean changes (how they are computed, not the weights).
ENCODER_CACHE_VERSION = "2"
DTYPES = {"fp32": ("float32", torch.float32), "bf16": ("bfloat16", torch.bfloat16)}
SPLITS = ("train", "eval", "test")


@dataclass
class EncoderCacheInfo:
    """What one run did with the encoder cache (reported in run_started and its own event)."""

    built: bool  # this run computed the encodings (and pays `seconds`); False: reused an entry
    seconds: float  # the one-off encoding pass; 0 when reused
    path: str | None  # the entry's folder; None when kept in memory
    bytes: int  # size of the encodings
    dtype: str  # fp32 | bf16
    pairs: int
    warning: str | None = None  # one sentence when the cache folder could not be written
    images: int | None = None  # images encoded, once each (per-image layout); None: one row per pair

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def present_splits(encoded: EncodedData) -> list[str]:
    """The splits a run holds, in order: a tuning trial holds no test split (RunSpec.score_test)."""
    return [name for name in SPLITS if name in encoded.splits]


def per_image(loaded: LoadedModel) -> bool:
    """Whether the entry holds one row per image: the family's features do not read the question."""
    return not loaded.family.features_read_question


def used_images(encoded: EncodedData) -> torch.Tensor:
    """The rows of ``encoded.images`` that a present split refers to, ascending: the per-image entry's rows."""
    return torch.unique(torch.cat([encoded.splits[n].image_index for n in present_splits(encoded)]))


def encoder_fingerprint(loaded: LoadedModel, train: str) -> str:
    """Hash of the frozen modules' weights (encoders or vision tower), not the trained ones."""
    return fingerprint_modules(loaded.family.frozen_modules(loaded.model, train))


def encoder_cache_key(
    loaded: LoadedModel,
    encoded: EncodedData,
    data_fingerprint: str,
    dtype: str,
    device: torch.device,
    train: str = "decoder",
) -> CacheKey:
    import transformers

    layout = {"layout": "image"} if per_image(loaded) else {}  # per pair: no field, keys as before
    questions = hashlib.sha256()
    for name in present_splits(encoded):
        s = encoded.splits[name]
        questions.update(name.encode())
        for tensor in (s.image_index, s.question_ids, s.question_mask):
            questions.update(str(tuple(tensor.shape)).encode())
            questions.update(tensor.contiguous().numpy().tobytes())
    return CacheKey(
        "encoder",
        {
            "family": loaded.family.name,
            "encoders": encoder_fingerprint(loaded, train),
            "data": data_fingerprint,
            "questions": questions.hexdigest()[:24],
            "images": encoded.images.key.digest,
            "normalisation": f"{tuple(loaded.image_mean)} {tuple(loaded.image_std)}",
            "image_settings": json.dumps(loaded.family.image_settings(loaded), sort_keys=True),
            # Above a frozen projector the entry holds image-token embeddings, not the tower's output.
            "cut": "projector" if loaded.savings.projected_features else "encoder",
            "dtype": dtype,
            "device": device.type,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "code": ENCODER_CACHE_VERSION,
            **layout,
        },
    )


def attach_encoder_cache(
    loaded: LoadedModel,
    encoded: EncodedData,
    *,
    data_fingerprint: str,
    dtype: str,
    batch_size: int,
    device: torch.device,
    store: ArrayStore,
    train: str = "decoder",
    progress: Callable[[int, int], None] | None = None,
) -> EncoderCacheInfo:
    """Open the cached question encodings for this model and data, or compute them once; attach them to `encoded`.

    A folder that cannot be written (or fills up) does not fail the run: the encodings are
    kept in memory instead, with one warning sentence in the returned info.
    """
    encoded.encodings = None  # the pass below reads images
    key = encoder_cache_key(loaded, encoded, data_fingerprint, dtype, device, train)
    stored, torch_dtype = DTYPES[dtype]
    pairs = sum(len(encoded.splits[n]) for n in present_splits(encoded))
    images = int(used_images(encoded).shape[0]) if per_image(loaded) else None
    entry = store.open(key)
    if entry is not None:
        log.info("question encodings read from %s", entry.path)
        encoded.encodings = entry
        return EncoderCacheInfo(False, 0.0, str(entry.path), entry.nbytes, dtype, pairs, images=images)
    family = loaded.family
    if images is not None:
        specs = [ArraySpec(IMAGES, (images, *family.features_shape(loaded, 0)), stored)] + [
            ArraySpec(rows_array(n), (len(encoded.splits[n]),), "int64") for n in present_splits(encoded)
        ]
    else:
        specs = [
            ArraySpec(
                n,
                (len(encoded.splits[n]), *family.features_shape(loaded, int(encoded.splits[n].question_ids.shape[1]))),
                stored,
            )
            for n in present_splits(encoded)
        ]
    start = time.perf_counter()
    warning = None
    try:
        entry = _encode_all(loaded, encoded, store, key, specs, torch_dtype, batch_size, device, progress)
    except CacheError as exc:
        warning = (
            f"the encoder cache folder '{exc.folder}' cannot be written ({exc.reason}); "
            f"the question encodings are kept in memory for this run."
        )
        log.warning(warning)
        entry = _encode_all(loaded, encoded, ArrayStore(None), key, specs, torch_dtype, batch_size, device, progress)
    encoded.encodings = entry
    path = str(entry.path) if entry.path is not None else None
    return EncoderCacheInfo(True, time.perf_counter() - start, path, entry.nbytes, dtype, pairs, warning, images)


def _encode_all(
    loaded: LoadedModel,
    encoded: EncodedData,
    store: ArrayStore,
    key: CacheKey,
    specs: list[ArraySpec],
    torch_dtype: torch.dtype,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
):
    writer = store.create(key, specs)
    model = loaded.model
    was_training = model.training
    model.eval()
    try:
        if IMAGES in writer.specs:
            _encode_images(loaded, encoded, writer, torch_dtype, batch_size, device, progress)
        else:
            _encode_pairs(loaded, encoded, writer, torch_dtype, batch_size, device, progress)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        model.train(was_training)


def _encode_pairs(
    loaded: LoadedModel,
    encoded: EncodedData,
    writer: EntryWriter,
    torch_dtype: torch.dtype,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> None:
    """One feature row per pair, split by split (features that read the question)."""
    model = loaded.model
    total = sum(-(-len(encoded.splits[n]) // batch_size) for n in present_splits(encoded))
    done = 0
    with torch.no_grad():
        for name in present_splits(encoded):
            s = encoded.splits[name]
            n = len(s)
            blocks = [torch.arange(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]
            for batch in encoded.batches(name, blocks, device):
                # The split's full prompt width, whatever width a batch is trimmed to: the
                # family trims what a batch reads (a question encoding: its first positions).
                q_ids, q_mask = s.question_ids[batch.rows].to(device), s.question_mask[batch.rows].to(device)
                assert batch.pixel_values is not None
                q = loaded.family.features(model, batch.pixel_values, q_ids, q_mask, loaded.savings)
                writer.write(name, q.to(torch_dtype))
                done += 1
                if progress is not None:
                    progress(done, total)


def _encode_images(
    loaded: LoadedModel,
    encoded: EncodedData,
    writer: EntryWriter,
    torch_dtype: torch.dtype,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> None:
    """The per-image layout: each used image through the frozen part once, then each split's pair -> row map."""
    used = used_images(encoded)
    blocks = [torch.arange(lo, min(lo + batch_size, len(used))) for lo in range(0, len(used), batch_size)]
    with torch.no_grad():
        for done, pixels in enumerate(encoded.image_batches(used, blocks, device), start=1):
            none = torch.zeros((pixels.shape[0], 0), dtype=torch.long, device=device)  # the question is not read
            features = loaded.family.features(loaded.model, pixels, none, none, loaded.savings)
            writer.write(IMAGES, features.to(torch_dtype))
            if progress is not None:
                progress(done, len(blocks))
    for name in present_splits(encoded):
        writer.write(rows_array(name), torch.searchsorted(used, encoded.splits[name].image_index))
