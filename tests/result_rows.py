"""Rows a finished job leaves, written straight into the database: for tests of what comes after
the worker (delivery, retention, the CLI) that need results without running a model."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from scxnn_node.store.models import Job, Result


def add_done_result(
    session: Session,
    study: str,
    instance_set: str,
    now: datetime,
    sr_uid: str = "1.2",
    summary_uid: str = "1.3",
) -> Result:
    """A done job of `study` and its abnormal result (flushed: its id is set)."""
    job = Job(
        study_instance_uid=study,
        instance_set=instance_set.ljust(64, "x"),
        instance_uids="[]",
        bundle_version="1.2.3",
        state="done",
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    result = Result(
        job_id=job.id,
        study_instance_uid=study,
        verdict="abnormal",
        result_json="{}",
        sr_sop_instance_uid=sr_uid,
        summary_sop_instance_uid=summary_uid,
        created_at=now,
    )
    session.add(result)
    session.flush()
    return result
