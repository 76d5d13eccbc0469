"""The job queue on a real SQLite file and a real PostgreSQL server: leases, retries, and no
job handed out twice."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from datetime import timedelta

from sqlalchemy import select, update

from scxnn_node.status import node_status
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Job, Study
from scxnn_node.store.queue import JobQueue
from scxnn_node.testing.loopback import wait_for


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


def test_only_the_lease_holder_fails_or_extends_a_job(db):
    _enqueue(db, 1)
    holder, other = JobQueue(db, "w1", max_attempts=3), JobQueue(db, "w2")
    job = holder.claim_ready_job()
    assert other.fail(job.id, "not mine") == "claimed"  # reported, not changed
    assert not other.heartbeat(job.id)
    with db.session() as s:
        row = s.get(Job, job.id)
        assert (row.lease_owner, row.last_error) == ("w1", None)
    assert holder.fail(job.id, "x" * 5000) == "ready"
    with db.session() as s:
        row = s.get(Job, job.id)
        assert row.lease_owner is None and row.lease_expires_at is None
        assert len(row.last_error) == 2000
    assert holder.fail(job.id, "again") == "ready"  # released: no longer this owner's
    assert holder.fail(10_000, "no such job") == "missing"


def test_recovery_releases_like_a_failure(db):
    _enqueue(db, 1)
    queue = JobQueue(db, "gone", lease_seconds=0.01, max_attempts=1)
    job = queue.claim_ready_job()
    time.sleep(0.05)
    assert queue.recover_expired_leases() == 1
    with db.session() as s:
        row = s.get(Job, job.id)
        assert row.state == "failed"  # max_attempts reached, as fail() would decide
        assert row.last_error == "lease of gone expired" and row.lease_owner is None


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


def _jobs(db) -> dict[int, Job]:
    with db.session() as s:
        return {j.id: j for j in s.execute(select(Job)).scalars()}


def test_a_queue_claims_only_jobs_of_the_bundle_version_it_serves(db):
    with db.session() as s:
        old = JobQueue.enqueue(s, "1.5", ["1.5.1"], "2.0.0").id
        mine = JobQueue.enqueue(s, "1.6", ["1.6.1"], "1.2.3").id
    queue = JobQueue(db, "w1", bundle_version="1.2.3")
    job = queue.claim_ready_job()
    assert job is not None and (job.id, job.bundle_version) == (mine, "1.2.3")
    assert queue.claim_ready_job() is None  # the 2.0.0 job is not ours
    assert _jobs(db)[old].state == "ready"


def test_failed_attempts_back_off_doubling_and_the_study_ends_failed(db):
    assert _record(db, "1.7.1", "1.7")
    assert enqueue_quiet_studies(db, 0, "1.0.0") == 1
    queue = JobQueue(db, "w1", max_attempts=3, retry_backoff_seconds=0.2)
    job = queue.claim_ready_job()
    waits = []
    for attempt in (1, 2):
        assert job.attempts == attempt
        assert queue.fail(job.id, "cannot build the SR") == "ready"
        row = _jobs(db)[job.id]
        waits.append(row.next_attempt_at - row.updated_at)
        assert queue.claim_ready_job() is None  # backing off: not handed out before its time
        job = wait_for(queue.claim_ready_job, 10, interval=0.05)
    assert waits == [timedelta(seconds=0.2), timedelta(seconds=0.4)]
    assert job.attempts == 3
    assert queue.fail(job.id, "for good") == "failed"
    with db.session() as s:
        assert s.get(Study, "1.7").state == "failed"  # terminal: not waiting, purgeable
    assert node_status(db)["oldest_waiting_study"] is None
    assert queue.retry(job.id) == 1
    with db.session() as s:
        assert s.get(Study, "1.7").state == "queued"  # waiting again for its retried job


def test_handing_a_job_back_counts_no_attempt(db):
    _enqueue(db, 1)
    queue = JobQueue(db, "w1", max_attempts=1, retry_backoff_seconds=60)
    job = queue.claim_ready_job()
    assert JobQueue(db, "w2").hand_back(job.id) is False  # only the holder hands back
    assert queue.hand_back(job.id) is True
    row = _jobs(db)[job.id]
    assert (row.state, row.attempts, row.lease_owner) == ("ready", 0, None)
    again = JobQueue(db, "w2").claim_ready_job()  # no backoff: due at once
    assert again is not None and again.attempts == 1


def test_jobs_of_a_dead_worker_are_released_at_once(db):
    _enqueue(db, 2)
    dead, live = JobQueue(db, "host:1:cpu"), JobQueue(db, "host:2:cpu")
    mine, other = dead.claim_ready_job(), live.claim_ready_job()
    assert JobQueue(db, "node").release_jobs_of("host:1:cpu", "worker died") == 1
    jobs = _jobs(db)
    assert (jobs[mine.id].state, jobs[mine.id].last_error) == ("ready", "worker died")
    assert (jobs[other.id].state, jobs[other.id].lease_owner) == ("claimed", "host:2:cpu")


def test_a_study_is_worked_on_by_one_worker_at_a_time(db):
    with db.session() as s:
        first = JobQueue.enqueue(s, "1.8", ["1.8.1"], "1.0.0").id
    a, b = JobQueue(db, "a"), JobQueue(db, "b")
    assert a.claim_ready_job().id == first
    with db.session() as s:
        second = JobQueue.enqueue(s, "1.8", ["1.8.1", "1.8.2"], "1.0.0").id
    assert b.claim_ready_job() is None  # its study has a job claimed: it waits
    with db.session() as s:
        assert a.complete(s, first)
    assert b.claim_ready_job().id == second


def test_a_newer_job_of_a_study_supersedes_its_older_waiting_ones(db):
    with db.session() as s:
        older = JobQueue.enqueue(s, "1.9", ["1.9.1"], "1.0.0").id
        newer = JobQueue.enqueue(s, "1.9", ["1.9.1", "1.9.2"], "1.0.0").id
    jobs = _jobs(db)
    assert (jobs[older].state, jobs[newer].state) == ("superseded", "ready")
    # A claimed job given up after a newer one was queued is superseded too, never re-run
    # after it (its older instance set would become the study's current result).
    with db.session() as s:
        JobQueue.enqueue(s, "1.10", ["a"], "1.0.0")
    queue = JobQueue(db, "w1")
    running = queue.claim_ready_job()
    while running.study_instance_uid != "1.10":
        running = queue.claim_ready_job()
    with db.session() as s:
        JobQueue.enqueue(s, "1.10", ["a", "b"], "1.0.0")
    assert queue.fail(running.id, "lost its worker") == "superseded"


def test_ready_jobs_of_a_bundle_no_live_worker_serves_move_to_the_current_bundle(db):
    assert _record(db, "1.11.1", "1.11")
    assert _record(db, "1.12.1", "1.12")
    with db.session() as s:  # 1.12 was done by 2.0.0 already
        JobQueue.enqueue(s, "1.12", ["1.12.1"], "2.0.0")
        s.execute(update(Job).values(state="done"))
    assert enqueue_quiet_studies(db, 0, "1.0.0") == 2
    scheduler_queue = JobQueue(db, "scheduler")
    assert scheduler_queue.adopt_unserved_jobs("2.0.0", served={"1.0.0"}) == 0  # still served
    assert scheduler_queue.adopt_unserved_jobs("2.0.0", served=set()) == 2
    with db.session() as s:
        jobs = {
            (j.study_instance_uid, j.bundle_version): j.state
            for j in s.execute(select(Job)).scalars()
        }
        studies = {st.study_instance_uid: st.state for st in s.execute(select(Study)).scalars()}
    assert jobs == {
        ("1.11", "2.0.0"): "ready",
        ("1.12", "1.0.0"): "superseded",
        ("1.12", "2.0.0"): "done",
    }
    assert studies == {"1.11": "queued", "1.12": "reported"}


def _claim_study_by_study(url: str, owner: str, out: str) -> None:
    """Claim, hold briefly, check that no other job of the study is claimed, complete."""
    db = Database(url)
    queue = JobQueue(db, owner, lease_seconds=60)
    overlaps = []
    claimed = 0
    idle = 0
    while idle < 30:
        job = queue.claim_ready_job()
        if job is None:
            idle += 1
            time.sleep(0.01)
            continue
        idle = 0
        claimed += 1
        time.sleep(0.005)
        with db.session() as s:
            held = s.execute(
                select(Job.id).where(
                    Job.study_instance_uid == job.study_instance_uid, Job.state == "claimed"
                )
            ).all()
            if len(held) > 1:
                overlaps.append(job.study_instance_uid)
        with db.session() as s:
            assert queue.complete(s, job.id)
    with open(out, "w") as fh:
        json.dump({"claimed": claimed, "overlaps": overlaps}, fh)


def test_worker_processes_never_work_on_one_study_at_once(db, tmp_path):
    with db.session() as s:  # two jobs (of two bundle versions) per study
        for i in range(40):
            for version in ("1.0.0", "2.0.0"):
                s.add(
                    Job(
                        study_instance_uid=f"1.3.{i}",
                        instance_set="x" * 64,
                        instance_uids="[]",
                        bundle_version=version,
                        state="ready",
                        attempts=0,
                        created_at=db.now(),
                        updated_at=db.now(),
                    )
                )
    ctx = mp.get_context("spawn")
    outs = [tmp_path / f"s{i}.json" for i in range(3)]
    procs = [
        ctx.Process(target=_claim_study_by_study, args=(db.url, f"w{i}", str(outs[i])))
        for i in range(3)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    reports = [json.loads(o.read_text()) for o in outs]
    assert sum(r["claimed"] for r in reports) == 80
    assert [r["overlaps"] for r in reports] == [[], [], []]
