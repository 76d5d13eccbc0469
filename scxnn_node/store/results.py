"""What a finished job writes: its result row with the identities of its SR and summary image,
the predecessor an amended SR names, one delivery row per output and destination, and every
change of a delivery's state (claimed under a lease, attempted, retried)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import BindParameter, ColumnElement, bindparam, or_, select, update
from sqlalchemy.orm import Session

from scxnn_node.logs import redact, short_hash
from scxnn_node.store.audit import append_audit, reason_code
from scxnn_node.store.db import Database, session_now
from scxnn_node.store.models import (
    AuditAction,
    Delivery,
    DeliveryState,
    Event,
    Job,
    OutputKind,
    Result,
    Study,
)
from scxnn_node.store.queue import ClaimedJob
from scxnn_node.store.retention import purged_instances

if TYPE_CHECKING:
    from scxnn_node.model.result import StudyResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SrReference:
    """An SR this node wrote, as an amended SR names it in its Predecessor Documents Sequence."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class ReportedSr:
    """A study's latest result that has an SR: what a new result of the study amends."""

    result_id: int
    sr: SrReference


@dataclass(frozen=True)
class JobOutputs:
    """What a job wrote to the outbox: its SR and summary image (none for a study not
    analysed, which has only its HL7 messages)."""

    sr: SrReference | None
    summary_series_instance_uid: str
    summary_sop_instance_uid: str
    paths: Mapping[str, str]  # OutputKind -> spool-relative path
    # HL7 destination -> its ORU^R01 (the message names the destination's applications).
    hl7_paths: Mapping[str, str] = field(default_factory=dict)

    def path(self, destination: str, kind: str) -> str:
        """The file a delivery of `kind` to `destination` sends."""
        return self.hl7_paths[destination] if kind == OutputKind.HL7 else self.paths[kind]

    def has(self, destination: str, kind: str) -> bool:
        """Whether the job wrote what a delivery of `kind` to `destination` sends."""
        return destination in self.hl7_paths if kind == OutputKind.HL7 else kind in self.paths

    @property
    def all_paths(self) -> list[str]:
        return [*self.paths.values(), *self.hl7_paths.values()]


@dataclass(frozen=True)
class DueDelivery:
    id: int
    destination: str
    path: str  # relative to the spool directory; empty once retention purged it
    kind: str = "sr"  # OutputKind: what the file is (an HL7 message goes only to an HL7 peer)


@dataclass(frozen=True)
class Attempt:
    """One try at a delivery: `failure` is None when the peer has the file, otherwise why not;
    a `final` failure (no such file or destination) cannot go away by waiting."""

    delivery_id: int
    failure: str | None = None
    final: bool = False


@dataclass(frozen=True)
class RetryOutcome:
    retried: int
    missing: list[tuple[int, str]] = field(default_factory=list)  # (id, why), left dead


def latest_report(db: Database, study_instance_uid: str) -> ReportedSr | None:
    """The study's latest SR, read from the database (its outbox file may have been purged)."""
    with db.session() as session:
        row = session.execute(
            select(Result)
            .where(
                Result.study_instance_uid == study_instance_uid,
                Result.sr_sop_instance_uid != "",
                # 0.1.0 did not keep an SR's series: such an SR cannot be named (type 1).
                Result.sr_series_instance_uid != "",
            )
            .order_by(Result.id.desc())
            .limit(1)
        ).scalar_one_or_none()
        if row is None:
            return None
        return ReportedSr(
            row.id,
            SrReference(
                row.study_instance_uid,
                row.sr_series_instance_uid,
                row.sr_sop_class_uid,
                row.sr_sop_instance_uid,
            ),
        )


def record_result(
    session: Session,
    job: ClaimedJob,
    result: StudyResult,
    outputs: JobOutputs | None,
    predecessor: ReportedSr | None,
    destinations: Mapping[str, Sequence[str]],
) -> int:
    """Add a job's result row and, when it has outputs, a pending delivery of each output to
    each destination (name -> output kinds), inside the caller's transaction: the one that
    completes the job under its lease, so that all of it becomes visible or none. A kind the
    job did not write (no SR of a study not analysed) is not delivered."""
    now = session_now(session)
    sr = outputs.sr if outputs else None
    # A late instance after retention: the study's earlier files are gone, so this result is
    # of what is left. Said in the result and, for `status`, as a warning event.
    purged = purged_instances(session, job.instance_uids)
    payload = {**result.to_dict(), "purged_instances": sorted(short_hash(u) for u in purged)}
    row = Result(
        job_id=job.id,
        study_instance_uid=job.study_instance_uid,
        verdict=result.verdict.value,
        risk_tier=result.risk_tier,
        abnormality_score=result.abnormality_score,
        result_json=json.dumps(payload),
        sr_series_instance_uid=sr.series_instance_uid if sr else "",
        sr_sop_class_uid=sr.sop_class_uid if sr else "",
        sr_sop_instance_uid=sr.sop_instance_uid if sr else "",
        summary_series_instance_uid=outputs.summary_series_instance_uid if outputs else "",
        summary_sop_instance_uid=outputs.summary_sop_instance_uid if outputs else "",
        predecessor_id=predecessor.result_id if sr and predecessor else None,
        created_at=now,
    )
    session.add(row)
    session.flush()
    _audit_result(session, job, result, now)
    if purged:
        session.add(
            Event(
                at=now,
                level="WARNING",
                kind="partial",
                subject=short_hash(job.study_instance_uid),
                message=f"result {row.id} analysed without {len(purged)} earlier instance(s) "
                "of its study whose files retention purged (storage.amendment_window_days)",
            )
        )
    if outputs is not None:
        for destination, kinds in destinations.items():
            for kind in kinds:
                if not outputs.has(destination, kind):
                    continue
                session.add(
                    Delivery(
                        result_id=row.id,
                        destination=destination,
                        kind=kind,
                        path=outputs.path(destination, kind),
                        state=DeliveryState.PENDING,
                        attempts=0,
                        next_attempt_at=now,
                        updated_at=now,
                    )
                )
    return row.id


