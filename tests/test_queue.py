"""The job queue on a real SQLite file and a real PostgreSQL server: leases, retries, and no
job handed out twice."""

from __future__ import annotations

import json
import multiprocessing as mp
import time

import pytest
from sqlalchemy import select

from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Job, Study
from scxnn_node.store.queue import JobQueue


@pytest.fixture
def db(database_url) -> Database:
    """An empty node database: SQLite file or PostgreSQL (every test runs on both)."""
    database = Database(database_url)
    database.create_schema()
    yield database
    database.dispose()


def _enqueue(db, n: int) -> None:
    with db.session() as s:
        for i in range(n):
            assert JobQueue.enqueue(s, f"1.2.{i}", [f"1.2.{i}.1"], "1.0.0") is not None


def test_enqueue_is_idempotent_per_input(db):
    with db.session() as s:
        assert JobQueue.enqueue(s, "1.2", ["b", "a"], "1.0.0") is not None
        assert JobQueue.enqueue(s, "1.2", ["a", "b", "a"], "1.0.0") is None  # same set
        assert JobQueue.enqueue(s, "1.2", ["a", "b"], "2.0.0") is not None  # new bundle
        assert JobQueue.enqueue(s, "1.2", ["a", "b", "c"], "1.0.0") is not None  # new instance


def test_claim_complete_fail_and_retry(db):
    _enqueue(db, 1)
    queue = JobQueue(db, "w1", lease_seconds=60, max_attempts=2)
    job = queue.claim_ready_job()
    assert job is not None and job.attempts == 1 and job.instance_uids == ("1.2.0.1",)
    assert queue.claim_ready_job() is None  # claimed: not handed out again
    assert queue.fail(job.id, "boom") == "ready"
    job = queue.claim_ready_job()
    assert job.attempts == 2
    assert queue.fail(job.id, "boom again") == "failed"  # max_attempts reached
    assert queue.claim_ready_job() is None
    assert queue.retry(job.id) == 1
    job = queue.claim_ready_job()
    assert job is not None
    other = JobQueue(db, "w2")
    with db.session() as s:
        assert not other.complete(s, job.id)  # not the owner
    with db.session() as s:
        assert queue.complete(s, job.id)
    with db.session() as s:
        assert s.get(Job, job.id).state == "done"


def test_expired_lease_is_recovered_and_heartbeat_extends(db):
    _enqueue(db, 2)
    short = JobQueue(db, "dead-worker", lease_seconds=1.0)
    first = short.claim_ready_job()
    second = short.claim_ready_job()
    time.sleep(0.5)
    assert short.heartbeat(second.id)  # keeps the second alive until 1.0 s from now
    time.sleep(0.7)  # the first's lease has expired, the second's has 0.3 s left
    assert short.recover_expired_leases() == 1
    other = JobQueue(db, "live-worker")
    again = other.claim_ready_job()
    assert again.id == first.id and again.attempts == 2
    assert not short.heartbeat(first.id)  # the old owner lost it


def _claim_all(url: str, owner: str, out: str) -> None:
    db = Database(url)
    queue = JobQueue(db, owner, lease_seconds=60)
    claimed = []
    idle = 0
    while idle < 20:
        job = queue.claim_ready_job()
        if job is None:
            idle += 1
            time.sleep(0.01)
            continue
        idle = 0
        claimed.append(job.id)
        with db.session() as s:
            assert queue.complete(s, job.id)
    with open(out, "w") as fh:
        json.dump(claimed, fh)


def test_three_worker_processes_never_share_a_job(db, tmp_path):
    _enqueue(db, 150)
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"w{i}.json" for i in range(3)]
    procs = [ctx.Process(target=_claim_all, args=(db.url, f"w{i}", str(outs[i]))) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    claims = [json.loads(o.read_text()) for o in outs]
    everything = [j for c in claims for j in c]
    assert sorted(everything) == list(range(1, 151))  # each job exactly once
    assert sum(1 for c in claims if c) >= 2  # they really competed
    with db.session() as s:
        assert {j.state for j in s.execute(select(Job)).scalars()} == {"done"}


def _record(db, sop, study, skip=None):
    return record_instance(
        db,
        InstanceRecord(sop, study, "1.9", "1.2.840.10008.5.1.4.1.1.7", f"x/{sop}", 1, "PACS", skip),
    )


def test_study_becomes_a_job_after_quiet_seconds(db):
    assert _record(db, "1.1.1", "1.1")
    assert _record(db, "1.1.2", "1.1")
    assert not _record(db, "1.1.2", "1.1")  # duplicate
    assert _record(db, "1.1.3", "1.1", skip="lateral view")
    assert enqueue_quiet_studies(db, 5.0, "1.0.0") == 0  # not quiet yet
    time.sleep(0.3)
    assert enqueue_quiet_studies(db, 0.2, "1.0.0") == 1
    with db.session() as s:
        job = s.execute(select(Job)).scalar_one()
        assert json.loads(job.instance_uids) == ["1.1.1", "1.1.2"]  # skipped one left out
        assert s.get(Study, "1.1").state == "queued"
    # A new instance after the job: the study receives again and gets a second job.
    assert _record(db, "1.1.4", "1.1")
    time.sleep(0.3)
    assert enqueue_quiet_studies(db, 0.2, "1.0.0") == 1
    with db.session() as s:
        assert len(s.execute(select(Job)).scalars().all()) == 2
