"""Writing a file so that a reader (or a crash) sees the old content or the new, never a torn one.

Every writer goes through `write_atomically`: the content is written under a temporary name in
the same directory (or `tmp_dir` on the same file system) and renamed onto the target. With
`durable` the file and the target's directory are fsynced as well, so the new content survives
a power cut once the call returns (the spool's receipt rule); without it a crash may lose the
new content but never leaves half of it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk (a read-only descriptor is enough)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: str | Path,
    write: Callable[[Path], object],
    durable: bool = False,
    tmp_dir: str | Path | None = None,
) -> Path:
    """Call `write(tmp)` to fill a temporary file, then rename it onto `path` (parents made).

    The temporary name keeps `path`'s suffix (some writers pick the codec by it, e.g. OpenCV)
    and is unique per call, so concurrent writers of one target never share a temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent if tmp_dir is None else Path(tmp_dir)
    tmp = folder / f".{path.stem}.{uuid.uuid4().hex}.tmp{path.suffix}"
    try:
        write(tmp)
        if durable:
            fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)
    return path


def write_bytes_atomically(
    path: str | Path,
    data: bytes | Iterable[bytes],
    durable: bool = False,
    tmp_dir: str | Path | None = None,
) -> Path:
    """`data` (bytes, or chunks of bytes) as the whole content of `path`; see write_atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for chunk in [data] if isinstance(data, bytes) else data:
                fh.write(chunk)

    return write_atomically(path, write, durable, tmp_dir)


def write_text_atomically(path: str | Path, text: str, durable: bool = False) -> Path:
    """`text` as UTF-8 as the whole content of `path`; see write_atomically."""
    return write_bytes_atomically(path, text.encode("utf-8"), durable)