def _audit_result(session: Session, job: ClaimedJob, result: StudyResult, now: datetime) -> None:
    """`analysed` (outcome: the verdict) or `not_analysed` (outcome: the reason's code), by
    the worker holding the job, with its busy time from claim to result."""
    held = session.get(Job, job.id)
    fields: dict[str, Any] = {
        "study_uid": job.study_instance_uid,
        "party": (held.lease_owner if held is not None else None) or "",
        "bundle_version": job.bundle_version,
        "seconds": (now - job.claimed_at).total_seconds() if job.claimed_at else None,
    }
    if result.verdict.value == "not_analysed":
        reason = result.reason or ""
        append_audit(
            session, AuditAction.NOT_ANALYSED, outcome=reason_code(reason), detail=reason, **fields
        )
    else:
        append_audit(
            session,
            AuditAction.ANALYSED,
            outcome=result.verdict.value,
            risk_tier=result.risk_tier or "",
            **fields,
        )


def _claimable(now: datetime | BindParameter[datetime]) -> ColumnElement[bool]:
    """Pending, due, and held by no live lease."""
    return (
        (Delivery.state == DeliveryState.PENDING)
        & (Delivery.next_attempt_at <= now)
        & (Delivery.lease_expires_at.is_(None) | (Delivery.lease_expires_at < now))
    )


# Built once: the dispatcher asks this several times a second, mostly to hear "none", and
# building an ORM statement and session costs ten times the query.
_ANY_CLAIMABLE = select(Delivery.id).where(_claimable(bindparam("now"))).limit(1)


def any_due_delivery(db: Database) -> bool:
    """Whether a delivery could be claimed now: a cheap read, rechecked by the claim itself."""
    return db.finds_any(_ANY_CLAIMABLE, {"now": db.now()})


def claim_due_deliveries(
    db: Database, owner: str, limit: int, lease: timedelta
) -> list[DueDelivery]:
    """Due deliveries, oldest first, now leased to `owner` until it records their attempts or
    the lease expires: one transaction that takes only rows nobody holds (SQLite: BEGIN
    IMMEDIATE serialises the claims; PostgreSQL: FOR UPDATE SKIP LOCKED passes locked rows)."""
    if not any_due_delivery(db):  # the usual answer, without the claim's write transaction
        return []
    now = db.now()
    with db.session() as session:
        stmt = select(Delivery.id).where(_claimable(now)).order_by(Delivery.id).limit(limit)
        if not db.is_sqlite:
            stmt = stmt.with_for_update(skip_locked=True)
        ids = list(session.execute(stmt).scalars())
        if not ids:
            return []
        session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids), _claimable(now))
            .values(lease_owner=owner, lease_expires_at=now + lease)
        )
        rows = session.execute(
            select(Delivery.id, Delivery.destination, Delivery.path, Delivery.kind)
            .where(Delivery.id.in_(ids), Delivery.lease_owner == owner)
            .order_by(Delivery.id)
        ).all()
    return [DueDelivery(*row) for row in rows]


def delivery_lease_owners(db: Database) -> list[str]:
    """The owners holding a live lease on a pending delivery (a cheap read)."""
    statement = (
        select(Delivery.lease_owner)
        .where(
            Delivery.state == DeliveryState.PENDING,
            Delivery.lease_owner.is_not(None),
            Delivery.lease_expires_at >= bindparam("now"),
        )
        .distinct()
    )
    with db.reading() as connection:
        return list(connection.execute(statement, {"now": db.now()}).scalars())


def release_deliveries_of(db: Database, owners: Sequence[str]) -> int:
    """The pending deliveries `owners` hold are due for any dispatcher now; returns how many."""
    if not owners:
        return 0
    with db.session() as session:
        released = session.execute(
            update(Delivery)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.lease_owner.in_(owners))
            .values(lease_owner=None, lease_expires_at=None)
        )
        return released.rowcount or 0


