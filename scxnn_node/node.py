"""Wires the node: the SCP, the scheduler and one supervised worker process per device.

A worker that dies is logged, its jobs are released and it is started again after a backoff
that doubles while it keeps dying young. Stop is bounded: SIGTERM (the worker hands its study
back), then SIGKILL for a worker still alive after the timeout. A worker dies with the node:
the kernel signals it when the node's process ends, even by kill -9 (Linux), and it watches
its parent's pid as well.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from scxnn_node.config import NodeConfig
from scxnn_node.dicom.scp import IngestService, StoreScp
from scxnn_node.dicom.scu import Peer, echo
from scxnn_node.logs import configure_logging
from scxnn_node.model.manifest import read_manifest, verify_bundle
from scxnn_node.scheduler import NodeScheduler
from scxnn_node.store import workers
from scxnn_node.store.db import Database
from scxnn_node.store.queue import JobQueue
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)

SUPERVISE_INTERVAL_S = 0.5
FIRST_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0
STABLE_RUN_S = 60.0  # a worker that ran this long before dying restarts after the first delay
KILL_WAIT_S = 5.0
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: the kernel sends this process SIGTERM when its parent ends (even by kill -9).
    Elsewhere a no-op; the worker's parent-pid watch covers it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("prctl unavailable: %s", exc)


def run_worker_process(config_json: str, device: str, parent_pid: int) -> None:
    """Entry point of a worker process (spawned: no state shared with the parent)."""
    die_with_parent()
    if os.getppid() != parent_pid:  # the node died before the line above took effect
        return
    stop = threading.Event()
    from scxnn_node.worker import TriageWorker, stop_on_signals

    stop_on_signals(stop)  # before the slow part: a stop during start-up is not lost
    config = NodeConfig.model_validate_json(config_json)
    configure_logging(config.logging.level, config.logging.json_format)
    worker = TriageWorker(config, device)
    worker.run(stop, parent_pid=parent_pid)


@dataclass
class _WorkerSlot:
    """One device's worker: its current process, and when to start the next after a death."""

    device: str
    process: mp.process.BaseProcess | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restart_delay: float = FIRST_RESTART_DELAY_S


class Node:
    """The running node. start() returns once the SCP listens; stop() shuts everything down."""

    def __init__(self, config: NodeConfig, workers: bool = True) -> None:
        self.config = config
        manifest = verify_bundle(config.model.bundle)  # refuse a bad bundle before listening
        self.bundle_version = manifest.version
        self.db = Database(config.database.url)
        self.db.create_schema()
        self.spool = Spool(config.storage.spool_dir)
        self.scp = StoreScp(config, IngestService(config, self.db, self.spool))
        self.scheduler = NodeScheduler(config, self.db, self.spool, self.bundle_version)
        self.with_workers = workers
        self._slots = [_WorkerSlot(device) for device in config.model.devices]
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._queue = JobQueue(
            self.db,
            "node",
            config.worker.lease_seconds,
            config.worker.max_attempts,
            retry_backoff_seconds=config.worker.retry_backoff_seconds,
        )

    def start(self) -> None:
        for destination in self.config.destinations:
            if destination.kind != "dicom":  # HL7 has no echo; its first result shows the way
                continue
            ok, message = echo(Peer.of(destination), self.config.node.ae_title, timeout=5)
            log_fn = log.info if ok else log.warning
            log_fn(
                "C-ECHO %s (%s@%s:%d): %s",
                destination.name,
                destination.ae_title,
                destination.host,
                destination.port,
                message,
            )
        self.scp.start()
        self.scheduler.start()
        if self.with_workers:
            # Workers are started (and restarted) from the supervisor thread alone: Linux
            # signals a child when the *thread* that forked it ends, so that thread must live
            # as long as the node.
            self._supervisor = threading.Thread(
                target=self._supervise, daemon=True, name="worker-supervisor"
            )
            self._supervisor.start()
        self.db.record_event(
            "node",
            f"started with bundle {read_manifest(self.config.model.bundle).name} "
            f"{self.bundle_version}",
        )

    def _start_worker(self, slot: _WorkerSlot) -> None:
        process = mp.get_context("spawn").Process(
            target=run_worker_process,
            args=(self.config.model_dump_json(), slot.device, os.getpid()),
            name=f"scxnn-worker-{slot.device}",
        )
        process.start()
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None

    def _supervise(self) -> None:
        for slot in self._slots:
            self._start_worker(slot)
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            for slot in self._slots:
                try:
                    self._look_after(slot)
                except Exception:  # the supervisor must outlive a database hiccup
                    log.exception("supervising the %s worker failed", slot.device)
        # Stopping: the processes are left to stop(), which bounds how long they get.

    def _look_after(self, slot: _WorkerSlot) -> None:
        now = time.monotonic()
        process = slot.process
        if process is not None and not process.is_alive():
            slot.process = None
            lived = now - slot.started_at
            slot.restart_delay = (
                FIRST_RESTART_DELAY_S
                if lived >= STABLE_RUN_S
                else min(MAX_RESTART_DELAY_S, slot.restart_delay * 2)
            )
            slot.restart_at = now + slot.restart_delay
            message = (
                f"worker {slot.device} (pid {process.pid}) died with exit code "
                f"{process.exitcode} after {lived:.0f} s; restarting in {slot.restart_delay:.0f} s"
            )
            log.error(message)
            self.db.record_event("worker", message, level="ERROR")
            self._bury(process, slot.device, "died")
        if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
            self._start_worker(slot)
            log.info("worker %s restarted (pid %s)", slot.device, slot.process.pid)

    def _bury(self, process: mp.process.BaseProcess, device: str, how: str) -> None:
        """A dead worker's jobs go back to the queue now, not when its lease expires."""
        if process.pid is None:
            return
        owner = workers.worker_owner(process.pid, device)
        released = self._queue.release_jobs_of(
            owner, f"worker {owner} {how} (exit code {process.exitcode})"
        )
        workers.forget(self.db, owner)
        if released:
            log.warning("%d job(s) of worker %s put back in the queue", released, owner)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop within about `timeout` + KILL_WAIT_S seconds, whatever the workers' state."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        self.scp.shutdown()
        self.scheduler.shutdown()
        running = [
            (slot, slot.process)
            for slot in self._slots
            if slot.process is not None and slot.process.is_alive()
        ]
        for _slot, process in running:
            process.terminate()  # SIGTERM: the worker hands its study back and exits
        deadline = time.monotonic() + timeout
        for slot, process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %s did not stop in %.0f s; killing it", slot.device, timeout)
                process.kill()
                process.join(KILL_WAIT_S)
            if process.exitcode != 0:
                self._safely(self._bury, process, slot.device, "was stopped")
            slot.process = None
        self._safely(self.db.record_event, "node", "stopped")
        self.db.dispose()

    @staticmethod
    def _safely(action, *args: object) -> None:
        try:
            action(*args)
        except Exception:  # stopping goes on even when the database is gone
            log.exception("while stopping")
