"""The node's timetable: which periodic task runs how often, and what wakes a task sooner; the
tasks live in their own modules (assembly, queue, dispatcher, cleaner).

Readiness and delivery run in their own threads, woken by doorbells instead of waiting for
their next poll: a received instance times its study's readiness run (arrival + quiet time),
each run times the next from the database (when the next receiving study becomes quiet), and
a worker's committed result starts a delivery run. Queued jobs ring the workers' doorbells.
The polls stay as the fallback: another node's work on the same database is found by them.
The other tasks run on APScheduler's intervals.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from apscheduler.schedulers.background import BackgroundScheduler

from scxnn_node.cleaner import Cleaner
from scxnn_node.config import NodeConfig
from scxnn_node.dispatcher import Dispatcher
from scxnn_node.doorbell import Doorbell
from scxnn_node.drift import DriftWatch
from scxnn_node.store.assembly import enqueue_quiet_studies, next_quiet_at
from scxnn_node.store.db import Database
from scxnn_node.store.queue import JobQueue
from scxnn_node.store.spool import Spool
from scxnn_node.store.workers import forget_silent, served_versions

log = logging.getLogger(__name__)


class NodeScheduler:
    """Owns the periodic work of the node; each task is one method, safe to call directly."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        spool: Spool,
        bundle_version: str,
        jobs_queued: Sequence[Doorbell] = (),
        results_committed: Doorbell | None = None,
        instance_received: Doorbell | None = None,
        delivers: bool = True,
    ) -> None:
        """`jobs_queued`: each worker's doorbell, rung when jobs were queued or put back;
        `results_committed`: rung by a worker, starts a delivery run; `instance_received`: rung
        by the SCP, times a readiness run. Without them the tasks poll. `delivers` False: the
        results are sent by dispatch processes (node.dispatch_processes), not from here."""
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
        self.dispatcher = Dispatcher(config, db, spool) if delivers else None
        self.cleaner = Cleaner(config, db, spool)
        self.drift_watch = DriftWatch(config, db)
        self.jobs_queued = list(jobs_queued)
        self._wakeable = [
            WakeableTask(
                "readiness",
                self.readiness_run,
                config.scheduler.readiness_seconds,
                instance_received or Doorbell(),
                after_ring=config.study.quiet_seconds,
            ),
        ]
        if self.dispatcher is not None:
            self._wakeable.append(delivery_task(self.dispatcher, results_committed or Doorbell()))
        self._scheduler: BackgroundScheduler | None = None

    def wake_workers(self) -> None:
        """Jobs are ready: every worker looks now (one claims each job) instead of at its poll."""
        for doorbell in self.jobs_queued:
            doorbell.ring()

    def enqueue_ready_studies(self, now: datetime | None = None) -> int:
        """Queue the studies that are quiet (at `now`, the present moment by default)."""
        queued = enqueue_quiet_studies(
            self.db, self.config.study.quiet_seconds, self.bundle_version, now
        )
        if queued:
            self.wake_workers()
        return queued

    def readiness_run(self) -> float | None:
        """Queue the quiet studies; returns in how many seconds the next receiving study becomes
        quiet (None: no study is receiving), so that the next run comes just then."""
        now = self.db.now()
        self.enqueue_ready_studies(now)
        due = next_quiet_at(self.db, self.config.study.quiet_seconds, now)
        return None if due is None else (due - self.db.now()).total_seconds()

    def recover_leases(self) -> int:
        recovered = self.queue.recover_expired_leases()
        if recovered:
            log.warning("%d job(s) whose worker stopped were put back in the queue", recovered)
        adopted = self.queue.adopt_unserved_jobs(self.bundle_version, served_versions(self.db))
        if adopted:
            log.warning("%d job(s) of a bundle no worker serves now use this bundle", adopted)
        if recovered or adopted:
            self.wake_workers()
        # A killed worker's row would stay for ever; silent past a lease, it held nothing more.
        forget_silent(self.db, timedelta(seconds=self.config.worker.lease_seconds))
        return recovered

    def start(self) -> None:
        s = self.config.scheduler
        _logged(self.cleaner.sweep_leftovers)()  # what a crash left behind goes at start
        if self.dispatcher is not None:
            _logged(self.dispatcher.release_dead_leases)()  # before the first delivery run
        scheduler = BackgroundScheduler(timezone="UTC")
        timetable: list[tuple[Callable[[], object], float]] = [
            (self.recover_leases, s.lease_recovery_seconds),
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
        for task in self._wakeable:
            task.start()

    def shutdown(self) -> None:
        for task in self._wakeable:
            task.stop()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None


class WakeableTask:
    """A periodic task in its own thread, one run at a time: it runs at start, then every
    `every` seconds, sooner when its last run returned a nearer moment (seconds from then), and
    `after_ring` seconds after its doorbell rings. A ring during a run is kept for the next."""

    def __init__(
        self,
        name: str,
        task: Callable[[], float | None],
        every: float,
        doorbell: Doorbell,
        after_ring: float = 0.0,
    ) -> None:
        self.name = name
        self._task = task
        self._every = every
        self._doorbell = doorbell
        self._after_ring = after_ring
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=self.name)
        self._thread.start()

    def stop(self) -> None:
        """Return once the run in progress, if any, has ended."""
        if self._thread is None:
            return
        self._stopping.set()
        self._doorbell.ring()  # wakes the thread's wait
        self._thread.join()
        self._thread = None

    def _loop(self) -> None:
        next_run = time.monotonic()  # at start: what waited while the node was down
        while True:
            rang = self._doorbell.wait(max(0.0, next_run - time.monotonic()))
            if self._stopping.is_set():
                return
            if rang:
                next_run = min(next_run, time.monotonic() + self._after_ring)
            if time.monotonic() < next_run:
                continue
            sooner = self._run()
            next_run = time.monotonic() + min(self._every, max(0.0, sooner))

    def _run(self) -> float:
        """The task's nearer moment in seconds (infinity when it named none)."""
        try:
            sooner = self._task()
        except Exception:  # a failing task must not stop its thread; it runs again
            log.exception("scheduled task %s failed", self.name)
            return math.inf
        return math.inf if sooner is None else sooner


def delivery_task(dispatcher: Dispatcher, results_committed: Doorbell) -> WakeableTask:
    """The delivery run, in the serve process or in a dispatch process: the due deliveries
    are sent when a worker's committed result rings, and at every delivery poll (their retries
    and another node's results are found by the poll)."""

    def deliver() -> None:  # no nearer moment: deliver_due's count is not one
        dispatcher.deliver_due()

    return WakeableTask(
        "delivery", deliver, dispatcher.config.scheduler.delivery_seconds, results_committed
    )


def _logged(func: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        try:
            func()
        except Exception:  # a failing task must not stop the scheduler; it runs again
            log.exception("scheduled task %s failed", getattr(func, "__name__", "task"))

    run.__name__ = getattr(func, "__name__", "task")
    return run
