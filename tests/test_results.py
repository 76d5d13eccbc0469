"""What a finished job writes: the result row, its deliveries, and the predecessor an amended SR
names, on a real SQLite file and a real PostgreSQL server with a real worker."""

from __future__ import annotations

import io
import json
import logging
from datetime import timedelta

import pydicom
import pytest
from dicom_factory import chest_pixels, make_dataset
from result_rows import add_done_result
from sqlalchemy import select, update

from scxnn_node.cleaner import Cleaner
from scxnn_node.logs import short_hash
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, Event, Instance, Job, Result, Study
from scxnn_node.store.results import (
    Attempt,
    claim_due_deliveries,
    record_attempts,
    retry_deliveries,
)
from scxnn_node.store.spool import Spool
from scxnn_node.testing.loopback import free_port, node_config
from scxnn_node.worker import TriageWorker


@pytest.fixture
def node_parts(tmp_path, small_bundle_dir, database_url):
    config = node_config(
        tmp_path,
        database={"url": database_url},
        model={"bundle": str(small_bundle_dir)},
        storage={"retention_days": 1},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
        ],
    )
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    worker = TriageWorker(config, "cpu")
    yield config, db, spool, worker
    worker.db.dispose()
    db.dispose()


def _receive(db: Database, spool: Spool, study_uid: str, seed: int) -> None:
    """A chest image as the SCP would leave it: a spool file and its committed row."""
    ds = make_dataset(chest_pixels(96, seed=seed, bits=12), study_uid=study_uid)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    rel = spool.instance_path(study_uid, ds.SOPInstanceUID)
    spool.write_durably(rel, buffer.getvalue())
    record = InstanceRecord(
        ds.SOPInstanceUID, study_uid, ds.SeriesInstanceUID, ds.SOPClassUID, rel, 1, "PACS"
    )
    assert record_instance(db, record)


def _sr_of(db: Database, spool: Spool, result_id: int) -> pydicom.Dataset:
    with db.session() as s:
        path = s.execute(
            select(Delivery.path).where(Delivery.result_id == result_id, Delivery.kind == "sr")
        ).scalar_one()
    return pydicom.dcmread(spool.absolute(path))


def test_amended_sr_names_its_predecessor_after_the_first_sr_file_was_purged(node_parts):
    config, db, spool, worker = node_parts
    study = pydicom.uid.generate_uid()
    _receive(db, spool, study, seed=1)
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    assert worker.process_next()
    with db.session() as s:
        first = s.execute(select(Result)).scalar_one()
    first_sr = _sr_of(db, spool, first.id)
    # The first SR and summary were sent long ago: retention purges their outbox files.
    with db.session() as s:
        s.execute(
            update(Delivery).values(state="sent", updated_at=db.now() - timedelta(days=2))
        )
        first_sr_path = s.execute(
            select(Delivery.path).where(Delivery.kind == "sr")
        ).scalar_one()
    Cleaner(config, db, spool).purge_spool()
    assert not spool.absolute(first_sr_path).exists()

    _receive(db, spool, study, seed=2)  # a late instance of the reported study
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    assert worker.process_next()
    with db.session() as s:
        second = s.execute(select(Result).where(Result.id != first.id)).scalar_one()
    assert second.predecessor_id == first.id
    amended = _sr_of(db, spool, second.id)
    assert len(amended.PredecessorDocumentsSequence) == 1
    predecessor = amended.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == first_sr.StudyInstanceUID == study
    series = predecessor.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first_sr.SeriesInstanceUID
    referenced = series.ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPClassUID == first_sr.SOPClassUID
    assert referenced.ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    with db.session() as s:
        first = s.get(Result, first.id)  # the row holds the first SR's identity
    assert (first.sr_series_instance_uid, first.sr_sop_class_uid, first.sr_sop_instance_uid) == (
        first_sr.SeriesInstanceUID,
        first_sr.SOPClassUID,
        first_sr.SOPInstanceUID,
    )


def test_a_late_instance_after_retention_is_analysed_without_the_purged_files(
    node_parts, caplog
):
    config, db, spool, worker = node_parts
    study = pydicom.uid.generate_uid()
    _receive(db, spool, study, seed=4)
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    assert worker.process_next()
    with db.session() as s:
        first = s.execute(select(Result)).scalar_one()
        (early,) = s.execute(select(Instance.sop_instance_uid)).scalars()
        # Reported and quiet past the retention and the amendment window: its files go.
        long_ago = db.now() - timedelta(days=2)
        s.execute(update(Instance).values(received_at=long_ago))
        s.execute(update(Study).values(last_received_at=long_ago))
    assert Cleaner(config, db, spool).purge_spool() == 1

    _receive(db, spool, study, seed=5)  # a late instance of the reported study
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    with caplog.at_level(logging.WARNING):
        assert worker.process_next()
    # The purged instance is known to have no file: nothing tries to read it.
    assert not [r for r in caplog.records if "not analysable" in r.getMessage()]
    with db.session() as s:
        job = s.execute(select(Job).order_by(Job.id.desc())).scalars().first()
        assert (job.state, job.last_error) == ("done", None)  # no "Is a directory"
        second = s.execute(select(Result).where(Result.id != first.id)).scalar_one()
        warning = s.execute(select(Event).where(Event.kind == "partial")).scalar_one()
    assert second.predecessor_id == first.id
    assert second.verdict != "not_analysed"
    assert json.loads(second.result_json)["purged_instances"] == [short_hash(early)]
    assert json.loads(first.result_json)["purged_instances"] == []
    assert warning.level == "WARNING" and f"result {second.id} analysed without 1" in (
        warning.message
    )
    assert early not in warning.message and study not in warning.message


