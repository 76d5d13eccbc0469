"""Rows a finished job leaves, written straight into the database: for tests of what comes after
the worker (delivery, retention, the CLI) that need results without running a model."""

from __future__ import annotations

import io
from datetime import datetime, timedelta

import numpy as np
from dicom_factory import make_dataset
from sqlalchemy.orm import Session

from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, Job, Result
from scxnn_node.store.spool import Spool


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


def add_pending_delivery(
    db: Database, spool: Spool, n: int, owner: str | None = None, destination: str = "pacs"
) -> int:
    """A pending delivery to `destination` of an SR (study 1.2.n) in the outbox, due now;
    leased to `owner` for an hour when one is given. Returns its id."""
    rel = f"outbox/{n}/sr.dcm"
    pixels = np.random.default_rng(n).integers(0, 4095, (16, 16), dtype=np.uint16)
    buffer = io.BytesIO()
    make_dataset(pixels, study_uid=f"1.2.{n}").save_as(buffer, enforce_file_format=True)
    spool.write_durably(rel, buffer.getvalue())
    now = db.now()
    with db.session() as s:
        result = add_done_result(s, f"1.2.{n}", str(n), now, f"1.2.{n}.1", f"1.2.{n}.2")
        delivery = Delivery(
            result_id=result.id,
            destination=destination,
            kind="sr",
            path=rel,
            state="pending",
            attempts=0,
            next_attempt_at=now,
            updated_at=now,
            lease_owner=owner,
            lease_expires_at=None if owner is None else now + timedelta(hours=1),
        )
        s.add(delivery)
        s.flush()
        return delivery.id
