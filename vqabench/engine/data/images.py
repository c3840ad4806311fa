"""Images of a preference dataset: resolve each row's image, check it decodes, load it once.

A row's image may be a path (relative paths are resolved against an image root), raw bytes,
a ``{"bytes", "path"}`` dict (what a `datasets` Image feature stores), a PIL image, or a list
of any of these (the first is used). Every distinct image is identified by the SHA-256 of its
bytes, so the same picture reached by two paths is one image (and lands in one split).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

#: Skip reasons this module reports (keys of QualityReport.skipped).
NO_IMAGE = "no_image"  # the row names no image at all (a text-only row)
MISSING_IMAGE = "missing_image"  # a path that does not exist, or a remote URL
CORRUPT_IMAGE = "corrupt_image"  # bytes or a file that does not decode as an image

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageLookup:
    """The outcome of resolving one row's image: an id, or the reason it is unusable."""

    image_id: str | None
    skip_reason: str | None = None


@dataclass(frozen=True)
class _Source:
    path: str | None
    data: bytes | None
    digest: str  # full sha256 hex of the bytes


def first_image_value(value: Any) -> Any:
    """The first image of a list-of-images cell (TRL's `images`), or the value itself."""
    while isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    return value


def _pil_to_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_decodes(data: bytes) -> bool:
    """True if `data` decodes completely as an image (JPEGs at reduced scale, which is faster)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format == "JPEG":
                im.draft("RGB", (64, 64))
            im.load()
        return True
    except _DECODE_ERRORS:
        return False


class ImageStore:
    """Resolves row images to content ids, verifying each distinct image once.

    Distinct images are read and decoded on a small thread pool (PIL releases the GIL while
    decoding). Only the path (or, for embedded images, the bytes) is kept per image; pixels
    are decoded for good by :meth:`load_rgb` once the pairs that use them are known.
    """

    def __init__(self, image_root: str | os.PathLike[str] | None, workers: int | None = None):
        self.image_root = Path(image_root) if image_root is not None else None
        self.workers = workers or min(8, os.cpu_count() or 1)
        self._by_path: dict[str, ImageLookup] = {}
        self._by_digest: dict[str, ImageLookup] = {}
        self._sources: dict[str, _Source] = {}

    def resolve_path(self, value: str) -> Path:
        path = Path(os.path.expanduser(value))
        if not path.is_absolute() and self.image_root is not None:
            path = self.image_root / path
        return path

    def lookup(self, value: Any) -> ImageLookup:
        """Resolve one cell's image to an id (verified to decode) or a skip reason."""
        return self.lookup_many([value])[0]

    def lookup_many(self, values: list[Any]) -> list[ImageLookup]:
        """Resolve many cells at once, examining each image not seen before exactly once."""
        prepared = [self._prepare(v) for v in values]
        todo: dict[tuple[str, str], bytes | None] = {}
        for item in prepared:
            if isinstance(item, tuple) and item[:2] not in todo and self._known(item) is None:
                todo[item[:2]] = item[2]
        if todo:
            keys = list(todo)
            with ThreadPoolExecutor(max_workers=min(self.workers, len(keys))) as pool:
                examined = list(pool.map(lambda key: _examine(key, todo[key]), keys))
            for key, (digest, data, reason) in zip(keys, examined, strict=True):
                self._register(key, digest, data, reason)
        return [item if isinstance(item, ImageLookup) else self._known(item) for item in prepared]  # type: ignore[misc]

    def _prepare(self, value: Any) -> ImageLookup | tuple[str, str, bytes | None]:
        """An immediate result, or ("path", resolved path, None) / ("bytes", sha256, bytes) to examine."""
        value = first_image_value(value)
        if value is None:
            return ImageLookup(None, NO_IMAGE)
        if isinstance(value, Image.Image):
            value = _pil_to_png(value)
        if isinstance(value, dict):
            data = value.get("bytes")
            value = bytes(data) if data else value.get("path")
            if not value:
                return ImageLookup(None, NO_IMAGE)
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            return ("bytes", hashlib.sha256(data).hexdigest(), data)
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return ImageLookup(None, NO_IMAGE)
            if "://" in value:
                return ImageLookup(None, MISSING_IMAGE)  # no network: remote images cannot be loaded
            return ("path", str(self.resolve_path(value)), None)
        return ImageLookup(None, CORRUPT_IMAGE)

    def _known(self, item: tuple[str, str, bytes | None]) -> ImageLookup | None:
        kind, key, _ = item
        return self._by_path.get(key) if kind == "path" else self._by_digest.get(key)

    def _register(self, key: tuple[str, str], digest: str | None, data: bytes | None, reason: str | None) -> None:
        kind, name = key
        if digest is None:  # a path that could not be read
            self._by_path[name] = ImageLookup(None, reason)
            return
        if digest not in self._by_digest:
            if reason is None:
                image_id = digest[:20]
                self._sources[image_id] = _Source(name if kind == "path" else None, data, digest)
                self._by_digest[digest] = ImageLookup(image_id)
            else:
                self._by_digest[digest] = ImageLookup(None, reason)
        if kind == "path":
            self._by_path[name] = self._by_digest[digest]

    def digest(self, image_id: str) -> str:
        """The full SHA-256 of an image's bytes (for fingerprints)."""
        return self._sources[image_id].digest

    def load_rgb(self, image_id: str) -> Image.Image:
        """Decode one verified image as RGB, fully in memory."""
        source = self._sources[image_id]
        raw = source.data if source.data is not None else Path(source.path).read_bytes()  # type: ignore[arg-type]
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")

    def load_many_rgb(self, image_ids: list[str]) -> dict[str, Image.Image]:
        """Decode several verified images as RGB on the thread pool."""
        unique = list(dict.fromkeys(image_ids))
        if not unique:
            return {}
        with ThreadPoolExecutor(max_workers=min(self.workers, len(unique))) as pool:
            return dict(zip(unique, pool.map(self.load_rgb, unique), strict=True))


class LazyImages(Mapping[str, Image.Image]):
    """Verified images by id, decoded on each access and not kept: a dataset need not fit in memory.

    The batching code reads each image once, to write its preprocessed pixels to the on-disk
    image cache, and never again.
    """

    def __init__(self, store: ImageStore, image_ids: list[str]):
        self._store = store
        self._ids = dict.fromkeys(image_ids)

    def __getitem__(self, image_id: str) -> Image.Image:
        if image_id not in self._ids:
            raise KeyError(image_id)
        return self._store.load_rgb(image_id)

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def _examine(key: tuple[str, str], data: bytes | None) -> tuple[str | None, bytes | None, str | None]:
    """(sha256, bytes to keep, skip reason) for one image; runs on a worker thread, touches no state."""
    kind, name = key
    if kind == "path":
        try:
            raw = Path(name).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            return None, None, MISSING_IMAGE
        digest, keep = hashlib.sha256(raw).hexdigest(), None
    else:
        raw, digest, keep = data or b"", name, data
    return digest, keep, None if raw and check_decodes(raw) else CORRUPT_IMAGE
