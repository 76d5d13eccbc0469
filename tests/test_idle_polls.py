"""The polls that usually find nothing (quiet studies, ready jobs, due deliveries) answer from
a read that takes no write lock: a writer holding SQLite's lock never makes them wait or fail,
and they still find the work their claims take."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

from sqlalchemy import update

from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Study
from scxnn_node.store.queue import JobQueue
from scxnn_node.store.results import claim_due_deliveries


def test_polls_that_find_nothing_do_not_wait_for_a_writer(tmp_path):
    path = tmp_path / "node.db"
    db = Database(f"sqlite:///{path}", busy_timeout_s=0.2)
    db.create_schema()
    writer = sqlite3.connect(path, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")  # an ingest commit in progress, say
        assert enqueue_quiet_studies(db, 0.0, "1.0.0") == 0
        assert JobQueue(db, "w1", bundle_version="1.0.0").claim_ready_job() is None
        assert claim_due_deliveries(db, "dispatcher", 10, timedelta(minutes=1)) == []
    finally:
        writer.rollback()
        writer.close()
        db.dispose()


def test_a_quiet_study_is_queued_and_claimed_through_the_cheap_checks(database_url):
    db = Database(database_url)
    db.create_schema()
    try:
        dx = "1.2.840.10008.5.1.4.1.1.1.1"
        record = InstanceRecord("1.2.3.1", "1.2.3", "1.2.3.4", dx, "p", 10, "SENDER")
        assert record_instance(db, record)
        assert JobQueue(db, "w1", bundle_version="1.0.0").claim_ready_job() is None
        assert enqueue_quiet_studies(db, 3600.0, "1.0.0") == 0  # not quiet yet
        with db.session() as s:  # an hour without a new instance
            s.execute(update(Study).values(last_received_at=db.now() - timedelta(hours=2)))
        assert enqueue_quiet_studies(db, 3600.0, "1.0.0") == 1
        assert JobQueue(db, "w2", bundle_version="2.0.0").claim_ready_job() is None
        job = JobQueue(db, "w1", bundle_version="1.0.0").claim_ready_job()
        assert job is not None and job.instance_uids == ("1.2.3.1",)
    finally:
        db.dispose()
