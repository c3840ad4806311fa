"""Preference datasets from the Hugging Face hub or local files, as train/eval/test pairs.

Sources (``DatasetSpec.source``):

* ``hf:OWNER/NAME`` — ``datasets.load_dataset(NAME, config, revision=...)``, every split;
* ``hf:OWNER/NAME/PATH`` — one file (or glob) inside a hub dataset repository, read with the
  parquet/json/arrow builder from ``hf://datasets/OWNER/NAME@REVISION/PATH`` (for repositories
  whose files have different schemas, or that still ship a loading script);
* a local ``.parquet``, ``.json``, ``.jsonl`` or ``.arrow`` file (``load_dataset`` with
  ``data_files``), a folder written by ``save_to_disk`` (``load_from_disk``) or a folder of
  such files named by split (``load_dataset(folder)``).

After loading, every source takes the same path: schema detection (schemas.py), rows to
pairs with images resolved and verified once (images.py), the skip-share check, splits
(splits.py), the train limit and a fingerprint of the exact pairs and image
bytes that keys reference caches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from vqabench.engine.data.images import MISSING_IMAGE, NO_IMAGE, ImageStore, LazyImages
from vqabench.engine.data.records import (
    DataError,
    DataSplits,
    PreferencePair,
    QualityReport,
)
from vqabench.engine.data.schemas import RowPair, Schema, read_row, resolve_schema
from vqabench.engine.data.splits import carve, limit_train, sample
from vqabench.spec import DatasetSpec

log = logging.getLogger(__name__)

BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow"}
EVAL_SPLIT_NAMES = ("validation", "valid", "val", "eval", "dev")
ROLES = ("train", "eval", "test")


@dataclass
class OpenedSource:
    """A loaded dataset before any interpretation: its splits and where relative images live."""

    name: str
    splits: dict[str, Any]  # split name -> datasets.Dataset
    image_root: Path | None


def _builder_for(filename: str, source: str) -> str:
    for suffix, builder in BUILDERS.items():
        if filename.lower().endswith(suffix):
            return builder
    raise DataError(
        f"dataset.source = {source!r}: cannot read {Path(filename).name!r}; "
        f"allowed files are .parquet, .json, .jsonl and .arrow, or a save_to_disk folder."
    )


def _as_splits(loaded: Any) -> dict[str, Any]:
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    if isinstance(loaded, datasets.Dataset):
        return {"train": loaded}
    raise DataError(f"expected a datasets Dataset or DatasetDict, got {type(loaded).__name__}.")


def _load_error(source: str, error: Exception) -> DataError:
    first_line = (str(error).strip().splitlines() or [""])[0].rstrip(".")
    return DataError(f"dataset.source = {source!r} could not be loaded ({type(error).__name__}: {first_line}).")


def open_source(spec: DatasetSpec, cache_dir: str | Path | None = None) -> OpenedSource:
    """Load the dataset named by `spec.source` with `datasets`, without interpreting its rows."""
    import datasets

    if cache_dir is not None:
        cache_dir = str(cache_dir)  # datasets documents a str
    source = spec.source
    explicit_root = Path(spec.image_root).expanduser() if spec.image_root else None
    try:
        if source.startswith("hf:"):
            ref = source[3:]
            if os.path.isdir(ref) or ref.count("/") <= 1:
                loaded = datasets.load_dataset(ref, spec.config, revision=spec.revision, cache_dir=cache_dir)
                default_root = Path(ref) if os.path.isdir(ref) else None
                return OpenedSource(ref, _as_splits(loaded), explicit_root or default_root)
            owner, repo, path_in_repo = ref.split("/", 2)
            builder = _builder_for(path_in_repo, source)
            at = "@" + quote(spec.revision, safe="") if spec.revision else ""
            url = f"hf://datasets/{owner}/{repo}{at}/{path_in_repo}"
            loaded = datasets.load_dataset(builder, data_files=url, cache_dir=cache_dir)
            return OpenedSource(ref, _as_splits(loaded), explicit_root)

        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(
                f'dataset.source = {source!r}: no such file or folder; use "easyvqa", "hf:NAME", '
                f"or a path to a .parquet, .json, .jsonl or .arrow file or a save_to_disk folder."
            )
        if path.is_dir():
            if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path), cache_dir=cache_dir)
            return OpenedSource(path.name, _as_splits(loaded), explicit_root or path)
        builder = _builder_for(path.name, source)
        loaded = datasets.load_dataset(builder, data_files=str(path), cache_dir=cache_dir)
        return OpenedSource(path.name, _as_splits(loaded), explicit_root or path.parent)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFound, DatasetNotFound, Connection, Arrow...)
        raise _load_error(source, error) from error


def assign_roles(splits: dict[str, Any], wanted: str | None, name: str) -> dict[str, Any]:
    """Map the dataset's splits to train and, where present, eval and test."""
    names = list(splits)
    if wanted is not None:
        if wanted not in splits:
            raise DataError(
                f"dataset.split = {wanted!r}: dataset '{name}' has no such split; it has {', '.join(names)}."
            )
        train = wanted
    elif "train" in splits:
        train = "train"
    elif len(names) == 1:
        train = names[0]
    else:
        raise DataError(
            f"dataset '{name}' has the splits {', '.join(names)} and none is called train; "
            f"set dataset.split to the one to train on."
        )
    roles = {"train": splits[train]}
    if "test" in splits and train != "test":
        roles["test"] = splits["test"]
    eval_name = next((n for n in EVAL_SPLIT_NAMES if n in splits and n != train), None)
    if eval_name is not None:
        roles["eval"] = splits[eval_name]
    return roles


