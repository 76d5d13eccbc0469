"""The job queue: enqueue, claim with a lease, heartbeat, complete, fail, recover expired leases.

A claim is one transaction that moves a job from ready to claimed only if it is still ready,
so no job is ever handed to two workers (SQLite: BEGIN IMMEDIATE serialises writers;
PostgreSQL: FOR UPDATE SKIP LOCKED lets workers pass each other's locked rows). A worker
claims only jobs of the bundle version it serves, never one that is backing off after a failed
attempt, and never one whose study has another job claimed: one worker at a time works on a
study, so the study's results form one chain (each amends the one before).
The lease operations (heartbeat, complete, fail, hand back, postpone) act only on a job this
owner still holds. A job given up for the study's sake, by its worker or by lease recovery, goes
through one release step; one handed back (its worker stops) or postponed (the spool's disk is
full) spends no attempt. As jobs end, their study's state follows (failed for good: the study is
failed, not waiting).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, bindparam, exists, func, select, update
from sqlalchemy.orm import Session, aliased

from scxnn_node.logs import redact
from scxnn_node.store.audit import append_audit
from scxnn_node.store.db import Database, session_now
from scxnn_node.store.models import AuditAction, Job, JobState, Study, StudyState

MAX_RETRY_BACKOFF = timedelta(hours=1)
MIN_POSTPONE = timedelta(seconds=1)
CLAIM_CANDIDATES = 20  # PostgreSQL: jobs tried per claim when other workers hold their studies
OPEN_JOB_STATES = (JobState.READY, JobState.CLAIMED)


# Built once: an idle worker asks every poll, and building an ORM statement and session costs
# ten times the query.
_ANY_READY = (
    select(Job.id)
    .where(
        Job.state == JobState.READY,
        Job.next_attempt_at.is_(None) | (Job.next_attempt_at <= bindparam("now")),
    )
    .limit(1)
)
_ANY_READY_OF_VERSION = _ANY_READY.where(Job.bundle_version == bindparam("version"))


class LostLease(Exception):
    """Another worker took the job over (our lease expired); our work is discarded."""


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_instance_uid: str
    instance_uids: tuple[str, ...]
    bundle_version: str
    attempts: int
    claimed_at: datetime | None = None  # when this claim began: the worker's busy time


class JobQueue:
    """The queue as one owner (a worker, the scheduler, the CLI) sees it. `bundle_version`: the
    only version this owner's claims take (None: any); `retry_backoff_seconds`: the wait after
    a first failed attempt, doubling with each further one (0: retried at once)."""

    def __init__(
        self,
        db: Database,
        owner: str,
        lease_seconds: float = 300.0,
        max_attempts: int = 3,
        *,
        bundle_version: str | None = None,
        retry_backoff_seconds: float = 0.0,
    ) -> None:
        self.db = db
        self.owner = owner
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self.bundle_version = bundle_version
        self.retry_backoff = timedelta(seconds=retry_backoff_seconds)

    @staticmethod
    def instance_set(instance_uids: Collection[str]) -> str:
        """A job's input key: sha256 of its sorted, distinct SOP Instance UIDs."""
        return hashlib.sha256("\n".join(sorted(set(instance_uids))).encode()).hexdigest()

    @staticmethod
    def enqueue(
        session: Session, study_instance_uid: str, instance_uids: list[str], bundle_version: str
    ) -> Job | None:
        """Add a ready job unless one exists for the same input (then None). The study's older
        jobs still waiting to run are superseded: the new one covers their instances."""
        uids = sorted(set(instance_uids))
        instance_set = JobQueue.instance_set(uids)
        existing = session.execute(
            select(Job.id).where(
                Job.study_instance_uid == study_instance_uid,
                Job.instance_set == instance_set,
                Job.bundle_version == bundle_version,
            )
        ).first()
        if existing is not None:
            return None
        now = session_now(session)
        session.execute(
            update(Job)
            .where(Job.study_instance_uid == study_instance_uid, Job.state == JobState.READY)
            .values(state=JobState.SUPERSEDED, updated_at=now)
        )
        job = Job(
            study_instance_uid=study_instance_uid,
            instance_set=instance_set,
            instance_uids=json.dumps(uids),
            bundle_version=bundle_version,
            state=JobState.READY,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        return job

    def claim_ready_job(self) -> ClaimedJob | None:
        """The oldest claimable job, now leased to this owner; None when there is none."""
        if not self._any_ready():  # the idle worker's usual answer, without a write transaction
            return None
        with self.db.session() as session:
            now = self.db.now()
            tried: list[int] = []
            for _ in range(1 if self.db.is_sqlite else CLAIM_CANDIDATES):
                stmt = self._claimable(now).order_by(Job.id).limit(1)
                if tried:
                    stmt = stmt.where(Job.id.not_in(tried))
                if not self.db.is_sqlite:
                    stmt = stmt.with_for_update(skip_locked=True)
                row = session.execute(stmt).first()
                if row is None:
                    return None
                job_id, study_uid = row
                tried.append(job_id)
                if self.db.is_sqlite or self._lock_study(session, study_uid):
                    return self._take(session, job_id, now)
            return None

    def _any_ready(self) -> bool:
        """Whether a job of this owner's bundle may be ready and due: a cheap read (a superset
        of what the claim takes, which checks again)."""
        version = self.bundle_version
        return self.db.finds_any(
            _ANY_READY if version is None else _ANY_READY_OF_VERSION,
            {"now": self.db.now(), "version": version},
        )

    def _claimable(self, now: datetime):
        """Ready jobs this owner may take: its bundle, due, and no job of the study claimed."""
        other = aliased(Job)
        stmt = select(Job.id, Job.study_instance_uid).where(
            Job.state == JobState.READY,
            (Job.next_attempt_at.is_(None)) | (Job.next_attempt_at <= now),
            ~exists().where(
                other.study_instance_uid == Job.study_instance_uid,
                other.state == JobState.CLAIMED,
            ),
        )
        if self.bundle_version is not None:
            stmt = stmt.where(Job.bundle_version == self.bundle_version)
        return stmt

    @staticmethod
    def _lock_study(session: Session, study_uid: str) -> bool:
        """PostgreSQL: take the study's claim lock (held until commit) and check again, in a
        statement that sees every claim committed meanwhile, that no job of it is claimed.
        Without it two workers could each claim one of a study's two jobs at the same moment
        (row locks skip each other's rows; neither sees the other's uncommitted claim)."""
        locked = session.execute(
            select(func.pg_try_advisory_xact_lock(func.hashtextextended(study_uid, 0)))
        ).scalar()
        if not locked:
            return False
        claimed = session.execute(
            select(Job.id).where(Job.study_instance_uid == study_uid, Job.state == JobState.CLAIMED)
        ).first()
        return claimed is None

    def _take(self, session: Session, job_id: int, now: datetime) -> ClaimedJob | None:
        # One statement that moves the row and returns what the worker needs: no ORM object
        # (loading one cost as much as the claim's SQL; bench/job_queue.py).
        claimed = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.READY)
            .values(
                state=JobState.CLAIMED,
                lease_owner=self.owner,
                lease_expires_at=now + self.lease,
                attempts=Job.attempts + 1,
                updated_at=now,
            )
            .returning(Job.study_instance_uid, Job.instance_uids, Job.bundle_version, Job.attempts)
            .execution_options(synchronize_session=False)
        ).first()
        if claimed is None:
            return None
        study_uid, instance_uids, bundle_version, attempts = claimed
        return ClaimedJob(
            job_id, study_uid, tuple(json.loads(instance_uids)), bundle_version, attempts, now
        )

    def _held(self, job_id: int) -> ColumnElement[bool]:
        """The lease operations' guard: the job is claimed, by this owner."""
        return (
            (Job.id == job_id) & (Job.state == JobState.CLAIMED) & (Job.lease_owner == self.owner)
        )

    def _locked(self, session: Session, *where: ColumnElement[bool]) -> list[Job]:
        """Rows matching `where`, locked until commit (PostgreSQL: a worker's completion
        committed meanwhile is seen, and its row no longer matches)."""
        stmt = select(Job).where(*where).order_by(Job.id)
        if not self.db.is_sqlite:
            stmt = stmt.with_for_update()
        return list(session.execute(stmt).scalars())

    def backoff(self, attempts: int) -> timedelta:
        """The wait before the next attempt after `attempts` failed ones."""
        return min(MAX_RETRY_BACKOFF, self.retry_backoff * 2 ** max(attempts - 1, 0))

    def _release(self, session: Session, job: Job, error: str, now: datetime) -> None:
        """Give a claimed job up: superseded when a newer job of its study exists (it must not
        run after it), failed at max_attempts, otherwise ready again after its backoff."""
        newer = session.execute(
            select(Job.id).where(
                Job.study_instance_uid == job.study_instance_uid,
                Job.id > job.id,
                Job.state != JobState.SUPERSEDED,
            )
        ).first()
        if newer is not None:
            job.state = JobState.SUPERSEDED
        elif job.attempts >= self.max_attempts:
            job.state = JobState.FAILED
            append_audit(
                session,
                AuditAction.NOT_ANALYSED,
                study_uid=job.study_instance_uid,
                party=job.lease_owner or "",
                bundle_version=job.bundle_version,
                outcome="job_failed",
                detail=f"after {job.attempts} attempt(s): {error}"[:500],
            )
        else:
            job.state = JobState.READY
            job.next_attempt_at = now + self.backoff(job.attempts)
        job.lease_owner = None
        job.lease_expires_at = None
        job.last_error = redact(error)[:2000]  # status shows it: UIDs hashed
        job.updated_at = now
        _settle_study(session, job.study_instance_uid)

    def heartbeat(self, job_id: int) -> bool:
        """Extend the lease; False if this owner no longer holds the job."""
        with self.db.session() as session:
            now = self.db.now()
            res = session.execute(
                update(Job)
                .where(self._held(job_id))
                .values(lease_expires_at=now + self.lease, updated_at=now)
            )
            return res.rowcount == 1

    def complete(self, session: Session, job_id: int) -> bool:
        """Mark done inside the caller's transaction (with the result it stores)."""
        res = session.execute(
            update(Job)
            .where(self._held(job_id))
            .values(
                state=JobState.DONE,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=session_now(session),
            )
        )
        return res.rowcount == 1

    def fail(self, job_id: int, error: str) -> str:
        """An attempt failed: ready again after a backoff, failed after max_attempts (or
        superseded); returns the new state. A job this owner does not hold is left alone."""
        with self.db.session() as session:
            held = self._locked(session, self._held(job_id))
            if not held:
                job = session.get(Job, job_id)
                return job.state if job is not None else "missing"
            self._release(session, held[0], error, self.db.now())
            return held[0].state

    def hand_back(self, job_id: int) -> bool:
        """Give a held job back unfinished, as a stopping worker does: ready at once, and the
        attempt it made is not counted (nothing went wrong with the study)."""
        return self._uncounted_release(job_id, timedelta(0), None)

    def postpone(self, job_id: int, error: str) -> bool:
        """Give a held job back after a fault of the node's, not of the study's (its spool's
        disk is full): ready after the first backoff (at least a second, so a full disk is
        not a busy loop), the attempt not counted, so no study fails however long it lasts."""
        delay = max(self.backoff(1), MIN_POSTPONE)
        return self._uncounted_release(job_id, delay, redact(error)[:2000])

    def _uncounted_release(self, job_id: int, delay: timedelta, error: str | None) -> bool:
        """A held job ready again after `delay`, its attempt not counted; False if this owner
        no longer holds it."""
        with self.db.session() as session:
            now = session_now(session)
            values = {"last_error": error} if error is not None else {}
            res = session.execute(
                update(Job)
                .where(self._held(job_id))
                .values(
                    state=JobState.READY,
                    attempts=Job.attempts - 1,
                    lease_owner=None,
                    lease_expires_at=None,
                    next_attempt_at=now + delay if delay else None,
                    updated_at=now,
                    **values,
                )
            )
            return res.rowcount == 1

    def recover_expired_leases(self) -> int:
        """Jobs whose worker stopped heartbeating go back to ready (or failed at max attempts)."""
        now = self.db.now()
        with self.db.session() as session:
            expired = self._locked(
                session, Job.state == JobState.CLAIMED, Job.lease_expires_at < now
            )
            for job in expired:
                self._release(session, job, f"lease of {job.lease_owner} expired", now)
            return len(expired)

    def release_jobs_of(self, owner: str, error: str) -> int:
        """The jobs a worker known to be dead held are released now, not at lease expiry."""
        now = self.db.now()
        with self.db.session() as session:
            held = self._locked(session, Job.state == JobState.CLAIMED, Job.lease_owner == owner)
            for job in held:
                self._release(session, job, error, now)
            return len(held)

    def retry(self, job_id: int | None = None) -> int:
        """Failed jobs (one, or all) back to ready with a fresh attempt count."""
        with self.db.session() as session:
            stmt = select(Job).where(Job.state == JobState.FAILED)
            if job_id is not None:
                stmt = stmt.where(Job.id == job_id)
            jobs = list(session.execute(stmt).scalars())
            now = self.db.now()
            for job in jobs:
                job.state = JobState.READY
                job.attempts = 0
                job.next_attempt_at = None
                job.updated_at = now
                study = session.get(
                    Study, job.study_instance_uid, with_for_update=True, populate_existing=True
                )  # locked: a C-STORE's `receiving` committed meanwhile is not overwritten
                if study is not None and study.state == StudyState.FAILED:
                    study.state = StudyState.QUEUED
            return len(jobs)

    def adopt_unserved_jobs(self, bundle_version: str, served: Collection[str]) -> int:
        """Ready jobs of a bundle version no live worker serves (the node was restarted with
        another bundle) become jobs of `bundle_version`; where that version already has a job
        for the same input, the old one is superseded. Returns how many moved or ended."""
        keep = {bundle_version, *served}
        now = self.db.now()
        with self.db.session() as session:
            orphans = self._locked(
                session, Job.state == JobState.READY, Job.bundle_version.not_in(keep)
            )
            for job in orphans:
                twin = session.execute(
                    select(Job.id).where(
                        Job.study_instance_uid == job.study_instance_uid,
                        Job.instance_set == job.instance_set,
                        Job.bundle_version == bundle_version,
                    )
                ).first()
                job.updated_at = now
                if twin is None:
                    job.bundle_version = bundle_version
                else:
                    job.state = JobState.SUPERSEDED
                    session.flush()
                    _settle_study(session, job.study_instance_uid)
            return len(orphans)


def _settle_study(session: Session, study_instance_uid: str) -> None:
    """A queued study with no job left to run takes the state of its latest job: reported when
    that is done, failed when it failed (a receiving study is left to get its next job)."""
    # Locked and read anew (PostgreSQL): a C-STORE committed meanwhile has made the study
    # receiving, and writing over it would keep its instance from every job.
    study = session.get(Study, study_instance_uid, with_for_update=True, populate_existing=True)
    if study is None or study.state != StudyState.QUEUED:
        return
    session.flush()
    states = list(
        session.execute(
            select(Job.state)
            .where(Job.study_instance_uid == study_instance_uid, Job.state != JobState.SUPERSEDED)
            .order_by(Job.id.desc())
        ).scalars()
    )
    if any(state in OPEN_JOB_STATES for state in states):
        return
    if states:
        study.state = StudyState.REPORTED if states[0] == JobState.DONE else StudyState.FAILED
