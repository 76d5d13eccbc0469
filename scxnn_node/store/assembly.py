"""Study assembly: received instances are recorded; a study quiet for N seconds becomes a job
(this module owns that rule, and says when the next study becomes quiet), and is reported when
its job's result is stored; an instance a worker cannot use is marked unusable, and its study
goes on without it."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Executable, bindparam, case, func, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from scxnn_node.store.audit import append_audit, audit_row, reason_code
from scxnn_node.store.db import Database
from scxnn_node.store.models import (
    AuditAction,
    AuditRecord,
    Instance,
    InstanceState,
    Job,
    JobState,
    Study,
    StudyState,
)
from scxnn_node.store.queue import JobQueue

# The state a study takes when its current input already has a job in this state.
_STUDY_STATE_OF_JOB = {
    JobState.READY: StudyState.QUEUED,
    JobState.CLAIMED: StudyState.QUEUED,
    JobState.DONE: StudyState.REPORTED,
    JobState.FAILED: StudyState.FAILED,
}


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: str
    size: int
    calling_ae: str
    skip_reason: str | None = None  # set: recorded as skipped, never analysed


def record_instance(db: Database, record: InstanceRecord) -> bool:
    """Commit an instance row, its audit record and (analysed) its study's `receiving`, in one
    transaction; False if the SOP instance was known. Core statements, not the ORM: this runs
    once per C-STORE, and the ORM's unit of work cost most of its CPU (bench/ingest.py)."""
    now = db.now()
    statements = _ingest_statements(db.engine.dialect.name)
    with db.engine.begin() as connection:
        # ON CONFLICT DO NOTHING: a known instance (a re-send, or a concurrent association
        # committing the same one first: PostgreSQL waits for it) inserts nothing.
        inserted = (
            connection.execute(
                statements.instance,
                {
                    "sop_instance_uid": record.sop_instance_uid,
                    "study_instance_uid": record.study_instance_uid,
                    "series_instance_uid": record.series_instance_uid,
                    "sop_class_uid": record.sop_class_uid,
                    "path": record.path,
                    "size": record.size,
                    "calling_ae": record.calling_ae,
                    "state": InstanceState.SKIPPED if record.skip_reason else InstanceState.STORED,
                    "skip_reason": record.skip_reason,
                    "received_at": now,
                },
            ).first()
            is not None
        )
        connection.execute(statements.audit, _receipt_row(record, duplicate=not inserted, at=now))
        if inserted and record.skip_reason is None:
            # An upsert that always writes `receiving` (a reported study gets an amended
            # result). On PostgreSQL it waits for a scheduler pass holding the study's row,
            # turning it into a job without this uncommitted instance, and then overwrites its
            # `queued`; SQLite's BEGIN IMMEDIATE serialises the two.
            connection.execute(
                statements.study,
                {
                    "study_instance_uid": record.study_instance_uid,
                    "state": StudyState.RECEIVING,
                    "first_received_at": now,
                    "last_received_at": now,
                },
            )
        return inserted


@dataclass(frozen=True)
class _IngestStatements:
    instance: Executable
    audit: Executable
    study: Executable


@functools.cache
def _ingest_statements(dialect: str) -> _IngestStatements:
    """The three statements of `record_instance`, built once per dialect (both SQLite and
    PostgreSQL have INSERT ... ON CONFLICT)."""
    upsert = {"sqlite": sqlite_insert, "postgresql": postgresql_insert}[dialect]
    study = upsert(Study.__table__)
    newer, current = study.excluded, Study.__table__.c
    return _IngestStatements(
        # RETURNING says whether a row went in (a driver's rowcount may be -1 here)
        instance=upsert(Instance.__table__)
        .on_conflict_do_nothing(index_elements=[Instance.__table__.c.sop_instance_uid])
        .returning(Instance.__table__.c.sop_instance_uid),
        audit=insert(AuditRecord.__table__),
        study=study.on_conflict_do_update(
            index_elements=[Study.__table__.c.study_instance_uid],
            # Never back in time: `now` was read before this transaction waited for its turn.
            set_={
                "state": newer.state,
                "last_received_at": case(
                    (newer.last_received_at > current.last_received_at, newer.last_received_at),
                    else_=current.last_received_at,
                ),
            },
        ),
    )


def _receipt_row(record: InstanceRecord, duplicate: bool, at: datetime) -> dict[str, Any]:
    """A received instance's audit record: `received` (outcome stored, or duplicate of a known
    one), or, new and excluded by the filters, `skipped` with the reason's code; never both,
    so the records count each acknowledged C-STORE once."""
    fields: dict[str, Any] = {
        "study_uid": record.study_instance_uid,
        "instance_uid": record.sop_instance_uid,
        "party": record.calling_ae,
        "size_bytes": record.size,
        "at": at,
    }
    if duplicate:
        return audit_row(AuditAction.RECEIVED, outcome="duplicate", **fields)
    if record.skip_reason:
        reason = record.skip_reason
        return audit_row(AuditAction.SKIPPED, outcome=reason_code(reason), detail=reason, **fields)
    return audit_row(AuditAction.RECEIVED, outcome="stored", **fields)


