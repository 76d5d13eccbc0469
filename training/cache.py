"""Preprocessed-image cache: the node's one preprocessing function run once per image.

Images and their lesion masks are written as 8-bit PNG (as the thesis stores them) under
`<cache_root>/<spec.cache_key>/`, so a change of any preprocessing parameter starts a fresh
cache and identical specs share one. Each entry's file name hashes the source path, size and
modification time and its mask references, so an edited image or mask is preprocessed again.
Files appear by atomic rename: a killed run leaves no half-written PNG.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from scxnn_node.atomic_file import write_atomically
from scxnn_node.imaging.preprocess import PreprocessSpec, preprocess_image, preprocess_mask
from training.dataset import DatasetManifest, ManifestEntry
from training.masks import is_rle, read_mask
from training.source_images import read_source_pixels

log = logging.getLogger(__name__)


class CacheError(Exception):
    """Images that could not be preprocessed; the message names each row and file."""


def entry_key(entry: ManifestEntry) -> str:
    parts = [str(entry.image.resolve())]
    for p in [entry.image, *(Path(s) for s in entry.masks.values() if not is_rle(s))]:
        st = p.stat()
        parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    parts.append(json.dumps(entry.masks, sort_keys=True))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


@dataclass(frozen=True)
class CachedImage:
    """Where one entry's preprocessed image and masks live in the cache."""

    image: Path
    masks: dict[str, Path]

    def load_image(self) -> np.ndarray:
        pixels = cv2.imread(str(self.image), cv2.IMREAD_GRAYSCALE)
        if pixels is None:
            raise CacheError(f"{self.image}: cached image unreadable; delete it to rebuild")
        return pixels

    def load_mask(self, finding: str, size: int) -> np.ndarray | None:
        """The finding's preprocessed 0/1 mask, or None when the entry has none."""
        path = self.masks.get(finding)
        if path is None:
            return None
        mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if mask is None or mask.shape != (size, size):
            raise CacheError(f"{path}: cached mask unreadable; delete it to rebuild")
        return (mask > 0).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), pixels):
            raise OSError(f"cannot write {tmp}")

    write_atomically(path, write)


def _cached_paths(directory: Path, entry: ManifestEntry) -> CachedImage:
    key = entry_key(entry)
    return CachedImage(
        image=directory / f"{key}.png",
        masks={f: directory / f"{key}.mask-{f}.png" for f in entry.masks},
    )


def _preprocess_entry(args: tuple[ManifestEntry, CachedImage, PreprocessSpec]) -> str | None:
    """Preprocess one entry into the cache; returns an error message instead of raising."""
    entry, cached, spec = args
    try:
        pixels = read_source_pixels(entry.image)
        if pixels.ndim != 2:
            raise ValueError(f"expected one grayscale frame, got shape {pixels.shape}")
        _write_png(cached.image, preprocess_image(pixels, spec))
        for finding, ref in entry.masks.items():
            mask = read_mask(ref, pixels.shape[:2])
            # 255 for lesion keeps the PNG viewable; the mask is binarised again on reading.
            _write_png(cached.masks[finding], preprocess_mask(mask, spec) * 255)
    except Exception as exc:
        return f"row {entry.row} ({entry.image}): {str(exc).strip()}"
    return None


def build_cache(
    manifest: DatasetManifest,
    spec: PreprocessSpec,
    cache_root: str | Path,
    workers: int = 1,
    progress: bool = True,
) -> dict[int, CachedImage]:
    """Preprocess every entry not yet cached (in `workers` processes); map row -> cache paths."""
    directory = Path(cache_root) / spec.cache_key
    directory.mkdir(parents=True, exist_ok=True)
    spec_file = directory / "spec.json"
    if not spec_file.exists():
        spec_file.write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    cached = {e.row: _cached_paths(directory, e) for e in manifest.entries}
    todo = [
        (e, cached[e.row], spec)
        for e in manifest.entries
        if not cached[e.row].image.exists()
        or not all(p.exists() for p in cached[e.row].masks.values())
    ]
    if todo:
        log.info("preprocessing %d of %d images into %s", len(todo), len(cached), directory)
    errors: list[str] = []
    bar = tqdm(total=len(todo), desc="preprocess", unit="img", disable=not progress or not todo)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for error in pool.map(_preprocess_entry, todo, chunksize=8):
                bar.update()
                if error:
                    errors.append(error)
    else:
        for item in todo:
            error = _preprocess_entry(item)
            bar.update()
            if error:
                errors.append(error)
    bar.close()
    if errors:
        shown = "\n  ".join(errors[:20])
        raise CacheError(f"{len(errors)} image(s) could not be preprocessed:\n  {shown}")
    return cached
