"""Files with the same bytes: a file's sha256, and the copies among a list of files (a copy of
an image under another patient would straddle the patient-level split)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

_HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def duplicate_content(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(first, later) index pairs of files with identical bytes. Files are grouped by size and
    hashed only where sizes collide; missing and empty files are left out."""
    by_size: dict[int, list[int]] = {}
    for i, path in enumerate(paths):
        try:
            size = path.stat().st_size
        except OSError:
            continue
        if size:
            by_size.setdefault(size, []).append(i)
    pairs: list[tuple[int, int]] = []
    for candidates in by_size.values():
        if len(candidates) < 2:
            continue
        first_by_hash: dict[str, int] = {}
        for i in candidates:
            digest = file_sha256(paths[i])
            if digest in first_by_hash:
                pairs.append((first_by_hash[digest], i))
            else:
                first_by_hash[digest] = i
    return sorted(pairs, key=lambda pair: pair[1])
