"""The node's parts wake each other instead of waiting for their polls: a received instance
times its study's readiness run, queued jobs ring the workers, a committed result starts a
delivery run; the readiness run times the next from the database."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sqlite3
import threading
import time
from datetime import timedelta

import pydicom
import pytest
from dicom_factory import chest_pixels, make_dataset, write
from sqlalchemy import update

from scxnn_node.doorbell import Doorbell, PipeEvent
from scxnn_node.node import Node
from scxnn_node.scheduler import NodeScheduler, WakeableTask
from scxnn_node.store.assembly import (
    InstanceRecord,
    enqueue_quiet_studies,
    next_quiet_at,
    record_instance,
)
from scxnn_node.store.db import Database
from scxnn_node.store.models import Study, Worker
from scxnn_node.store.spool import Spool
from scxnn_node.testing.dcmtk import Storescp, storescu
from scxnn_node.testing.loopback import node_config, wait_for

DX = "1.2.840.10008.5.1.4.1.1.1.1"
LONG_POLL_S = 3600.0  # any poll this long would make the waits below time out


def _receive(db: Database, study: str, seconds_ago: float, state: str = "receiving") -> None:
    record_instance(db, InstanceRecord(f"{study}.1", study, f"{study}.9", DX, "p", 1, "PACS"))
    with db.session() as s:
        s.execute(
            update(Study)
            .where(Study.study_instance_uid == study)
            .values(state=state, last_received_at=db.now() - timedelta(seconds=seconds_ago))
        )


def _received_of(pacs: Storescp, study: str) -> list:
    """The files of `study` the PACS has."""
    return [
        f
        for f in pacs.received()
        if pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID == study
    ]


def _last_received(db: Database, study: str):
    with db.session() as s:
        return s.get(Study, study).last_received_at


def test_next_quiet_at_is_the_first_waiting_study_s_last_arrival_plus_quiet(database_url):
    db = Database(database_url)
    db.create_schema()
    try:
        now = db.now()
        assert next_quiet_at(db, 10.0, now) is None  # nothing is receiving
        _receive(db, "1.1", seconds_ago=3)  # quiet in about 7 s: the first
        _receive(db, "1.2", seconds_ago=1)  # quiet in about 9 s
        _receive(db, "1.3", seconds_ago=8, state="reported")  # waits for nothing
        _receive(db, "1.4", seconds_ago=60)  # quiet already: the readiness run queues it now
        now = db.now()
        assert next_quiet_at(db, 10.0, now) == _last_received(db, "1.1") + timedelta(seconds=10)
        # Once queued, the first study no longer counts; the next one does.
        with db.session() as s:
            s.get(Study, "1.1").state = "queued"
        assert next_quiet_at(db, 10.0, now) == _last_received(db, "1.2") + timedelta(seconds=10)
        # At its moment the study is quiet by the rule that queues it, and not a moment before.
        due = _last_received(db, "1.2") + timedelta(seconds=10)
        assert enqueue_quiet_studies(db, 10.0, "1.0.0", now=due - timedelta(microseconds=1)) == 1
        assert enqueue_quiet_studies(db, 10.0, "1.0.0", now=due) == 1  # 1.4, then 1.2
    finally:
        db.dispose()


def test_next_quiet_at_does_not_wait_for_a_writer(tmp_path):
    path = tmp_path / "node.db"
    db = Database(f"sqlite:///{path}", busy_timeout_s=0.2)
    db.create_schema()
    _receive(db, "1.1", seconds_ago=1)
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # an ingest commit in progress, say
        assert next_quiet_at(db, 5.0, db.now()) is not None
    finally:
        writer.rollback()
        writer.close()
        db.dispose()


def test_readiness_run_queues_rings_the_workers_and_names_the_next_moment(database_url, tmp_path):
    config = node_config(tmp_path, database={"url": database_url}, study={"quiet_seconds": 30})
    db = Database(database_url)
    db.create_schema()
    workers = [Doorbell(), Doorbell()]
    scheduler = NodeScheduler(config, db, Spool(config.storage.spool_dir), "1.0.0", workers)
    try:
        assert scheduler.readiness_run() is None  # nothing waits: the poll is the next run
        assert not any(w.wait(0) for w in workers)
        _receive(db, "1.1", seconds_ago=20)  # quiet in about 10 s
        sooner = scheduler.readiness_run()
        assert sooner is not None and 0 < sooner <= 10
        assert not any(w.wait(0) for w in workers)  # nothing queued, nobody woken
        _receive(db, "1.2", seconds_ago=40)  # quiet already
        assert scheduler.readiness_run() <= sooner  # still the first study's moment
        assert all(w.wait(0) for w in workers)  # its job is queued: every worker looks
    finally:
        db.dispose()


def test_a_ring_runs_the_task_at_once_or_after_its_delay_never_two_at_once():
    runs: list[float] = []
    running = threading.Semaphore(1)
    overlapped = threading.Event()
    ran = threading.Event()

    def task() -> None:
        if not running.acquire(blocking=False):
            overlapped.set()
            return
        try:
            runs.append(1.0)
            ran.set()
            threading.Event().wait(0.05)  # long enough for rings to come in meanwhile
        finally:
            running.release()

    doorbell = Doorbell()
    wakeable = WakeableTask("test", task, LONG_POLL_S, doorbell)
    wakeable.start()
    try:
        assert ran.wait(30)  # the run at start
        for _ in range(3):
            ran.clear()
            for _ in range(5):
                doorbell.ring()
            assert ran.wait(30)
        assert not overlapped.is_set()
    finally:
        wakeable.stop()
    assert len(runs) >= 4


def test_a_task_that_names_a_nearer_moment_runs_then_and_a_ring_waits_its_delay():
    started: list[float] = []
    third = threading.Event()

    def task() -> float | None:
        started.append(time.monotonic())
        if len(started) == 3:
            third.set()
        return 0.01 if len(started) == 1 else None  # the second run is asked for, not polled

    doorbell = Doorbell()
    wakeable = WakeableTask("test", task, LONG_POLL_S, doorbell, after_ring=0.2)
    wakeable.start()
    try:
        wait_for(lambda: len(started) >= 2, 30, interval=0.01)
        rang_at = time.monotonic()
        doorbell.ring()
        assert third.wait(30)
    finally:
        wakeable.stop()
    assert len(started) == 3
    assert started[2] - rang_at >= 0.2  # a ring after an arrival waits for the quiet time


def _wait_for_a_ring(doorbell_event: PipeEvent, waiting: PipeEvent) -> None:
    """In a spawned process: say it waits, then wait for a ring; exit 0 if it came."""
    waiting.set()
    raise SystemExit(0 if Doorbell(doorbell_event).wait(LONG_POLL_S) else 1)


def test_a_doorbell_between_processes_rings_even_after_a_waiter_was_killed():
    context = mp.get_context("spawn")
    event, waiting = PipeEvent(), PipeEvent()
    victim = context.Process(target=_wait_for_a_ring, args=(event, waiting))
    victim.start()
    assert waiting.wait(60)
    waiting.clear()
    time.sleep(0.5)  # into its wait (killed before it, the test is merely weaker)
    os.kill(victim.pid, signal.SIGKILL)  # while it waits (a worker killed by the OOM killer)
    victim.join(30)
    ringer = threading.Thread(target=Doorbell(event).ring, daemon=True)
    ringer.start()
    ringer.join(30)
    assert not ringer.is_alive()  # a multiprocessing Event's set() hangs here for ever
    # The next process on the same doorbell (a restarted worker) is woken by a ring.
    Doorbell(event).wait(0)  # the ring nobody took
    successor = context.Process(target=_wait_for_a_ring, args=(event, waiting))
    successor.start()
    assert waiting.wait(60)
    Doorbell(event).ring()
    successor.join(60)
    assert successor.exitcode == 0


@pytest.mark.parametrize("dispatch_processes", [0, 2])
def test_a_study_s_sr_reaches_the_pacs_long_before_any_poll(
    tmp_path, small_bundle_dir, dispatch_processes
):
    """Polls of an hour everywhere: only the wakeups can get the SR out within the waits. With
    dispatch processes, a worker's ring reaches them (two share one doorbell)."""
    pacs = Storescp(tmp_path / "pacs").start()
    config = node_config(
        tmp_path,
        model={"bundle": str(small_bundle_dir)},
        study={"quiet_seconds": 1},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs.port,
                "outputs": ["sr", "summary"],
            }
        ],
        scheduler={"readiness_seconds": LONG_POLL_S, "delivery_seconds": LONG_POLL_S},
        worker={"poll_seconds": LONG_POLL_S},
        node={"dispatch_processes": dispatch_processes},
    )
    node = Node(config)
    node.start()
    try:

        def worker_serving() -> bool:
            with node.db.session() as s:
                return s.query(Worker).count() > 0

        wait_for(worker_serving, 300)  # its start (imports, engine) is not what is measured
        for n in (1, 2):  # the second shows each doorbell rings again after its first ring
            study = pydicom.uid.generate_uid()
            image = make_dataset(chest_pixels(128, seed=n, bits=12), study_uid=study)
            assert storescu(config.node.port, write(image, tmp_path / f"{n}.dcm")).returncode == 0
            wait_for(lambda uid=study: len(_received_of(pacs, uid)) == 2, 120)  # SR + summary
    finally:
        node.stop()
        pacs.stop()
