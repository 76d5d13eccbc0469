"""The cleaner: keeps disk and database from growing without bound (spool retention, leftover
temp and rejected files, the free-disk watermark, old events, the SQLite write-ahead log)."""

from __future__ import annotations

import logging
import os
import shutil
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select

from scxnn_node.config import NodeConfig
from scxnn_node.store.audit import append_audit
from scxnn_node.store.db import Database
from scxnn_node.store.models import AuditAction, Delivery, Event
from scxnn_node.store.retention import expired_instances, forget_outputs, unneeded_outputs
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)

EVENT_RETENTION_DAYS = 90
# A temp file this old belongs to no write in progress (a receipt lasts seconds; the network
# timeout ends a stalled one): a crash or kill left it behind.
TEMP_FILE_MAX_AGE_SECONDS = 3600.0


class Cleaner:
    """Each method is one cleaning task, safe to call at any time (the scheduler times them)."""

    def __init__(self, config: NodeConfig, db: Database, spool: Spool) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.disk_low = False

    def purge_spool(self) -> int:
        """Delete what store.retention says may go: received files of finished studies past
        the retention and the amendment window, and outputs no delivery still needs. Returns
        how many received files were purged."""
        storage = self.config.storage
        now = self.db.now()
        cutoff = now - timedelta(days=storage.retention_days)
        window = storage.amendment_window_days or storage.retention_days
        purged = 0
        with self.db.session() as session:
            for instance in expired_instances(session, cutoff, now - timedelta(days=window)):
                self.spool.remove(instance.path)
                instance.path = ""  # the row stays: the UID is still known, its file is not
                append_audit(
                    session,
                    AuditAction.PURGED,
                    study_uid=instance.study_instance_uid,
                    instance_uid=instance.sop_instance_uid,
                    outcome="retention",
                    size_bytes=instance.size,
                )
                purged += 1
        outputs = unneeded_outputs(self.db, cutoff)
        for path in outputs:
            self.spool.remove(path)
        forget_outputs(self.db, outputs)
        return purged

    def sweep_leftovers(self) -> None:
        """The sweeps of files no row points at (at start, then with the retention)."""
        self.sweep_temp_files()
        self.sweep_rejected()

    def sweep_temp_files(self) -> int:
        """Delete temp files older than TEMP_FILE_MAX_AGE_SECONDS; returns how many."""
        cutoff = self.spool.now() - TEMP_FILE_MAX_AGE_SECONDS
        swept = sum(_unlink(path) for path, mtime, _ in self._aged("tmp") if mtime < cutoff)
        if swept:
            log.warning("%d temp file(s) left by an interrupted write deleted", swept)
        return swept

    def sweep_rejected(self) -> int:
        """Delete rejected files older than storage.rejected_retention_days, then the oldest
        while the rest exceed storage.rejected_max_bytes; returns how many."""
        storage = self.config.storage
        cutoff = self.spool.now() - storage.rejected_retention_days * 86400
        kept_bytes = 0
        swept = 0
        for path, mtime, size in sorted(self._aged("rejected"), key=lambda f: -f[1]):
            if mtime < cutoff or kept_bytes + size > storage.rejected_max_bytes:
                swept += _unlink(path)
            else:
                kept_bytes += size
        if swept:
            log.info("%d rejected file(s) deleted (age or storage.rejected_max_bytes)", swept)
        return swept

    def _aged(self, area: str) -> list[tuple[Path, float, int]]:
        """(path, mtime, size) of the files of a spool area (one gone meanwhile is left out)."""
        found = []
        for path in self.spool.files(area):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            found.append((path, stat.st_mtime, stat.st_size))
        return found

    def sweep_orphan_outputs(self) -> int:
        """Delete outbox entries no delivery names once older than twice worker.lease_seconds:
        an attempt killed between writing its outputs and committing them left them (a live
        attempt commits, or loses its lease, well within that). Returns how many."""
        named = _outbox_entries_in_use(self.db)  # read first: one committed after is young
        cutoff = self.spool.now() - 2 * self.config.worker.lease_seconds
        with os.scandir(self.spool.absolute("outbox")) as entries:
            unnamed = [Path(e.path) for e in entries if e.name not in named]
        swept = 0
        for entry in unnamed:
            newest = _newest_mtime(entry)
            if newest is not None and newest < cutoff:
                swept += _remove_entry(entry)
        if swept:
            log.warning("%d outbox folder(s) of attempts that never committed deleted", swept)
        return swept

    def check_disk(self) -> bool:
        """True while free space is above the watermark; the SCP refuses C-STORE below it."""
        low = self.spool.free_bytes() < self.config.storage.min_free_bytes
        if low and not self.disk_low:
            log.error("free disk below storage.min_free_bytes: C-STORE answers 0xA700")
            self.db.record_event("disk", "free disk below the watermark", level="ERROR")
        self.disk_low = low
        return not low

    def prune_events(self) -> None:
        """Events older than EVENT_RETENTION_DAYS are deleted (audit records never are)."""
        with self.db.session() as session:
            session.execute(
                delete(Event).where(Event.at < self.db.now() - timedelta(days=EVENT_RETENTION_DAYS))
            )

    def housekeeping(self) -> None:
        self.prune_events()
        self.db.checkpoint()


def _unlink(path: Path) -> int:
    """1 if this call deleted the file, 0 if it was gone already."""
    try:
        path.unlink()
    except FileNotFoundError:
        return 0
    return 1


def _outbox_entries_in_use(db: Database) -> set[str]:
    """The names of the outbox entries (one folder per attempt) that delivery rows point at."""
    with db.session() as session:
        paths = session.execute(
            select(Delivery.path).where(Delivery.path != "").distinct()
        ).scalars()
        return {p.split("/")[1] for p in paths if p.startswith("outbox/")}


def _newest_mtime(entry: Path) -> float | None:
    """The latest mtime of an outbox entry and what it holds (None once it is gone)."""
    try:
        times = [entry.lstat().st_mtime]
        if entry.is_dir() and not entry.is_symlink():
            times += [child.lstat().st_mtime for child in entry.iterdir()]
    except FileNotFoundError:
        return None
    return max(times)


def _remove_entry(entry: Path) -> int:
    """1 if this call deleted the outbox entry (a folder and its files), 0 if it was gone."""
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    except FileNotFoundError:
        return 0
    return 1
