"""The spool on a real file system: collision-free names, no temp file left behind on failure,
new directories made durable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scxnn_node.store.spool import Spool


def test_instance_names_are_distinct_for_uids_that_differ_only_in_odd_characters(tmp_path):
    spool = Spool(tmp_path / "spool")
    study = "1.2.826.0.1.3680043.8.498.1"
    uids = ["1.2.3.4.5a", "1.2.3.4.5b", "1.2.3.4.5", "1.2.3.4.5 ", "1.2.3.4/5", "1.2.3.4.5..."]
    paths = {spool.instance_path(study, uid) for uid in uids}
    assert len(paths) == len(uids)


def test_instance_names_stay_short_whatever_the_uid(tmp_path):
    spool = Spool(tmp_path / "spool")
    rel = spool.instance_path("1." * 150 + "1", "1.2." + "3" * 296)
    assert all(len(part) < 100 for part in rel.split("/"))
    spool.write_durably(rel, b"data")  # a name the file system accepts
    assert spool.absolute(rel).read_bytes() == b"data"


def test_a_failed_write_leaves_no_temp_file(tmp_path):
    spool = Spool(tmp_path / "spool")
    too_long = "instances/x/" + "a" * 300 + ".dcm"  # ENAMETOOLONG at the rename
    with pytest.raises(OSError):
        spool.write_durably(too_long, [b"header", b"body"])
    assert list((spool.root / "tmp").iterdir()) == []


def test_new_directories_and_their_parents_are_fsynced(tmp_path, monkeypatch):
    spool = Spool(tmp_path / "spool")
    synced: list[Path] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    rel = spool.instance_path("1.2.3", "1.2.3.4")
    spool.write_durably(rel, b"data")
    study_dir = spool.absolute(rel).parent
    # The file (under its temp name), the new study directory's entry (in instances/), and
    # the file's entry in the study directory.
    assert any(p.parent == spool.root / "tmp" for p in synced)
    assert spool.root / "instances" in synced
    assert synced[-1] == study_dir


def test_the_spool_clock_falls_back_to_the_hosts_when_no_file_can_be_made(tmp_path, caplog):
    import time

    spool = Spool(tmp_path / "spool")
    probe_dir = spool.root / "tmp"
    os.rmdir(probe_dir)
    probe_dir.write_bytes(b"")  # no file can be made under it
    before = time.time()
    assert before <= spool.now() <= time.time()
    assert "spool clock not read" in caplog.text