def without_image_decoding(ds: Any) -> Any:
    """The dataset with Image columns returning {"bytes", "path"} rather than decoded PIL images."""
    import datasets

    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):  # List / Sequence of images
            ds = ds.cast_column(column, type(feature)(datasets.Image(decode=False)))
    return ds


def build_pairs(
    ds: Any, schema: Schema, store: ImageStore, report: QualityReport, chunk_rows: int = 512
) -> list[PreferencePair]:
    """Every usable row of one split as a pair; unusable rows are counted in `report` by reason.

    Rows are reduced to text first; their images are then resolved a chunk at a time, so the
    distinct new images of a chunk are checked in parallel.
    """
    pairs: list[PreferencePair] = []
    pending: list[RowPair] = []

    def resolve_pending() -> None:
        for got, found in zip(pending, store.lookup_many([p.image for p in pending]), strict=True):
            if found.image_id is None:
                report.skip(found.skip_reason or MISSING_IMAGE)
            else:
                pairs.append(PreferencePair(found.image_id, got.question, got.chosen, got.rejected))
        pending.clear()

    for row in ds.select_columns(schema.columns_used()):
        report.rows_read += 1
        got = read_row(schema, row)
        if isinstance(got, str):
            report.skip(got)
            continue
        pending.append(got)
        if len(pending) >= chunk_rows:
            resolve_pending()
    resolve_pending()
    report.pairs_built += len(pairs)
    return pairs


def _main_reason(skipped: dict[str, int], exclude: tuple[str, ...] = ()) -> tuple[str, int]:
    candidates = [(count, reason) for reason, count in skipped.items() if reason not in exclude]
    count, reason = max(candidates)
    return reason, count


def check_skips(report: QualityReport, max_skip_share: float, name: str, image_root: Path | None) -> None:
    """Fail when nothing is usable, or when more than `max_skip_share` of the image rows were skipped.

    Text-only rows (no image at all, e.g. mllm-dpo's language-only preferences) are outside
    a VQA benchmark's scope: they are counted as `no_image` but left out of the share.
    """
    root_hint = f" (relative image paths are resolved against {image_root or Path.cwd()}; set dataset.image_root)"
    if report.rows_read == 0:
        raise DataError(f"dataset '{name}' has no rows.")
    if report.pairs_built == 0:
        reason, count = _main_reason(report.skipped)
        hint = (
            root_hint if reason == MISSING_IMAGE else (" (check dataset.columns.image)" if reason == NO_IMAGE else "")
        )
        raise DataError(
            f"dataset '{name}' gave no usable pairs from {report.rows_read} rows; the main reason is "
            f"{reason} ({count} rows){hint}."
        )
    text_only = report.skipped.get(NO_IMAGE, 0)
    considered = report.rows_read - text_only
    bad = report.skipped_total - text_only
    if considered > 0 and bad / considered > max_skip_share:
        reason, count = _main_reason(report.skipped, exclude=(NO_IMAGE,))
        hint = root_hint if reason == MISSING_IMAGE else ""
        raise DataError(
            f"dataset '{name}': {bad} of {considered} rows with an image were skipped "
            f"({bad / considered:.0%}), more than dataset.max_skip_share = {max_skip_share:.0%}; "
            f"the main reason is {reason} ({count} rows){hint}."
        )


