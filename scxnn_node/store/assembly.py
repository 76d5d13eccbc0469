"""Study assembly: received instances are recorded; a study quiet for N seconds becomes a job."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from scxnn_node.store.db import Database, utc_now
from scxnn_node.store.models import Instance, Study
from scxnn_node.store.queue import JobQueue


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
    """Commit an instance row (and touch its study); False if the SOP instance was known."""
    now = utc_now()
    with db.session() as session:
        if session.get(Instance, record.sop_instance_uid) is not None:
            return False
        session.add(
            Instance(
                sop_instance_uid=record.sop_instance_uid,
                study_instance_uid=record.study_instance_uid,
                series_instance_uid=record.series_instance_uid,
                sop_class_uid=record.sop_class_uid,
                path=record.path,
                size=record.size,
                calling_ae=record.calling_ae,
                state="skipped" if record.skip_reason else "stored",
                skip_reason=record.skip_reason,
                received_at=now,
            )
        )
        if record.skip_reason is None:
            study = session.get(Study, record.study_instance_uid)
            if study is None:
                session.add(
                    Study(
                        study_instance_uid=record.study_instance_uid,
                        state="receiving",
                        first_received_at=now,
                        last_received_at=now,
                    )
                )
            else:
                study.state = "receiving"  # a reported study gets an amended result
                study.last_received_at = now
        return True


def enqueue_quiet_studies(db: Database, quiet_seconds: float, bundle_version: str) -> int:
    """Studies with no new instance for `quiet_seconds` get a job for their current instances."""
    cutoff = utc_now() - timedelta(seconds=quiet_seconds)
    queued = 0
    with db.session() as session:
        studies = (
            session.execute(
                select(Study).where(Study.state == "receiving", Study.last_received_at <= cutoff)
            )
            .scalars()
            .all()
        )
        for study in studies:
            uids = (
                session.execute(
                    select(Instance.sop_instance_uid).where(
                        Instance.study_instance_uid == study.study_instance_uid,
                        Instance.state == "stored",
                    )
                )
                .scalars()
                .all()
            )
            if JobQueue.enqueue(session, study.study_instance_uid, list(uids), bundle_version):
                queued += 1
                study.state = "queued"
            else:  # re-sent instances only: this exact input was already triaged
                study.state = "reported"
    return queued
