"""The cleaner: keeps disk and database from growing without bound (spool retention, the
free-disk watermark, old events, the SQLite write-ahead log)."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import delete

from scxnn_node.config import NodeConfig
from scxnn_node.store.db import Database, utc_now
from scxnn_node.store.models import Event
from scxnn_node.store.retention import expired_instances, forget_outputs, unneeded_outputs
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)

EVENT_RETENTION_DAYS = 90


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
        now = utc_now()
        cutoff = now - timedelta(days=storage.retention_days)
        window = storage.amendment_window_days or storage.retention_days
        purged = 0
        with self.db.session() as session:
            for instance in expired_instances(session, cutoff, now - timedelta(days=window)):
                self.spool.remove(instance.path)
                instance.path = ""  # the row stays: the UID is still known, its file is not
                purged += 1
        outputs = unneeded_outputs(self.db, cutoff)
        for path in outputs:
            self.spool.remove(path)
        forget_outputs(self.db, outputs)
        return purged

    def check_disk(self) -> bool:
        """True while free space is above the watermark; the SCP refuses C-STORE below it."""
        low = self.spool.free_bytes() < self.config.storage.min_free_bytes
        if low and not self.disk_low:
            log.error("free disk below storage.min_free_bytes: C-STORE answers 0xA700")
            self.db.record_event("disk", "free disk below the watermark", level="ERROR")
        self.disk_low = low
        return not low

    def prune_events(self) -> None:
        """Events older than EVENT_RETENTION_DAYS are deleted."""
        with self.db.session() as session:
            session.execute(
                delete(Event).where(Event.at < utc_now() - timedelta(days=EVENT_RETENTION_DAYS))
            )

    def housekeeping(self) -> None:
        self.prune_events()
        self.db.checkpoint()
