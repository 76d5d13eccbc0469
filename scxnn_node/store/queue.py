"""The job queue: enqueue, claim with a lease, heartbeat, complete, fail, recover expired leases.

A claim is one transaction that moves a job from ready to claimed only if it is still ready,
so no job is ever handed to two workers (SQLite: BEGIN IMMEDIATE serialises writers;
PostgreSQL: FOR UPDATE SKIP LOCKED lets workers pass each other's locked rows).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scxnn_node.store.db import Database, utc_now
from scxnn_node.store.models import Job


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_instance_uid: str
    instance_uids: tuple[str, ...]
    bundle_version: str
    attempts: int


class JobQueue:
    def __init__(
        self, db: Database, owner: str, lease_seconds: float = 300.0, max_attempts: int = 3
    ) -> None:
        self.db = db
        self.owner = owner
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts

    @staticmethod
    def enqueue(
        session: Session, study_instance_uid: str, instance_uids: list[str], bundle_version: str
    ) -> Job | None:
        """Add a ready job unless one exists for the same input (then None)."""
        uids = sorted(set(instance_uids))
        instance_set = hashlib.sha256("\n".join(uids).encode()).hexdigest()
        existing = session.execute(
            select(Job.id).where(
                Job.study_instance_uid == study_instance_uid,
                Job.instance_set == instance_set,
                Job.bundle_version == bundle_version,
            )
        ).first()
        if existing is not None:
            return None
        now = utc_now()
        job = Job(
            study_instance_uid=study_instance_uid,
            instance_set=instance_set,
            instance_uids=json.dumps(uids),
            bundle_version=bundle_version,
            state="ready",
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        session.add(job)
        session.flush()
        return job

    def claim_ready_job(self) -> ClaimedJob | None:
        """The oldest ready job, now leased to this owner; None when there is none."""
        with self.db.session() as session:
            stmt = select(Job.id).where(Job.state == "ready").order_by(Job.id).limit(1)
            if not self.db.is_sqlite:
                stmt = stmt.with_for_update(skip_locked=True)
            job_id = session.execute(stmt).scalar()
            if job_id is None:
                return None
            now = utc_now()
            claimed = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "ready")
                .values(
                    state="claimed",
                    lease_owner=self.owner,
                    lease_expires_at=now + self.lease,
                    attempts=Job.attempts + 1,
                    updated_at=now,
                )
            )
            if claimed.rowcount != 1:
                return None
            job = session.get(Job, job_id)
            assert job is not None
            return ClaimedJob(
                job.id,
                job.study_instance_uid,
                tuple(json.loads(job.instance_uids)),
                job.bundle_version,
                job.attempts,
            )

    def heartbeat(self, job_id: int) -> bool:
        """Extend the lease; False if this owner no longer holds the job."""
        with self.db.session() as session:
            now = utc_now()
            res = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == "claimed", Job.lease_owner == self.owner)
                .values(lease_expires_at=now + self.lease, updated_at=now)
            )
            return res.rowcount == 1

    def complete(self, session: Session, job_id: int) -> bool:
        """Mark done inside the caller's transaction (with the result it stores)."""
        res = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == "claimed", Job.lease_owner == self.owner)
            .values(state="done", lease_owner=None, lease_expires_at=None, updated_at=utc_now())
        )
        return res.rowcount == 1

    def fail(self, job_id: int, error: str) -> str:
        """Back to ready for another try, or failed after max_attempts; returns the new state."""
        with self.db.session() as session:
            job = session.get(Job, job_id)
            if job is None or job.state != "claimed" or job.lease_owner != self.owner:
                return job.state if job is not None else "missing"
            job.state = "failed" if job.attempts >= self.max_attempts else "ready"
            job.lease_owner = None
            job.lease_expires_at = None
            job.last_error = error[:2000]
            job.updated_at = utc_now()
            return job.state

    def recover_expired_leases(self) -> int:
        """Jobs whose worker stopped heartbeating go back to ready (or failed at max attempts)."""
        now = utc_now()
        with self.db.session() as session:
            expired = (
                session.execute(
                    select(Job).where(Job.state == "claimed", Job.lease_expires_at < now)
                )
                .scalars()
                .all()
            )
            for job in expired:
                job.state = "failed" if job.attempts >= self.max_attempts else "ready"
                job.last_error = f"lease of {job.lease_owner} expired"
                job.lease_owner = None
                job.lease_expires_at = None
                job.updated_at = now
            return len(expired)

    def retry(self, job_id: int | None = None) -> int:
        """Failed jobs (one, or all) back to ready with a fresh attempt count."""
        with self.db.session() as session:
            stmt = update(Job).where(Job.state == "failed")
            if job_id is not None:
                stmt = stmt.where(Job.id == job_id)
            res = session.execute(stmt.values(state="ready", attempts=0, updated_at=utc_now()))
            return res.rowcount
