"""Periodic tasks: the cleaner (spool retention, the free-disk watermark, old events) and the
scheduler that times them."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from scxnn_node.cleaner import Cleaner
from scxnn_node.scheduler import NodeScheduler
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Event, Instance, Study, Worker
from scxnn_node.store.spool import Spool
from scxnn_node.store.workers import WorkerIdentity, beat
from scxnn_node.testing.loopback import node_config


def _setup(tmp_path, **sections):
    config = node_config(tmp_path, **sections)
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    return config, db, spool, Cleaner(config, db, spool)


def test_retention_purges_reported_studies_only(tmp_path):
    _config, db, spool, cleaner = _setup(tmp_path, storage={"retention_days": 1})
    for study, sop in (("1.1", "1.1.1"), ("2.2", "2.2.1")):
        rel = spool.instance_path(study, sop)
        spool.write_durably(rel, b"data")
        record_instance(db, InstanceRecord(sop, study, "9", "1.2.3", rel, 4, "PACS"))
    old = db.now() - timedelta(days=2)
    with db.session() as s:
        s.execute(update(Instance).values(received_at=old))
        s.execute(update(Study).values(last_received_at=old))  # past the amendment window too
        s.get(Study, "1.1").state = "reported"  # 2.2 still waits for its result
    assert cleaner.purge_spool() == 1
    with db.session() as s:
        rows = {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}
    assert rows["1.1.1"].path == "" and rows["2.2.1"].path != ""
    assert not spool.absolute(spool.instance_path("1.1", "1.1.1")).exists()
    assert spool.absolute(rows["2.2.1"].path).exists()
    assert enqueue_quiet_studies(db, 0, "0.1.0") == 1  # the waiting study is unaffected


def test_a_reported_study_keeps_its_files_for_the_amendment_window(tmp_path):
    config, db, spool, cleaner = _setup(
        tmp_path, storage={"retention_days": 1, "amendment_window_days": 3}
    )
    rel = spool.instance_path("1.1", "1.1.1")
    spool.write_durably(rel, b"data")
    record_instance(db, InstanceRecord("1.1.1", "1.1", "9", "1.2.3", rel, 4, "PACS"))
    two_days_ago = db.now() - timedelta(days=2)
    with db.session() as s:  # past the retention, reported, quiet for two days
        s.execute(update(Instance).values(received_at=two_days_ago))
        s.execute(update(Study).values(state="reported", last_received_at=two_days_ago))
    assert cleaner.purge_spool() == 0  # a late instance within three days would amend with it
    assert spool.absolute(rel).is_file()
    # The default window is the retention itself: two quiet days are past it.
    cleaner.config = config.model_copy(
        update={"storage": config.storage.model_copy(update={"amendment_window_days": None})}
    )
    assert cleaner.purge_spool() == 1
    assert not spool.absolute(rel).exists()
    with db.session() as s:
        assert s.get(Instance, "1.1.1").path == ""


def test_disk_watermark_logs_once_and_recovers(tmp_path):
    config, db, _spool, cleaner = _setup(tmp_path, storage={"min_free_bytes": 1 << 62})
    assert cleaner.check_disk() is False
    assert cleaner.check_disk() is False
    with db.session() as s:
        assert len(s.execute(select(Event).where(Event.kind == "disk")).scalars().all()) == 1
    cleaner.config = config.model_copy(
        update={"storage": config.storage.model_copy(update={"min_free_bytes": 0})}
    )
    assert cleaner.check_disk() is True


def test_housekeeping_and_scheduler_start_stop(tmp_path):
    config, db, spool, cleaner = _setup(tmp_path)
    db.record_event("x", "old")
    with db.session() as s:
        s.execute(update(Event).values(at=db.now() - timedelta(days=365)))
    cleaner.housekeeping()
    with db.session() as s:
        assert s.execute(select(Event)).scalars().all() == []
    scheduler = NodeScheduler(config, db, spool, "0.1.0")
    scheduler.start()
    scheduler.shutdown()


def test_lease_recovery_forgets_workers_silent_past_a_lease(tmp_path):
    config, db, spool, _cleaner = _setup(tmp_path, worker={"lease_seconds": 60})
    for owner in ("host:1:cpu", "host:2:cpu"):
        beat(db, WorkerIdentity(owner, "host", int(owner.split(":")[1]), "cpu", "0.1.0"), None, 5)
    with db.session() as s:  # the first was killed two leases ago; the second beats on
        s.get(Worker, "host:1:cpu").alive_until = db.now() - timedelta(seconds=120)
    NodeScheduler(config, db, spool, "0.1.0").recover_leases()
    with db.session() as s:
        assert [w.owner for w in s.execute(select(Worker)).scalars()] == ["host:2:cpu"]


def test_the_timetable_sweeps_orphan_outputs(tmp_path):
    config, db, spool, _cleaner = _setup(tmp_path)
    scheduler = NodeScheduler(config, db, spool, "0.1.0")
    scheduler.start()
    try:
        assert scheduler._scheduler is not None
        assert scheduler._scheduler.get_job("sweep_orphan_outputs") is not None
    finally:
        scheduler.shutdown()