def record_attempts(
    db: Database,
    owner: str,
    attempts: Sequence[Attempt],
    max_attempts: int,
    backoff: Callable[[int], timedelta],
) -> int:
    """Each attempt of a delivery `owner` holds: sent, due again after `backoff(attempts)`, or
    dead after max_attempts (at once for a final failure); the lease ends either way. A
    delivery no longer pending or held by another owner is left alone. Returns how many were
    sent."""
    now = db.now()
    sent = 0
    with db.session() as session:
        # Locked, and read again once the lock is ours: a dispatcher retaking the delivery
        # (this owner's lease ran out) may be committing its claim; PostgreSQL would otherwise
        # let this write over it, judged on the row as it was (SQLite's BEGIN IMMEDIATE
        # serialises).
        held = session.execute(
            select(Delivery)
            .where(Delivery.id.in_([a.delivery_id for a in attempts]))
            .order_by(Delivery.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalars()
        by_id = {delivery.id: delivery for delivery in held}
        for attempt in attempts:
            delivery = by_id.get(attempt.delivery_id)
            if (
                delivery is None
                or delivery.state != DeliveryState.PENDING
                or delivery.lease_owner != owner
            ):
                continue
            delivery.attempts += 1
            delivery.updated_at = now
            delivery.lease_owner = None
            delivery.lease_expires_at = None
            if attempt.failure is None:
                delivery.state = DeliveryState.SENT
                delivery.last_error = None
                sent += 1
                _audit_delivery(session, delivery, AuditAction.DELIVERED, now)
                continue
            delivery.last_error = redact(attempt.failure)[:2000]
            if attempt.final or delivery.attempts >= max_attempts:
                delivery.state = DeliveryState.DEAD
                _audit_delivery(session, delivery, AuditAction.DEAD, now)
                log.error(
                    "delivery %d to %s dead after %d attempt(s): %s",
                    delivery.id,
                    delivery.destination,
                    delivery.attempts,
                    delivery.last_error,
                )
            else:
                delivery.next_attempt_at = now + backoff(delivery.attempts)
                _audit_delivery(session, delivery, AuditAction.DELIVERY_FAILED, now)
    return sent


def _audit_delivery(
    session: Session, delivery: Delivery, action: AuditAction, now: datetime
) -> None:
    """One attempt's outcome: party the destination, outcome the output kind, detail why it
    failed; a delivery sent carries the time from its study's last received instance."""
    study_uid = session.execute(
        select(Result.study_instance_uid).where(Result.id == delivery.result_id)
    ).scalar_one_or_none()
    study = session.get(Study, study_uid) if study_uid else None
    seconds = None
    if action is AuditAction.DELIVERED and study is not None:
        seconds = max((now - study.last_received_at).total_seconds(), 0.0)
    append_audit(
        session,
        action,
        study_uid=study_uid or "",
        party=delivery.destination,
        outcome=delivery.kind,
        seconds=seconds,
        detail=delivery.last_error or "",
    )


def missing_output(spool_root: Path, path: str) -> str | None:
    """Why a delivery's outbox file cannot be sent, or None when it is there."""
    if not path:
        return "outbox file purged by retention"
    if not (spool_root / path).is_file():
        return f"outbox file {path} is missing"
    return None


def retry_deliveries(
    db: Database, spool_root: Path, delivery_id: int | None = None, all_dead: bool = False
) -> RetryOutcome:
    """Dead (or any pending) deliveries back to pending, due now, attempts reset; one whose
    outbox file is gone stays as it is and is reported. One a dispatcher is sending right now
    (a live lease) is left to it: reset, it would be sent again by another."""
    now = db.now()
    stmt = (
        select(Delivery)
        .where(
            Delivery.state != DeliveryState.SENT,
            or_(Delivery.lease_owner.is_(None), Delivery.lease_expires_at < now),
        )
        # Locked: a dispatcher recording `sent` meanwhile is waited for, and its row then
        # fails the condition above instead of being turned back to pending.
        .with_for_update()
    )
    if delivery_id is not None:
        stmt = stmt.where(Delivery.id == delivery_id)
    elif all_dead:
        stmt = stmt.where(Delivery.state == DeliveryState.DEAD)
    else:
        raise ValueError("retry needs a delivery id or all_dead")
    retried = 0
    missing: list[tuple[int, str]] = []
    with db.session() as session:
        for delivery in session.execute(stmt.order_by(Delivery.id)).scalars():
            why = missing_output(spool_root, delivery.path)
            if why is not None:
                missing.append((delivery.id, why))
                continue
            delivery.state = DeliveryState.PENDING
            delivery.attempts = 0
            delivery.next_attempt_at = now
            delivery.lease_owner = None
            delivery.lease_expires_at = None
            delivery.updated_at = now
            retried += 1
    return RetryOutcome(retried, missing)
