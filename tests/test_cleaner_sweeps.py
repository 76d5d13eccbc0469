"""The cleaner's sweeps of what no row points at: temp files a crash left behind, rejected
files (age and size cap), and the files of studies whose job failed."""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from scxnn_node.cleaner import Cleaner
from scxnn_node.scheduler import NodeScheduler
from scxnn_node.store.assembly import InstanceRecord, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Instance, Study, StudyState
from scxnn_node.store.spool import Spool
from scxnn_node.testing.loopback import node_config

HOUR = 3600.0
DAY = 24 * HOUR


def _setup(tmp_path, **sections):
    config = node_config(tmp_path, **sections)
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    return config, db, spool, Cleaner(config, db, spool)


def _file(path: Path, size: int, age_seconds: float) -> Path:
    path.write_bytes(b"x" * size)
    then = time.time() - age_seconds
    os.utime(path, (then, then))
    return path


def test_temp_files_older_than_an_hour_are_swept(tmp_path):
    _, _, spool, cleaner = _setup(tmp_path)
    stale = _file(spool.root / "tmp" / "crashed.part", 10, 2 * HOUR)
    fresh = _file(spool.root / "tmp" / "writing.part", 10, 60)
    assert cleaner.sweep_temp_files() == 1
    assert not stale.exists() and fresh.exists()


def test_rejected_files_go_after_their_retention_and_beyond_the_size_cap(tmp_path):
    _, _, spool, cleaner = _setup(
        tmp_path, storage={"rejected_retention_days": 10, "rejected_max_bytes": 2500}
    )
    rejected = spool.root / "rejected"
    expired = _file(rejected / "expired.dcm", 10, 11 * DAY)
    oldest = _file(rejected / "oldest.dcm", 1000, 3 * DAY)
    middle = _file(rejected / "middle.dcm", 1000, 2 * DAY)
    newest = _file(rejected / "newest.dcm", 1000, 1 * DAY)
    assert cleaner.sweep_rejected() == 2
    assert not expired.exists() and not oldest.exists()
    assert middle.exists() and newest.exists()  # 2000 bytes: within the cap


def test_files_of_a_failed_study_are_purged_after_retention(tmp_path):
    _, db, spool, cleaner = _setup(tmp_path, storage={"retention_days": 1})
    rel = spool.instance_path("1.1", "1.1.1")
    spool.write_durably(rel, b"data")
    record_instance(db, InstanceRecord("1.1.1", "1.1", "9", "1.2.3", rel, 4, "PACS"))
    old = db.now() - timedelta(days=2)
    with db.session() as s:
        s.execute(update(Instance).values(received_at=old))
        s.execute(update(Study).values(state=StudyState.FAILED, last_received_at=old))
    assert cleaner.purge_spool() == 1
    assert not spool.absolute(rel).exists()
    with db.session() as s:
        assert s.execute(select(Instance.path)).scalar_one() == ""


def test_the_scheduler_sweeps_at_start(tmp_path):
    config, db, spool, _ = _setup(tmp_path)
    stale = _file(spool.root / "tmp" / "crashed.part", 10, 2 * HOUR)
    scheduler = NodeScheduler(config, db, spool, "0.1.0")
    scheduler.start()
    try:
        assert not stale.exists()
    finally:
        scheduler.shutdown()


def test_a_full_disk_is_swept_too(tmp_path, small_filesystem):
    """The disk under the spool fills (the kernel's ENOSPC): the sweeps, which are what frees
    it, still measure ages and delete what a crash and the rejections left."""
    fs = small_filesystem.mount(4 << 20)
    _, _, spool, cleaner = _setup(
        tmp_path, storage={"spool_dir": str(fs / "spool"), "rejected_retention_days": 10}
    )
    stale = _file(spool.root / "tmp" / "crashed.part", 10, 2 * HOUR)
    expired = _file(spool.root / "rejected" / "expired.dcm", 10, 11 * DAY)
    small_filesystem.fill(fs)
    assert cleaner.sweep_temp_files() == 1
    assert cleaner.sweep_rejected() == 1
    assert cleaner.sweep_orphan_outputs() == 0
    assert not stale.exists() and not expired.exists()
