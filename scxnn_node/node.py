"""Wires the node: the SCP, the scheduler and one supervised worker process per device.

With node.ingest_processes above 1 the SCP runs in that many supervised processes sharing the
port (SO_REUSEPORT), each with its own database connection: a C-STORE is then received outside
the serve process and its GIL. With node.dispatch_processes above 0 the dispatcher, likewise,
runs in processes of its own, each claiming due deliveries under a lease. A dead ingest or
dispatch process is restarted like a worker.

A worker that dies is logged, its jobs are released and it is started again after a backoff
that doubles while it keeps dying young. Stop is bounded: SIGTERM (the worker hands its study
back), then SIGKILL for a worker still alive after the timeout. A worker dies with the node:
the kernel signals it when the node's process ends, even by kill -9 (Linux), and it watches
its parent's pid as well.

The parts wake each other through doorbells (scxnn_node/doorbell.py) over pipes: the SCP rings
the scheduler when an instance is stored, the scheduler rings a worker slot's doorbell when it
queued jobs, and a worker rings the dispatcher (every dispatch process, or the serve process's
delivery thread) when its result is committed. A restarted worker gets its slot's doorbell.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from multiprocessing.synchronize import Event as ProcessEvent

from scxnn_node.config import NodeConfig
from scxnn_node.dicom.scp import IngestService, StoreScp
from scxnn_node.dicom.scu import Peer, echo
from scxnn_node.dispatcher import Dispatcher
from scxnn_node.doorbell import Doorbell, PipeEvent
from scxnn_node.http.server import HttpServer
from scxnn_node.lifetime import die_with_parent, exit_after_parent
from scxnn_node.logs import configure_logging
from scxnn_node.model.manifest import read_manifest, verify_bundle
from scxnn_node.scheduler import NodeScheduler, delivery_task
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
INGEST_START_TIMEOUT_S = 120.0  # start() waits this long for the ingest processes to listen
PARENT_WATCH_S = 1.0
PARENT_GONE_GRACE_S = 10.0  # a worker whose node died hands its studies back, or exits anyway


def run_worker_process(
    config_json: str,
    device: str,
    parent_pid: int,
    jobs_queued: PipeEvent | None = None,
    results_committed: PipeEvent | None = None,
) -> None:
    """Entry point of a worker process (spawned: no state shared with the parent but the two
    doorbells' events)."""
    die_with_parent()
    if os.getppid() != parent_pid:  # the node died before the line above took effect
        return
    exit_after_parent(parent_pid, PARENT_GONE_GRACE_S)
    stop = threading.Event()
    from scxnn_node.worker import TriageWorker, stop_on_signals

    doorbell = Doorbell(jobs_queued) if jobs_queued is not None else Doorbell()
    stop_on_signals(stop, doorbell)  # before the slow part: a stop during start-up is not lost
    config = NodeConfig.model_validate_json(config_json)
    configure_logging(config.logging.level, config.logging.json_format)
    worker = TriageWorker(
        config,
        device,
        jobs_queued=doorbell,
        results_committed=Doorbell(results_committed) if results_committed is not None else None,
    )
    worker.run(stop, parent_pid=parent_pid)


def _start_service_process(
    config_json: str, parent_pid: int
) -> tuple[NodeConfig, Database, threading.Event] | None:
    """The start of an ingest or dispatch process: it dies with the node, stops on SIGTERM
    (the event), logs as configured and has its own connection to the database the serve
    process made; None when the node is already gone."""
    die_with_parent()
    if os.getppid() != parent_pid:  # the node died before the line above took effect
        return None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    config = NodeConfig.model_validate_json(config_json)
    configure_logging(config.logging.level, config.logging.json_format)
    db = Database(config.database.url)
    db.check_schema()  # made by the serve process before it started this one
    return config, db, stop


def _serve_until_stopped(stop: threading.Event, parent_pid: int) -> None:
    while not stop.wait(PARENT_WATCH_S) and os.getppid() == parent_pid:
        pass


def run_ingest_process(
    config_json: str,
    parent_pid: int,
    listening: ProcessEvent,
    instance_received: PipeEvent | None = None,
) -> None:
    """Entry point of an ingest process (spawned): the SCP on the shared port, with its own
    database connection, until SIGTERM or the node's end."""
    started = _start_service_process(config_json, parent_pid)
    if started is None:
        return
    config, db, stop = started
    spool = Spool(config.storage.spool_dir)
    doorbell = Doorbell(instance_received) if instance_received is not None else None
    scp = StoreScp(config, IngestService(config, db, spool, doorbell))
    scp.start(share_port=True)
    listening.set()
    _serve_until_stopped(stop, parent_pid)
    scp.shutdown()  # no new association; those in progress finish within stop()'s bound
    db.dispose()


def run_dispatch_process(
    config_json: str, parent_pid: int, results_committed: PipeEvent | None = None
) -> None:
    """Entry point of a dispatch process (spawned): delivery runs, woken by the workers'
    committed results, with its own database connection, until SIGTERM or the node's end."""
    started = _start_service_process(config_json, parent_pid)
    if started is None:
        return
    config, db, stop = started
    dispatcher = Dispatcher(config, db, Spool(config.storage.spool_dir))
    dispatcher.release_dead_leases()  # a killed predecessor's deliveries are due now
    task = delivery_task(
        dispatcher, Doorbell(results_committed) if results_committed is not None else Doorbell()
    )
    task.start()
    _serve_until_stopped(stop, parent_pid)
    task.stop()  # the send in progress ends (or stop()'s SIGKILL ends it; its lease expires)
    db.dispose()


class ProcessRole(StrEnum):
    """What a supervised process does."""

    WORKER = "worker"
    INGEST = "ingest"
    DISPATCH = "dispatch"


@dataclass
class _Slot:
    """One supervised process (a device's worker, an ingest or a dispatch process): its
    current process, and when to start the next after a death."""

    name: str  # as messages show it: "worker cpu", "ingest process 2"
    role: ProcessRole
    device: str | None = None  # a worker's device
    process: mp.process.BaseProcess | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    restart_delay: float = FIRST_RESTART_DELAY_S
    listening: ProcessEvent | None = None  # an ingest process's: set once it accepts associations
    jobs_queued: PipeEvent | None = None  # a worker's doorbell, the same for its restarts


class Node:
    """The running node. start() returns once the SCP listens; stop() shuts everything down."""

    def __init__(self, config: NodeConfig, workers: bool = True) -> None:
        self.config = config
        manifest = verify_bundle(config.model.bundle)  # refuse a bad bundle before listening
        self.bundle_version = manifest.version
        self.db = Database(config.database.url)
        self.db.create_schema()
        self.spool = Spool(config.storage.spool_dir)
        self._instance_received = PipeEvent()
        self._results_committed = PipeEvent()
        ingest_processes = config.node.ingest_processes
        self.scp = (
            StoreScp(
                config,
                IngestService(config, self.db, self.spool, Doorbell(self._instance_received)),
            )
            if ingest_processes == 1
            else None
        )
        self.with_workers = workers
        self._slots = [
            _Slot(f"ingest process {n}", ProcessRole.INGEST)
            for n in range(1, ingest_processes + 1)
            if self.scp is None
        ]
        self._slots += [
            _Slot(f"dispatch process {n}", ProcessRole.DISPATCH)
            for n in range(1, config.node.dispatch_processes + 1)
        ]
        if workers:
            self._slots += [
                _Slot(f"worker {device}", ProcessRole.WORKER, device, jobs_queued=PipeEvent())
                for device in config.model.devices
            ]
        self.scheduler = NodeScheduler(
            config,
            self.db,
            self.spool,
            self.bundle_version,
            jobs_queued=[Doorbell(s.jobs_queued) for s in self._slots if s.jobs_queued is not None],
            results_committed=Doorbell(self._results_committed),
            instance_received=Doorbell(self._instance_received),
            delivers=config.node.dispatch_processes == 0,
        )
        self.http = (
            HttpServer(config, self.db, self.spool, manifest) if config.http.enabled else None
        )
        self._started = threading.Event()
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
        if self.http is not None:
            self.http.start()  # first: a port in use fails before anything runs
        for destination in self.config.destinations:
            if destination.kind != "dicom":  # no echo in HL7 or STOW-RS: the first result tells
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
        if self.scp is not None:
            self.scp.start()
        if self._slots:
            # Workers and ingest processes are started (and restarted) from the supervisor
            # thread alone: Linux signals a child when the *thread* that forked it ends, so that
            # thread must live as long as the node.
            self._supervisor = threading.Thread(
                target=self._supervise, daemon=True, name="worker-supervisor"
            )
            self._supervisor.start()
            self._await_ingest_processes()
        self.scheduler.start()
        self.db.record_event(
            "node",
            f"started with bundle {read_manifest(self.config.model.bundle).name} "
            f"{self.bundle_version}",
        )

    def _await_ingest_processes(self) -> None:
        """Return once every ingest process listens; RuntimeError when one dies first (the
        port taken by another program, say) or none of this happens in time."""
        self._started.wait(INGEST_START_TIMEOUT_S)
        deadline = time.monotonic() + INGEST_START_TIMEOUT_S
        for slot in self._slots:
            if slot.role != ProcessRole.INGEST:
                continue
            process, listening = slot.process, slot.listening
            while not listening.wait(0.1):
                if not process.is_alive() or time.monotonic() > deadline:
                    self._stopping.set()
                    self._supervisor.join()
                    self._end_processes(timeout=5)
                    raise RuntimeError(
                        f"{slot.name} did not start listening on port "
                        f"{self.config.node.port} (exit code {process.exitcode}); see its log"
                    )

    def _start(self, slot: _Slot) -> None:
        context = mp.get_context("spawn")
        config_json = self.config.model_dump_json()
        if slot.role == ProcessRole.WORKER:
            process = context.Process(
                target=run_worker_process,
                args=(
                    config_json,
                    slot.device,
                    os.getpid(),
                    slot.jobs_queued,
                    self._results_committed,
                ),
                name=f"scxnn-worker-{slot.device}",
            )
        elif slot.role == ProcessRole.DISPATCH:
            process = context.Process(
                target=run_dispatch_process,
                args=(config_json, os.getpid(), self._results_committed),
                name=f"scxnn-{slot.name.replace(' ', '-')}",
            )
        else:
            slot.listening = context.Event()
            process = context.Process(
                target=run_ingest_process,
                args=(config_json, os.getpid(), slot.listening, self._instance_received),
                name=f"scxnn-{slot.name.replace(' ', '-')}",
            )
        process.start()
        slot.process, slot.started_at, slot.restart_at = process, time.monotonic(), None

    def _supervise(self) -> None:
        for slot in self._slots:
            self._start(slot)
        self._started.set()
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            for slot in self._slots:
                try:
                    self._look_after(slot)
                except Exception:  # the supervisor must outlive a database hiccup
                    log.exception("supervising %s failed", slot.name)
        # Stopping: the processes are left to stop(), which bounds how long they get.

    def _look_after(self, slot: _Slot) -> None:
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
                f"{slot.name} (pid {process.pid}) died with exit code "
                f"{process.exitcode} after {lived:.0f} s; restarting in {slot.restart_delay:.0f} s"
            )
            log.error(message)
            self.db.record_event(slot.role.value, message, level="ERROR")
            if slot.device is not None:
                self._bury(process, slot.device, "died")
        if slot.process is None and slot.restart_at is not None and now >= slot.restart_at:
            self._start(slot)
            log.info("%s restarted (pid %s)", slot.name, slot.process.pid)

    def process_ids(self) -> list[tuple[str, ProcessRole, int]]:
        """(name, role, pid) of each supervised process now running, for benchmarks and
        diagnostics."""
        return [
            (slot.name, slot.role, slot.process.pid)
            for slot in self._slots
            if slot.process is not None and slot.process.pid is not None
        ]

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
            self.scheduler.wake_workers()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop within about `timeout` + KILL_WAIT_S seconds, whatever the workers' state."""
        self._stopping.set()
        if self.http is not None:
            self.http.shutdown()  # within a poll interval (0.2 s)
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        if self.scp is not None:
            self.scp.shutdown()
        self.scheduler.shutdown()
        self._end_processes(timeout)
        self._safely(self.db.record_event, "node", "stopped")
        self.db.dispose()

    def _end_processes(self, timeout: float) -> None:
        """SIGTERM to every supervised process; SIGKILL to one still alive after `timeout`."""
        running = [
            (slot, slot.process)
            for slot in self._slots
            if slot.process is not None and slot.process.is_alive()
        ]
        for slot, process in running:
            process.terminate()  # SIGTERM: a worker hands its study back; both kinds exit
            if slot.jobs_queued is not None:
                slot.jobs_queued.set()  # an idle worker waits on its doorbell, not on SIGTERM
        deadline = time.monotonic() + timeout
        for slot, process in running:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("%s did not stop in %.0f s; killing it", slot.name, timeout)
                process.kill()
                process.join(KILL_WAIT_S)
            if process.exitcode != 0 and slot.device is not None:
                self._safely(self._bury, process, slot.device, "was stopped")
            slot.process = None

    @staticmethod
    def _safely(action, *args: object) -> None:
        try:
            action(*args)
        except Exception:  # stopping goes on even when the database is gone
            log.exception("while stopping")