def fingerprint(parts: dict[str, list[PreferencePair]], store: ImageStore) -> str:
    """SHA-256 over every pair of every split, in order, and the bytes hash of every image used."""
    h = hashlib.sha256(b"vqabench-pairs-v1\n")
    used: set[str] = set()
    for role in ROLES:
        h.update(f"[{role}]\n".encode())
        for p in parts[role]:
            h.update(json.dumps([p.image_id, p.question, p.chosen, p.rejected]).encode() + b"\n")
            used.add(p.image_id)
    for image_id in sorted(used):
        h.update(f"{image_id} {store.digest(image_id)}\n".encode())
    return h.hexdigest()[:16]


def split_pairs(
    pairs: dict[str, list[PreferencePair]], spec: DatasetSpec, seed: int, name: str
) -> dict[str, list[PreferencePair]]:
    """Use the dataset's own eval/test splits where it has them; carve the missing ones from train."""
    to_carve: dict[str, int] = {}
    if "test" not in pairs:
        if spec.test_size == 0:
            raise DataError(
                f"dataset.test_size = 0 means the whole test split, but dataset '{name}' has none; "
                f"set dataset.test_size to the number of pairs to hold out for testing."
            )
        to_carve["test"] = spec.test_size
    if "eval" not in pairs:
        to_carve["eval"] = spec.eval_size
    carved = carve(pairs["train"], to_carve, seed)
    test = carved["test"] if "test" in carved else sample(pairs["test"], spec.test_size, seed)
    if "eval" in carved:
        eval_ = carved["eval"]
    else:
        eval_ = sample(pairs["eval"], spec.eval_size, seed) if spec.eval_size > 0 else []
    train = carved["train"]
    if not train:
        images = len({p.image_id for p in pairs["train"]})
        raise DataError(
            f"dataset '{name}' has {len(pairs['train'])} usable train pairs on {images} images, all "
            f"taken by the held-out parts (dataset.eval_size = {spec.eval_size}, "
            f"dataset.test_size = {spec.test_size}); lower them."
        )
    if not test:
        raise DataError(f"dataset '{name}' left no test pairs; check dataset.test_size and the test split.")
    return {"train": train, "eval": eval_, "test": test}


def load_splits(
    spec: DatasetSpec,
    *,
    seed: int,
    limit: int | None,
    cache_dir: str | Path | None = None,
) -> DataSplits:
    """Load a hub or local preference dataset as train/eval/test pairs with their images and report.

    `seed` fixes the carved splits and the train subset `limit` picks (pass the dataset seed,
    so every method and run seed of a study sees the same pairs); `cache_dir` is where
    `datasets` keeps its Arrow cache (None: its default).
    """
    opened = open_source(spec, cache_dir=cache_dir)
    roles = {
        role: without_image_decoding(ds) for role, ds in assign_roles(opened.splits, spec.split, opened.name).items()
    }
    train_ds = roles["train"]
    first_row = train_ds[0] if len(train_ds) else None
    schema = resolve_schema(spec, list(train_ds.column_names), first_row, opened.name)
    log.info("dataset %s: schema %s", opened.name, json.dumps(schema.describe()))

    for role, ds in roles.items():
        missing = [c for c in schema.columns_used() if c not in ds.column_names]
        if missing:
            raise DataError(
                f"dataset '{opened.name}': its {role} split lacks the column(s) {', '.join(missing)} "
                f"that its train split has; its columns are {', '.join(ds.column_names)}."
            )
    store = ImageStore(opened.image_root)
    report = QualityReport()
    pairs = {role: build_pairs(ds, schema, store, report) for role, ds in roles.items()}
    check_skips(report, spec.max_skip_share, opened.name, opened.image_root)

    parts = split_pairs(pairs, spec, seed, opened.name)
    parts["train"] = limit_train(parts["train"], limit, seed)
    every_pair = [p for role in ROLES for p in parts[role]]
    images = LazyImages(store, [pair.image_id for pair in every_pair])
    return DataSplits(
        train=parts["train"],
        eval=parts["eval"],
        test=parts["test"],
        images=images,
        report=report,
        name=opened.name,
        fingerprint=fingerprint(parts, store),
    )
