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

    Only the path (or, for embedded images, the bytes) is kept per image; pixels are decoded
    for good by :meth:`load_rgb` once the pairs that use them are known.
    """

    def __init__(self, image_root: str | os.PathLike[str] | None):
        self.image_root = Path(image_root) if image_root is not None else None
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
        value = first_image_value(value)
        if value is None:
            return ImageLookup(None, NO_IMAGE)
        if isinstance(value, Image.Image):
            return self._from_bytes(_pil_to_png(value), path=None)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._from_bytes(bytes(value), path=None)
        if isinstance(value, dict):
            data = value.get("bytes")
            if data:
                return self._from_bytes(bytes(data), path=None)
            value = value.get("path")
            if not value:
                return ImageLookup(None, NO_IMAGE)
        if isinstance(value, str):
            if not value.strip():
                return ImageLookup(None, NO_IMAGE)
            return self._from_path(value.strip())
        return ImageLookup(None, CORRUPT_IMAGE)

    def _from_path(self, value: str) -> ImageLookup:
        if "://" in value:
            return ImageLookup(None, MISSING_IMAGE)  # no network: remote images cannot be loaded
        path = str(self.resolve_path(value))
        if path in self._by_path:
            return self._by_path[path]
        try:
            data = Path(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
            result = ImageLookup(None, MISSING_IMAGE)
        else:
            result = self._from_bytes(data, path=path)
        self._by_path[path] = result
        return result

    def _from_bytes(self, data: bytes, path: str | None) -> ImageLookup:
        digest = hashlib.sha256(data).hexdigest()
        if digest in self._by_digest:
            return self._by_digest[digest]
        if not data or not check_decodes(data):
            result = ImageLookup(None, CORRUPT_IMAGE)
        else:
            image_id = digest[:20]
            result = ImageLookup(image_id)
            self._sources[image_id] = _Source(path, None if path else data, digest)
        self._by_digest[digest] = result
        return result

    def digest(self, image_id: str) -> str:
        """The full SHA-256 of an image's bytes (for fingerprints)."""
        return self._sources[image_id].digest

    def load_rgb(self, image_id: str) -> Image.Image:
        """Decode one verified image as RGB, fully in memory."""
        source = self._sources[image_id]
        raw = source.data if source.data is not None else Path(source.path).read_bytes()  # type: ignore[arg-type]
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")
