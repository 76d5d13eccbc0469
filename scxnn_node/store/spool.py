"""The spool: received files and outputs on disk, written durably (temp, fsync, rename)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from scxnn_node.logs import short_hash


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Layout: instances/<study hash>/<sop uid>.dcm, rejected/, outbox/<job>.<attempt>/, tmp/."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        for sub in ("instances", "rejected", "outbox", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, sop_uid: str) -> str:
        """Relative path of a received instance (UIDs are safe file names: digits and dots)."""
        safe = "".join(c for c in sop_uid if c.isdigit() or c == ".") or short_hash(sop_uid)
        return f"instances/{short_hash(study_uid)}/{safe}.dcm"

    def outbox_path(self, job_id: int, attempt: str, kind: str) -> str:
        """An output's path, unique to the attempt that made it: a worker whose lease expired
        never overwrites the files of the result another worker committed."""
        return f"outbox/{job_id}.{attempt}/{kind}.dcm"

    def rejected_path(self) -> str:
        return f"rejected/{uuid.uuid4().hex}.dcm"

    def absolute(self, rel: str) -> Path:
        return self.root / rel

    def write_durably(self, rel: str, chunks: list[bytes] | bytes) -> Path:
        """Write to a temp name, fsync, rename into place, fsync the directory."""
        target = self.root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as fh:
            for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
        return target

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def remove(self, rel: str) -> None:
        path = self.root / rel
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # only when empty
