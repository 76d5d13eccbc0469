"""The cleaner's sweep of outbox folders no delivery names: the outputs of an attempt killed
between writing them and committing its result. A committed attempt's folder, and one young
enough to belong to an attempt still running, are kept."""

from __future__ import annotations

import os
import time
from pathlib import Path

from scxnn_node.cleaner import Cleaner
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, DeliveryState, Job, JobState, Result
from scxnn_node.store.spool import Spool
from scxnn_node.testing.loopback import node_config

LEASE_SECONDS = 60.0


def _setup(tmp_path: Path) -> tuple[Database, Spool, Cleaner]:
    config = node_config(tmp_path, worker={"lease_seconds": LEASE_SECONDS})
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    return db, spool, Cleaner(config, db, spool)


def _outputs(spool: Spool, job_id: int, attempt: str, age_seconds: float) -> Path:
    """Write an attempt's SR and summary, then age the folder and its files."""
    for kind in ("sr", "summary"):
        spool.write_durably(spool.outbox_path(job_id, attempt, kind), b"dicom")
    folder = spool.absolute(spool.outbox_path(job_id, attempt, "sr")).parent
    then = time.time() - age_seconds
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (then, then))
    return folder


def _commit_delivery(db: Database, job_id: int, path: str) -> None:
    """The rows a committed attempt leaves: its job done, its result, a delivery of `path`."""
    now = db.now()
    with db.session() as session:
        session.add(
            Job(
                id=job_id,
                study_instance_uid="1.2",
                instance_set="set",
                instance_uids='["1.2.1"]',
                bundle_version="0.1.0",
                state=JobState.DONE,
                created_at=now,
                updated_at=now,
            )
        )
        session.flush()
        result = Result(
            job_id=job_id,
            study_instance_uid="1.2",
            verdict="normal",
            result_json="{}",
            sr_sop_instance_uid="1.2.9",
            summary_sop_instance_uid="1.2.8",
            created_at=now,
        )
        session.add(result)
        session.flush()
        session.add(
            Delivery(
                result_id=result.id,
                destination="pacs",
                kind="sr",
                path=path,
                state=DeliveryState.SENT,
                next_attempt_at=now,
                updated_at=now,
            )
        )


def test_old_unnamed_outbox_folders_go_named_and_young_ones_stay(tmp_path):
    db, spool, cleaner = _setup(tmp_path)
    old = 3 * LEASE_SECONDS  # past twice the lease: no attempt still runs that wrote it
    committed = _outputs(spool, 1, "committed", old)
    _commit_delivery(db, 1, spool.outbox_path(1, "committed", "sr"))
    killed = _outputs(spool, 1, "killed", old)  # the same job's attempt that lost its lease
    running = _outputs(spool, 2, "running", LEASE_SECONDS)  # within twice the lease

    assert cleaner.sweep_orphan_outputs() == 1
    assert not killed.exists()
    # The summary no delivery names stays with the SR that one does: the folder is named.
    assert sorted(p.name for p in committed.iterdir()) == ["sr.dcm", "summary.dcm"]
    assert sorted(p.name for p in running.iterdir()) == ["sr.dcm", "summary.dcm"]
    assert cleaner.sweep_orphan_outputs() == 0


def test_a_folder_whose_outputs_retention_purged_goes_with_its_leftovers(tmp_path):
    db, spool, cleaner = _setup(tmp_path)
    folder = _outputs(spool, 1, "purged", 3 * LEASE_SECONDS)
    # Retention purged the SR its delivery named (the path is emptied); the summary no
    # destination takes was left behind and is now named by nothing.
    spool.remove(spool.outbox_path(1, "purged", "sr"))
    then = time.time() - 3 * LEASE_SECONDS  # the purge, too, was a while ago
    os.utime(folder, (then, then))
    _commit_delivery(db, 1, "")
    assert cleaner.sweep_orphan_outputs() == 1
    assert not folder.exists()


def test_a_host_clock_ahead_of_the_shared_spool_deletes_no_live_attempts_files(
    tmp_path, monkeypatch
):
    """Two nodes share the spool (a network file system); this one's clock runs an hour
    ahead. The file system dates files by its own clock, so reading their age on this host's
    clock would make another node's attempt, still running, look abandoned."""
    _, spool, cleaner = _setup(tmp_path)
    running = _outputs(spool, 2, "running", 0)  # being written by the other node right now
    writing = spool.absolute("tmp") / "another-node-writing.part"
    writing.write_bytes(b"half an instance")
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 3600)

    assert cleaner.sweep_orphan_outputs() == 0
    assert cleaner.sweep_temp_files() == 0
    assert sorted(p.name for p in running.iterdir()) == ["sr.dcm", "summary.dcm"]
    assert writing.exists()