class _LeaseStolenWorker(TriageWorker):
    """Loses its job to another worker between triage and the commit of its outcome."""

    def _triage(self, job):
        outcome = super()._triage(job)
        with self.db.session() as s:
            s.execute(update(Job).where(Job.id == job.id).values(lease_owner="other-worker"))
        return outcome


def test_a_worker_that_lost_its_lease_makes_nothing_visible(node_parts):
    config, db, spool, _worker = node_parts
    study = pydicom.uid.generate_uid()
    _receive(db, spool, study, seed=3)
    assert enqueue_quiet_studies(db, 0, "1.2.3") == 1
    assert _LeaseStolenWorker(config, "cpu").process_next()
    with db.session() as s:
        assert s.execute(select(Result)).scalars().all() == []
        assert s.execute(select(Delivery)).scalars().all() == []
        job = s.execute(select(Job)).scalar_one()
        assert (job.state, job.lease_owner) == ("claimed", "other-worker")  # untouched
        assert s.get(Study, study).state == "queued"


def _seed_deliveries(db: Database, count: int) -> list[int]:
    now = db.now()
    with db.session() as s:
        result = add_done_result(s, "1.2.3", "x", now)
        rows = [
            Delivery(
                result_id=result.id,
                destination=f"pacs{i}",
                kind="sr",
                path=f"outbox/{result.job_id}/sr.dcm",
                state="pending",
                next_attempt_at=now,
                updated_at=now,
            )
            for i in range(count)
        ]
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def test_delivery_attempts_send_back_off_die_and_retry(database_url, tmp_path):
    db = Database(database_url)
    db.create_schema()
    lease = timedelta(minutes=10)
    try:
        sent, later, dying = _seed_deliveries(db, 3)
        with db.session() as s:
            path = s.get(Delivery, dying).path
        (tmp_path / path).parent.mkdir(parents=True)
        (tmp_path / path).write_bytes(b"DICM")  # retry checks that the outbox file is there
        assert [d.id for d in claim_due_deliveries(db, "me", 10, lease)] == [sent, later, dying]
        outcomes = [
            Attempt(sent),
            Attempt(later, "status 0xA700"),
            Attempt(dying, "association failed"),
        ]
        assert record_attempts(db, "me", outcomes, 2, lambda n: timedelta(hours=n)) == 1
        # the failed two wait for their backoff
        assert claim_due_deliveries(db, "me", 10, lease) == []
        with db.session() as s:
            rows = {d.id: d for d in s.execute(select(Delivery)).scalars()}
        assert rows[sent].state == "sent" and rows[sent].last_error is None
        assert rows[later].state == "pending" and rows[later].last_error == "status 0xA700"
        assert rows[later].next_attempt_at - rows[later].updated_at == timedelta(hours=1)
        # A second failure reaches max_attempts (dying); a sent delivery is left alone.
        with db.session() as s:
            due_now = update(Delivery).where(Delivery.id == dying)
            s.execute(due_now.values(next_attempt_at=db.now()))
        assert [d.id for d in claim_due_deliveries(db, "me", 10, lease)] == [dying]
        again = [Attempt(dying, "association failed"), Attempt(sent, "late failure")]
        assert record_attempts(db, "me", again, 2, lambda n: timedelta(hours=n)) == 0
        with db.session() as s:
            rows = {d.id: d for d in s.execute(select(Delivery)).scalars()}
        assert rows[dying].state == "dead" and rows[dying].attempts == 2
        assert rows[sent].state == "sent" and rows[sent].attempts == 1
        assert retry_deliveries(db, tmp_path, all_dead=True).retried == 1
        assert retry_deliveries(db, tmp_path, sent).retried == 0  # sent is never sent again
        assert [d.id for d in claim_due_deliveries(db, "me", 10, lease)] == [dying]
        with db.session() as s:
            assert s.get(Delivery, dying).attempts == 0
        with pytest.raises(ValueError):
            retry_deliveries(db, tmp_path)
    finally:
        db.dispose()