# Built once: the scheduler asks several times a second, mostly to hear "none", and building
# an ORM statement and session costs ten times the query.
_ANY_QUIET = (
    select(Study.study_instance_uid)
    .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= bindparam("cutoff"))
    .limit(1)
)
# The receiving study whose last instance came first among those not yet quiet at the cutoff.
_FIRST_NOT_QUIET = select(func.min(Study.last_received_at)).where(
    Study.state == StudyState.RECEIVING, Study.last_received_at > bindparam("cutoff")
)


def quiet_cutoff(quiet_seconds: float, now: datetime) -> datetime:
    """The rule: a receiving study whose last instance arrived at or before this moment is
    quiet, and gets its job."""
    return now - timedelta(seconds=quiet_seconds)


def next_quiet_at(db: Database, quiet_seconds: float, now: datetime) -> datetime | None:
    """When the first study that was not quiet at `now` becomes quiet (its last instance's
    arrival + `quiet_seconds`, later if an instance comes meanwhile); None when no study is
    receiving. One read that takes no write lock. A study already quiet at `now` is left out:
    `enqueue_quiet_studies(now=now)` queued it, or another node holds it (PostgreSQL)."""
    with db.reading() as connection:
        first = connection.execute(
            _FIRST_NOT_QUIET, {"cutoff": quiet_cutoff(quiet_seconds, now)}
        ).scalar()
    return None if first is None else first + timedelta(seconds=quiet_seconds)


def enqueue_quiet_studies(
    db: Database, quiet_seconds: float, bundle_version: str, now: datetime | None = None
) -> int:
    """Studies with no new instance for `quiet_seconds` before `now` (the present moment by
    default) get a job for their current instances; returns how many jobs were made."""
    cutoff = quiet_cutoff(quiet_seconds, now or db.now())
    if not db.finds_any(_ANY_QUIET, {"cutoff": cutoff}):  # the usual answer, cheaply
        return 0
    queued = 0
    with db.session() as session:
        studies = (
            session.execute(
                select(Study)
                .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
                # Locked, and re-checked on PostgreSQL against a C-STORE committed meanwhile:
                # otherwise writing `queued` would overwrite its `receiving` (a lost update)
                # and its instance would miss the job. SQLite's BEGIN IMMEDIATE serialises.
                .with_for_update(skip_locked=True)
            )
            .scalars()
            .all()
        )
        for study in studies:
            uids = (
                session.execute(
                    select(Instance.sop_instance_uid).where(
                        Instance.study_instance_uid == study.study_instance_uid,
                        Instance.state == InstanceState.STORED,
                    )
                )
                .scalars()
                .all()
            )
            job = JobQueue.enqueue(session, study.study_instance_uid, list(uids), bundle_version)
            if job is not None:
                queued += 1
                study.state = StudyState.QUEUED
            else:  # re-sent instances only: the study follows the job this input already has
                study.state = _follow_existing_job(
                    session, study.study_instance_uid, uids, bundle_version
                )
    return queued


def _follow_existing_job(
    session: Session, study_instance_uid: str, uids: Sequence[str], bundle_version: str
) -> str:
    existing = session.execute(
        select(Job).where(
            Job.study_instance_uid == study_instance_uid,
            Job.instance_set == JobQueue.instance_set(uids),
            Job.bundle_version == bundle_version,
        )
    ).scalar_one()
    if existing.state == JobState.SUPERSEDED:  # its study's newer input shrank back to it
        existing.state = JobState.READY
        existing.attempts = 0
        existing.next_attempt_at = None
        return StudyState.QUEUED
    return _STUDY_STATE_OF_JOB[JobState(existing.state)]


def mark_study_reported(session: Session, study_instance_uid: str) -> None:
    """Inside the transaction that stores a job's result: a queued study is now reported (one
    that received a new instance meanwhile stays receiving and gets its amended result)."""
    # Locked and read anew (PostgreSQL): a C-STORE committed meanwhile has made the study
    # receiving, and writing `reported` over it would keep its instance from every job.
    study = session.get(Study, study_instance_uid, with_for_update=True, populate_existing=True)
    if study is not None and study.state == StudyState.QUEUED:
        study.state = StudyState.REPORTED


def mark_instances_unusable(session: Session, reasons: dict[str, str]) -> None:
    """Instances (SOP UID -> why) a worker could not use: never analysed again, and left out
    of their study's later jobs; inside the transaction that stores the job's result."""
    for sop_instance_uid, reason in reasons.items():
        instance = session.get(Instance, sop_instance_uid)
        if instance is not None and instance.state == InstanceState.STORED:
            instance.state = InstanceState.UNUSABLE
            instance.skip_reason = reason[:2000]
            append_audit(
                session,
                AuditAction.UNUSABLE,
                study_uid=instance.study_instance_uid,
                instance_uid=sop_instance_uid,
                outcome=reason_code(reason),
                detail=reason[:500],
            )
