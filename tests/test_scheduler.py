"""Periodic tasks: spool retention and the free-disk watermark."""

from __future__ import annotations

from datetime import timedelta

from nodekit import node_config
from sqlalchemy import select, update

from scxnn_node.scheduler import NodeScheduler
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database, utc_now
from scxnn_node.store.models import Event, Instance, Study
from scxnn_node.store.spool import Spool


def _setup(tmp_path, **sections):
    config = node_config(tmp_path, **sections)
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    return config, db, spool, NodeScheduler(config, db, spool, "0.1.0")


def test_retention_purges_reported_studies_only(tmp_path):
    _config, db, spool, scheduler = _setup(tmp_path, storage={"retention_days": 1})
    for study, sop in (("1.1", "1.1.1"), ("2.2", "2.2.1")):
        rel = spool.instance_path(study, sop)
        spool.write_durably(rel, b"data")
        record_instance(db, InstanceRecord(sop, study, "9", "1.2.3", rel, 4, "PACS"))
    old = utc_now() - timedelta(days=2)
    with db.session() as s:
        s.execute(update(Instance).values(received_at=old))
        s.get(Study, "1.1").state = "reported"  # 2.2 still waits for its result
    assert scheduler.purge_spool() == 1
    with db.session() as s:
        rows = {i.sop_instance_uid: i for i in s.execute(select(Instance)).scalars()}
    assert rows["1.1.1"].path == "" and rows["2.2.1"].path != ""
    assert not spool.absolute(spool.instance_path("1.1", "1.1.1")).exists()
    assert spool.absolute(rows["2.2.1"].path).exists()
    assert enqueue_quiet_studies(db, 0, "0.1.0") == 1  # the waiting study is unaffected


def test_disk_watermark_logs_once_and_recovers(tmp_path):
    config, db, _spool, scheduler = _setup(tmp_path, storage={"min_free_bytes": 1 << 62})
    assert scheduler.check_disk() is False
    assert scheduler.check_disk() is False
    with db.session() as s:
        assert len(s.execute(select(Event).where(Event.kind == "disk")).scalars().all()) == 1
    scheduler.config = config.model_copy(
        update={"storage": config.storage.model_copy(update={"min_free_bytes": 0})}
    )
    assert scheduler.check_disk() is True


def test_housekeeping_and_scheduler_start_stop(tmp_path):
    _, db, _, scheduler = _setup(tmp_path)
    db.record_event("x", "old")
    with db.session() as s:
        s.execute(update(Event).values(at=utc_now() - timedelta(days=365)))
    scheduler.housekeeping()
    with db.session() as s:
        assert s.execute(select(Event)).scalars().all() == []
    scheduler.start()
    scheduler.shutdown()
