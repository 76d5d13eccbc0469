"""Retention's rule, in one place: which received files and outputs may be deleted, and which of
a job's instances still have a file (a purged instance's row keeps its UID with an empty path).

Received files of a finished study are kept while the study may still be amended: until they
are `storage.retention_days` old AND the study has received nothing for
`storage.amendment_window_days`. An output file is kept while any delivery of it is pending or
ended less than `retention_days` ago (one file serves every destination).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from scxnn_node.store.db import Database
from scxnn_node.store.models import (
    FINISHED_STUDY_STATES,
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Study,
)


def expired_instances(
    session: Session, received_before: datetime, study_quiet_since: datetime
) -> list[Instance]:
    """Instances whose files may go: skipped ones (never analysed) received before
    `received_before`; the others once, in addition, their finished study has received nothing
    since `study_quiet_since` (a late instance would amend the study with them)."""
    return list(
        session.execute(
            select(Instance)
            .join(Study, Study.study_instance_uid == Instance.study_instance_uid, isouter=True)
            .where(
                Instance.received_at < received_before,
                Instance.path != "",
                (Instance.state == InstanceState.SKIPPED)
                | (
                    Study.state.in_(FINISHED_STUDY_STATES)
                    & (Study.last_received_at < study_quiet_since)
                ),
            )
        ).scalars()
    )


def unneeded_outputs(db: Database, ended_before: datetime) -> list[str]:
    """Outbox files none of whose deliveries is pending or ended after `ended_before`."""
    needed = select(Delivery.path).where(
        (Delivery.state == DeliveryState.PENDING) | (Delivery.updated_at >= ended_before)
    )
    with db.session() as session:
        return list(
            session.execute(
                select(Delivery.path)
                .where(Delivery.path != "", Delivery.path.not_in(needed))
                .distinct()
            ).scalars()
        )


def forget_outputs(db: Database, paths: Sequence[str]) -> None:
    """Record that these outbox files were purged (their deliveries' path becomes empty)."""
    if paths:
        with db.session() as session:
            session.execute(update(Delivery).where(Delivery.path.in_(paths)).values(path=""))


def readable_instances(db: Database, sop_instance_uids: Sequence[str]) -> list[tuple[str, str]]:
    """(SOP Instance UID, spool path) of those instances whose file retention has not purged:
    what a job can still read. Never an empty path."""
    with db.session() as session:
        return [
            (uid, path)
            for uid, path in session.execute(
                select(Instance.sop_instance_uid, Instance.path).where(
                    Instance.sop_instance_uid.in_(sop_instance_uids), Instance.path != ""
                )
            ).all()
        ]


def purged_instances(session: Session, sop_instance_uids: Sequence[str]) -> list[str]:
    """Those instances whose file retention purged: a job of them analyses the rest."""
    return list(
        session.execute(
            select(Instance.sop_instance_uid).where(
                Instance.sop_instance_uid.in_(sop_instance_uids), Instance.path == ""
            )
        ).scalars()
    )
