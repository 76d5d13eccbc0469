"""The node's timetable (APScheduler): which periodic task runs how often; the tasks live in
their own modules (assembly, queue, dispatcher, cleaner)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from scxnn_node.cleaner import Cleaner
from scxnn_node.config import NodeConfig
from scxnn_node.dispatcher import Dispatcher
from scxnn_node.drift import DriftWatch
from scxnn_node.store.assembly import enqueue_quiet_studies
from scxnn_node.store.db import Database
from scxnn_node.store.queue import JobQueue
from scxnn_node.store.spool import Spool
from scxnn_node.store.workers import forget_silent, served_versions

log = logging.getLogger(__name__)


class NodeScheduler:
    """Owns the periodic work of the node; each task is one method, safe to call directly."""

    def __init__(self, config: NodeConfig, db: Database, spool: Spool, bundle_version: str) -> None:
        self.config = config
        self.db = db
        self.bundle_version = bundle_version
        self.queue = JobQueue(
            db,
            "scheduler",
            config.worker.lease_seconds,
            config.worker.max_attempts,
            retry_backoff_seconds=config.worker.retry_backoff_seconds,
        )
        self.dispatcher = Dispatcher(config, db, spool)
        self.cleaner = Cleaner(config, db, spool)
        self.drift_watch = DriftWatch(config, db)
        self._scheduler: BackgroundScheduler | None = None

    def enqueue_ready_studies(self) -> int:
        return enqueue_quiet_studies(self.db, self.config.study.quiet_seconds, self.bundle_version)

    def recover_leases(self) -> int:
        recovered = self.queue.recover_expired_leases()
        if recovered:
            log.warning("%d job(s) whose worker stopped were put back in the queue", recovered)
        adopted = self.queue.adopt_unserved_jobs(self.bundle_version, served_versions(self.db))
        if adopted:
            log.warning("%d job(s) of a bundle no worker serves now use this bundle", adopted)
        # A killed worker's row would stay for ever; silent past a lease, it held nothing more.
        forget_silent(self.db, timedelta(seconds=self.config.worker.lease_seconds))
        return recovered

    def start(self) -> None:
        s = self.config.scheduler
        _logged(self.cleaner.sweep_leftovers)()  # what a crash left behind goes at start
        scheduler = BackgroundScheduler(timezone="UTC")
        timetable: list[tuple[Callable[[], object], float]] = [
            (self.enqueue_ready_studies, s.readiness_seconds),
            (self.recover_leases, s.lease_recovery_seconds),
            (self.dispatcher.deliver_due, s.delivery_seconds),
            (self.cleaner.purge_spool, s.retention_seconds),
            (self.cleaner.sweep_leftovers, s.retention_seconds),
            (self.cleaner.sweep_orphan_outputs, s.retention_seconds),
            (self.cleaner.check_disk, s.disk_check_seconds),
            (self.cleaner.housekeeping, s.housekeeping_seconds),
            (self.drift_watch.check, self.config.drift.check_seconds),
        ]
        for func, seconds in timetable:
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
