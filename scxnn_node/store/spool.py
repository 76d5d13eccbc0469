"""The spool: received files and outputs on disk, written durably (temp, fsync, rename)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from scxnn_node.atomic_file import fsync_path
from scxnn_node.logs import short_hash

log = logging.getLogger(__name__)

AREAS = ("instances", "rejected", "outbox", "tmp")
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_full_disk(exc: BaseException) -> bool:
    """The file system (or the node's quota on it) is full: the place's fault, not the data's."""
    return isinstance(exc, OSError) and exc.errno in FULL_DISK_ERRNOS


def uid_file_stem(uid: str) -> str:
    """A file name stem that is a collision-free function of the whole UID (its sha256 in hex):
    UIDs that differ in any character get different files, and any UID, however long or odd,
    gives a name the file system accepts."""
    return hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()


class Spool:
    """Layout: instances/<study hash>/<sha256 of the SOP UID>.dcm, rejected/,
    outbox/<job>.<attempt>/, tmp/ (temp files, renamed into place once complete)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for area in AREAS:
            self._make_directories(self.root / area)

    def instance_path(self, study_uid: str, sop_uid: str) -> str:
        """Relative path of a received instance."""
        return f"instances/{short_hash(study_uid)}/{uid_file_stem(sop_uid)}.dcm"

    def outbox_path(self, job_id: int, attempt: str, kind: str) -> str:
        """An output's path, unique to the attempt that made it: a worker whose lease expired
        never overwrites the files of the result another worker committed."""
        return f"outbox/{job_id}.{attempt}/{kind}.dcm"

    def rejected_path(self) -> str:
        return f"rejected/{uuid.uuid4().hex}.dcm"

    def absolute(self, rel: str) -> Path:
        return self.root / rel

    def files(self, area: str) -> list[Path]:
        """The plain files directly in one area (tmp, rejected)."""
        with os.scandir(self.root / area) as entries:
            return [Path(e.path) for e in entries if e.is_file(follow_symlinks=False)]

    def write_durably(self, rel: str, chunks: list[bytes] | bytes) -> Path:
        """Write to a temp name, fsync, rename into place, fsync the directory."""
        with self._placing(rel) as tmp, open(tmp, "wb") as fh:
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        return self.root / rel

    def store_file(self, source: Path, rel: str) -> Path:
        """Put a copy of a complete file (a received instance) at `rel`, durably: hard-linked
        when `source` is on the spool's file system (no data copied), copied otherwise."""
        with self._placing(rel) as tmp:
            try:
                os.link(source, tmp)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                    raise
                shutil.copyfile(source, tmp)
            fsync_path(tmp)
        return self.root / rel

    @contextlib.contextmanager
    def _placing(self, rel: str) -> Iterator[Path]:
        """A fresh temp path to fill; renamed onto `rel` (directories made and fsynced) when
        the block succeeds, removed whatever happens: no temp file outlives a failure."""
        target = self.root / rel
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        try:
            yield tmp
            self._make_directories(target.parent)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)  # already gone after the rename
        fsync_path(target.parent)

    def _make_directories(self, directory: Path) -> None:
        """Make `directory` and its missing parents, fsyncing the parent of each one made so
        that a new directory (a study's, say) survives a power cut with the file put in it."""
        missing = []
        while not directory.is_dir():
            missing.append(directory)
            directory = directory.parent
        for new in reversed(missing):
            with contextlib.suppress(FileExistsError):  # a concurrent writer made it
                new.mkdir()
            fsync_path(new.parent)

    def now(self) -> float:
        """The spool file system's clock (seconds since the epoch): the modification time of a
        file created just now. Files are dated by it, so their ages are measured on it, not on
        this host's clock, which may disagree with it on a spool several nodes share."""
        probe = self.root / "tmp" / f"{uuid.uuid4().hex}.clock"
        try:
            # Empty, so that a full disk still has room for it (the cleaner, which frees the
            # disk, asks); not an exclusive create: NFS keeps such a create's verifier in the
            # times.
            with open(probe, "wb") as fh:
                mtime = os.fstat(fh.fileno()).st_mtime
            probe.unlink()
        except OSError as exc:  # no inode left, read-only: this host's clock, said so
            log.warning("spool clock not read (%s): using this host's", exc.strerror)
            return time.time()
        return mtime

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def remove(self, rel: str) -> None:
        path = self.root / rel
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty
