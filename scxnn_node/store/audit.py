"""The audit trail: append a record of what happened (identifiers hashed, no patient data),
count records for metrics, and read them back for export. Records are never updated or
deleted by the node: no code path here or elsewhere changes a row once it is written.

Each record is added by the store function that makes the change it records, in the same
transaction (instance rows: assembly; results: results; deliveries: results; job failure:
queue; retention: the cleaner). A refusal changes no state: `commit_audit` writes it alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scxnn_node.logs import hash_uids, redact, short_hash
from scxnn_node.store.db import Database, session_now
from scxnn_node.store.models import AuditAction, AuditRecord

log = logging.getLogger(__name__)

_OUTCOME_CHARS = 64
# Free-text reasons (filters, eligibility, triage) as short codes: an outcome is a label that
# metrics count by, so it must come from a small set; the full reason goes to `detail`.
_REASON_CODES = (
    ("SOP class ", "sop_class_not_allowed"),
    ("modality ", "modality_not_allowed"),
    ("body part ", "body_part_not_allowed"),
    ("lateral view", "lateral_view"),
    ("view ", "view_not_allowed"),
    ("no usable frontal chest image", "no_usable_image"),
)
_CODE_PREFIX = re.compile(r"([a-z][a-z_]{1,40}):")  # "not_dicom: ...", "unusable: ..."


def append_audit(session: Session, action: AuditAction, **fields: Any) -> None:
    """Add one record (fields as `audit_row` takes them) in the caller's transaction, so it
    commits with the change it records."""
    session.add(AuditRecord(**audit_row(action, at=session_now(session), **fields)))


def audit_row(
    action: AuditAction,
    *,
    at: datetime,
    study_uid: str = "",
    instance_uid: str = "",
    party: str = "",
    bundle_version: str = "",
    outcome: str = "",
    risk_tier: str = "",
    size_bytes: int | None = None,
    seconds: float | None = None,
    detail: str = "",
) -> dict[str, Any]:
    """The column values of one record, identifiers hashed: for `append_audit`, and for an
    insert statement in a hot path (the C-STORE's) that skips the ORM."""
    return {
        "at": at,
        "action": action,
        "study": short_hash(study_uid) if study_uid else "",
        "instance": short_hash(instance_uid) if instance_uid else "",
        "party": party[:128],
        "bundle_version": bundle_version,
        "outcome": hash_uids(outcome)[:_OUTCOME_CHARS],
        "risk_tier": risk_tier or "",
        "size_bytes": size_bytes,
        "seconds": seconds,
        "detail": redact(hash_uids(detail)),
    }


def commit_audit(db: Database, action: AuditAction, **fields: Any) -> bool:
    """Commit one record by itself, for a happening that changes no other row (a refused
    C-STORE or association). Best effort: the caller's answer to its peer must not depend on
    it, so a database error is logged and False returned."""
    try:
        with db.session() as session:
            append_audit(session, action, **fields)
    except Exception as exc:
        log.warning("audit record %s not written: %s", action, type(exc).__name__)
        return False
    return True


def reason_code(reason: str) -> str:
    """A reason as a short code for an outcome ("body_part_not_allowed", "not_dicom", ...);
    "other" for a reason of no known shape."""
    for prefix, code in _REASON_CODES:
        if reason.startswith(prefix):
            return code
    match = _CODE_PREFIX.match(reason)
    return match.group(1) if match else "other"


def audit_counts(session: Session) -> dict[tuple[str, str], int]:
    """How many records there are per (action, outcome): monotonic counters for metrics."""
    rows = session.execute(
        select(AuditRecord.action, AuditRecord.outcome, func.count()).group_by(
            AuditRecord.action, AuditRecord.outcome
        )
    ).all()
    return {(action, outcome): count for action, outcome, count in rows}


def audit_records(
    db: Database, since: datetime, until: datetime | None = None, batch: int = 1000
) -> Iterator[dict[str, Any]]:
    """Records from `since` (inclusive) to `until` (exclusive), oldest first, as plain dicts;
    read in batches so an export of a long period holds little in memory."""
    last_id = 0
    while True:
        with db.session() as session:
            query = (
                select(AuditRecord)
                .where(AuditRecord.at >= since, AuditRecord.id > last_id)
                .order_by(AuditRecord.id)
                .limit(batch)
            )
            if until is not None:
                query = query.where(AuditRecord.at < until)
            rows = session.scalars(query).all()
            records = [_as_dict(r) for r in rows]
        if not records:
            return
        yield from records
        last_id = records[-1]["id"]


def _as_dict(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "at": record.at.isoformat(),
        "action": record.action,
        "study": record.study,
        "instance": record.instance,
        "party": record.party,
        "bundle_version": record.bundle_version,
        "outcome": record.outcome,
        "risk_tier": record.risk_tier,
        "size_bytes": record.size_bytes,
        "seconds": record.seconds,
        "detail": record.detail,
    }
