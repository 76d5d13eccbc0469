"""Periodic jobs (APScheduler): readiness, lease recovery, deliveries, retention, disk, upkeep."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import delete, select

from scxnn_node.config import NodeConfig
from scxnn_node.dispatcher import Dispatcher
from scxnn_node.store.assembly import enqueue_quiet_studies
from scxnn_node.store.db import Database, utc_now
from scxnn_node.store.models import Delivery, Event, Instance, Study
from scxnn_node.store.queue import JobQueue
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)

EVENT_RETENTION_DAYS = 90


class NodeScheduler:
    """Owns the periodic work of the node; each task is one method, safe to call directly."""

    def __init__(self, config: NodeConfig, db: Database, spool: Spool, bundle_version: str) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.bundle_version = bundle_version
        self.queue = JobQueue(
            db, "scheduler", config.worker.lease_seconds, config.worker.max_attempts
        )
        self.dispatcher = Dispatcher(config, db, spool)
        self._scheduler: BackgroundScheduler | None = None
        self.disk_low = False

    def enqueue_ready_studies(self) -> int:
        return enqueue_quiet_studies(self.db, self.config.study.quiet_seconds, self.bundle_version)

    def recover_leases(self) -> int:
        recovered = self.queue.recover_expired_leases()
        if recovered:
            log.warning("%d job(s) whose worker stopped were put back in the queue", recovered)
        return recovered

    def deliver(self) -> int:
        return self.dispatcher.deliver_due()

    def purge_spool(self) -> int:
        """Delete received files of reported studies, and sent outputs, after the retention."""
        cutoff = utc_now() - timedelta(days=self.config.storage.retention_days)
        purged = 0
        with self.db.session() as session:
            old = (
                session.execute(
                    select(Instance)
                    .join(
                        Study, Study.study_instance_uid == Instance.study_instance_uid, isouter=True
                    )
                    .where(
                        Instance.received_at < cutoff,
                        Instance.path != "",
                        (Study.state == "reported") | (Instance.state == "skipped"),
                    )
                )
                .scalars()
                .all()
            )
            for instance in old:
                self.spool.remove(instance.path)
                instance.path = ""
                purged += 1
            done = (
                session.execute(
                    select(Delivery).where(
                        Delivery.updated_at < cutoff, Delivery.state.in_(["sent", "dead"])
                    )
                )
                .scalars()
                .all()
            )
            for delivery in done:
                self.spool.remove(delivery.path)
        return purged

    def check_disk(self) -> bool:
        """True while free space is above the watermark; the SCP refuses C-STORE below it."""
        low = self.spool.free_bytes() < self.config.storage.min_free_bytes
        if low and not self.disk_low:
            log.error("free disk below storage.min_free_bytes: C-STORE answers 0xA700")
            self.db.record_event("disk", "free disk below the watermark", level="ERROR")
        self.disk_low = low
        return not low

    def housekeeping(self) -> None:
        with self.db.session() as session:
            session.execute(
                delete(Event).where(Event.at < utc_now() - timedelta(days=EVENT_RETENTION_DAYS))
            )
        if self.db.is_sqlite:  # outside any transaction: the driver connection autocommits
            raw = self.db.engine.raw_connection()
            try:
                raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                raw.close()

    def start(self) -> None:
        s = self.config.scheduler
        scheduler = BackgroundScheduler(timezone="UTC")
        for func, seconds in (
            (self.enqueue_ready_studies, s.readiness_seconds),
            (self.recover_leases, s.lease_recovery_seconds),
            (self.deliver, s.delivery_seconds),
            (self.purge_spool, s.retention_seconds),
            (self.check_disk, s.disk_check_seconds),
            (self.housekeeping, s.housekeeping_seconds),
        ):
            scheduler.add_job(
                _logged(func),
                "interval",
                seconds=seconds,
                id=func.__name__,
                max_instances=1,
                coalesce=True,
            )
        scheduler.start()
        self._scheduler = scheduler

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None


def _logged(func: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            func()
        except Exception:  # a failing task must not stop the scheduler; it runs again
            log.exception("scheduled task %s failed", getattr(func, "__name__", "task"))

    run.__name__ = getattr(func, "__name__", "task")
    return run
