"""A C-STORE committing while a job of its study ends: on PostgreSQL (read committed) the end of
the job (a worker's completion, a lease recovered at max attempts) must not overwrite the
study's new `receiving` with `reported` or `failed`, or the new instance never reaches a job
(the PostgreSQL chaos run found this as a study reported without a result for all of its
instances). On SQLite BEGIN IMMEDIATE serialises the two: the C-STORE simply comes first."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta

import psycopg
from sqlalchemy import select, update

from scxnn_node.store.assembly import (
    InstanceRecord,
    enqueue_quiet_studies,
    mark_study_reported,
    record_instance,
)
from scxnn_node.store.db import Database
from scxnn_node.store.models import Job, JobState, Study, StudyState
from scxnn_node.store.queue import ClaimedJob, JobQueue
from scxnn_node.testing.datasets import stored_instance_record
from scxnn_node.testing.loopback import wait_for

STUDY = "1.2.826.0.1.3680043.10.9.2"


def _record(sop: str) -> InstanceRecord:
    return stored_instance_record(STUDY, sop)




def _claimed_job(db: Database, queue: JobQueue) -> ClaimedJob:
    """A study of one instance, quiet, queued, its job claimed by `queue`'s owner."""
    record_instance(db, _record(STUDY + ".1.1"))
    with db.session() as session:
        session.get(Study, STUDY).last_received_at = db.now() - timedelta(hours=1)
    assert enqueue_quiet_studies(db, 5, "1.0.0") == 1
    job = queue.claim_ready_job()
    assert job is not None
    return job


def _end_while_a_store_commits(db: Database, database_url: str, end_job: Callable[[], object]):
    """Run `end_job` while a C-STORE of the study holds its update, uncommitted; commit that
    once `end_job` waits for it (both the old and the fixed code wait on the study's row)."""
    if db.is_sqlite:
        record_instance(db, _record(STUDY + ".1.2"))
        end_job()
        return
    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as store, psycopg.connect(plain, autocommit=True) as watch:
        # What record_instance writes for a late instance, committed only at store.commit().
        store.execute(
            "INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid,"
            " sop_class_uid, path, size, calling_ae, state, received_at)"
            " VALUES (%s, %s, '', '', 'late.dcm', 1, 'PACS', 'stored', now())",
            (STUDY + ".1.2", STUDY),
        )
        store.execute(
            "UPDATE studies SET state = 'receiving', last_received_at = now() at time zone 'utc'"
            " WHERE study_instance_uid = %s",
            (STUDY,),
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                end_job()
            except BaseException as exc:  # reported by the test thread
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()

        def waiting() -> bool:
            row = watch.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
            return not thread.is_alive() or bool(row and row[0])

        wait_for(waiting, 60, 0.02)
        store.commit()
        thread.join(60)
    assert not thread.is_alive() and not errors, errors


def test_a_store_committed_as_a_worker_completes_is_not_lost(
    db: Database, database_url: str
) -> None:
    queue = JobQueue(db, "w1", lease_seconds=60)
    job = _claimed_job(db, queue)

    def complete() -> None:  # the worker's completing transaction (worker._finish)
        with db.session() as session:
            assert queue.complete(session, job.id)
            mark_study_reported(session, STUDY)

    _end_while_a_store_commits(db, database_url, complete)
    with db.session() as session:
        assert session.get(Job, job.id).state == JobState.DONE
        # The study received an instance after its job's input was fixed: it waits for the
        # job that will include it, instead of being reported without it.
        assert session.get(Study, STUDY).state == StudyState.RECEIVING


def test_a_store_committed_as_a_lease_is_recovered_is_not_lost(
    db: Database, database_url: str
) -> None:
    queue = JobQueue(db, "gone", lease_seconds=60, max_attempts=1)
    job = _claimed_job(db, queue)
    with db.session() as session:  # its worker died long ago
        session.execute(
            update(Job).where(Job.id == job.id).values(lease_expires_at=db.now() - timedelta(1))
        )

    _end_while_a_store_commits(db, database_url, queue.recover_expired_leases)
    with db.session() as session:
        assert session.get(Job, job.id).state == JobState.FAILED
        assert session.get(Study, STUDY).state == StudyState.RECEIVING
        session.get(Study, STUDY).last_received_at = db.now() - timedelta(hours=1)
    # ... and so the next scheduler pass gives the study its next job.
    assert enqueue_quiet_studies(db, 5, "1.0.0") == 1
    with db.session() as session:
        states = session.execute(select(Job.state).order_by(Job.id)).scalars().all()
    assert states == [JobState.FAILED, JobState.READY]


def test_a_store_waiting_on_the_scheduler_makes_its_study_receiving_again(
    db: Database, database_url: str
) -> None:
    """The C-STORE reads its study as `receiving` while the scheduler, holding the study's
    row, turns it into a job without the new (uncommitted) instance. The C-STORE must write
    `receiving` over the scheduler's `queued` (an ORM write of the value it read would be left
    out as no change), or the study is reported without its new instance."""
    record_instance(db, _record(STUDY + ".1.1"))
    with db.session() as session:  # quiet long ago
        session.get(Study, STUDY).last_received_at = db.now() - timedelta(hours=1)
    if db.is_sqlite:  # BEGIN IMMEDIATE serialises: the scheduler's pass simply comes first
        assert enqueue_quiet_studies(db, 5, "1.0.0") == 1
        record_instance(db, _record(STUDY + ".1.2"))
    else:
        plain = database_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(plain) as scheduler, psycopg.connect(plain, autocommit=True) as watch:
            # The scheduler's pass (enqueue_quiet_studies), stopped while it holds the study.
            scheduler.execute(
                "SELECT state FROM studies WHERE study_instance_uid = %s FOR UPDATE", (STUDY,)
            )
            thread = threading.Thread(target=record_instance, args=(db, _record(STUDY + ".1.2")))
            thread.start()
            wait_for(
                lambda: not thread.is_alive()
                or watch.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0],
                60,
                0.02,
            )
            scheduler.execute(
                "UPDATE studies SET state = 'queued' WHERE study_instance_uid = %s", (STUDY,)
            )
            scheduler.commit()
            thread.join(60)
        assert not thread.is_alive()
    with db.session() as session:
        assert session.get(Study, STUDY).state == StudyState.RECEIVING
        session.get(Study, STUDY).last_received_at = db.now() - timedelta(hours=1)
    # ... and so the next pass gives the study a job for both of its instances.
    assert enqueue_quiet_studies(db, 5, "1.0.0") == 1
    with db.session() as session:
        newest = session.execute(select(Job).order_by(Job.id.desc())).scalars().first()
        assert newest.instance_uids == json.dumps([STUDY + ".1.1", STUDY + ".1.2"])
