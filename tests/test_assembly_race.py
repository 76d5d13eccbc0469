"""A C-STORE committing while the scheduler turns its study into a job: on PostgreSQL (read
committed) the scheduler must not overwrite the study's `receiving` with `queued`, or the new
instance never reaches a job (the chaos run found this as a stuck study)."""

from __future__ import annotations

import threading
from datetime import timedelta

import psycopg
from sqlalchemy import select

from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Job, Study, StudyState
from scxnn_node.testing.datasets import stored_instance_record

STUDY = "1.2.826.0.1.3680043.10.9.1"


def _record(sop: str) -> InstanceRecord:
    return stored_instance_record(STUDY, sop)


def test_a_store_committed_during_enqueue_is_not_lost(database_url: str) -> None:
    db = Database(database_url)
    db.create_schema()
    record_instance(db, _record(STUDY + ".1.1"))
    with db.session() as session:  # quiet long ago
        session.get(Study, STUDY).last_received_at = db.now() - timedelta(hours=1)
    if db.is_sqlite:
        # BEGIN IMMEDIATE serialises writers: a late instance simply comes first or after.
        record_instance(db, _record(STUDY + ".1.2"))
        assert enqueue_quiet_studies(db, 5, "1.0.0") == 0
        return
    # A second connection stands for the C-STORE: its study update is in flight, uncommitted.
    plain = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain) as store:
        store.execute(
            "UPDATE studies SET state = 'receiving', last_received_at = now() at time zone 'utc'"
            " WHERE study_instance_uid = %s",
            (STUDY,),
        )
        done = threading.Event()
        queued: list[int] = []
        thread = threading.Thread(
            target=lambda: (queued.append(enqueue_quiet_studies(db, 5, "1.0.0")), done.set())
        )
        thread.start()
        done.wait(2.0)  # the scheduler either skips the busy study or blocks on it
        store.commit()
    thread.join(30)
    assert not thread.is_alive()
    with db.session() as session:
        study = session.get(Study, STUDY)
        jobs = session.execute(select(Job)).scalars().all()
    # The study received an instance after its quiet period: it is receiving again, and no
    # job was made for the input that no longer is the study's.
    assert study.state == StudyState.RECEIVING
    assert queued == [0] and jobs == []
