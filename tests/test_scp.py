"""The SCP against real peers: dcmtk storescu/echoscu and a pynetdicom SCU, on loopback."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset, write
from pynetdicom import AE
from pynetdicom.sop_class import (
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import select

from scxnn_node.dicom.scp import IngestService, StoreScp
from scxnn_node.store.db import Database
from scxnn_node.store.models import Instance, Study
from scxnn_node.store.spool import Spool
from scxnn_node.testing.dcmtk import storescu as run_storescu
from scxnn_node.testing.loopback import node_config


def _start(tmp_path, url):
    config = node_config(tmp_path, database={"url": url})
    db = Database(config.database.url, busy_timeout_s=1.0)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    scp = StoreScp(config, IngestService(config, db, spool))
    scp.start()
    return config, db, spool, scp


@pytest.fixture
def node(tmp_path, database_url):
    """The SCP on each database kind."""
    config, db, spool, scp = _start(tmp_path, database_url)
    yield config, db, spool
    scp.shutdown()
    db.dispose()


@pytest.fixture
def sqlite_node(tmp_path):
    config, db, spool, scp = _start(tmp_path, f"sqlite:///{tmp_path / 'node.db'}")
    yield config, db, spool
    scp.shutdown()
    db.dispose()


def storescu(config, *files: Path, aet: str = "PACS") -> subprocess.CompletedProcess:
    return run_storescu(config.node.port, *files, aet=aet, aec=config.node.ae_title)


def _instances(db):
    with db.session() as s:
        return s.execute(select(Instance)).scalars().all()


def test_echoscu(node):
    config, _, _ = node
    run = subprocess.run(
        ["echoscu", "-aet", "PACS", "-aec", "SCXNN", "127.0.0.1", str(config.node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, run.stderr


def test_storescu_real_files_are_stored_durably(node):
    config, db, spool = node
    files = [DATA / "nih_dx_no_finding.dcm", DATA / "siim_cr_negative.dcm"]
    run = storescu(config, *files)
    assert run.returncode == 0, run.stderr
    rows = {i.sop_instance_uid: i for i in _instances(db)}
    for f in files:
        original = pydicom.dcmread(f)
        row = rows[original.SOPInstanceUID]
        assert row.state == "stored" and row.calling_ae == "PACS"
        stored = pydicom.dcmread(spool.absolute(row.path))
        assert stored.PixelData == original.PixelData  # byte for byte, compressed or not
        assert stored.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    with db.session() as s:
        assert len(s.execute(select(Study)).scalars().all()) == 2
    assert not list((spool.root / "tmp").iterdir())  # no temp file left behind


def test_duplicate_instance_answers_success_and_adds_nothing(node):
    config, db, _ = node
    f = DATA / "siim_cr_negative.dcm"
    assert storescu(config, f).returncode == 0
    assert storescu(config, f).returncode == 0
    assert len(_instances(db)) == 1


def test_compressed_transfer_syntaxes_accepted(node, tmp_path):
    config, db, _ = node
    from dicom_factory import dcmtk

    src = write(make_dataset(chest_pixels(128, bits=12)), tmp_path / "src.dcm")
    sent = []
    for name, tool, opts in [
        ("jls", "dcmcjpls", []),
        ("rle", "dcmcrle", []),
        ("jpll", "dcmcjpeg", ["+e1"]),
    ]:
        out = tmp_path / f"{name}.dcm"
        dcmtk(tool, *opts, src, out)
        ds = pydicom.dcmread(out)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out)
        sent.append(out)
    run = storescu(config, *sent)
    assert run.returncode == 0, run.stderr
    syntaxes = {pydicom.dcmread(p).file_meta.TransferSyntaxUID for p in sent}
    assert len(syntaxes) == 3 and len(_instances(db)) == 3


def test_unknown_calling_ae_is_refused(node):
    config, db, _ = node
    run = storescu(config, DATA / "siim_cr_negative.dcm", aet="STRANGER")
    assert run.returncode != 0
    assert "reject" in (run.stdout + run.stderr).lower()
    assert _instances(db) == []


def test_filtered_images_answer_success_and_are_recorded_skipped(node, tmp_path):
    config, db, _ = node
    knee = write(make_dataset(chest_pixels(128, bits=12), body_part="KNEE"), tmp_path / "knee.dcm")
    lateral = write(make_dataset(chest_pixels(128, bits=12), view="LL"), tmp_path / "lat.dcm")
    assert storescu(config, knee, lateral).returncode == 0
    rows = _instances(db)
    assert [r.state for r in rows] == ["skipped", "skipped"]
    assert any("KNEE" in r.skip_reason for r in rows)
    assert any("lateral" in r.skip_reason for r in rows)
    with db.session() as s:
        assert s.execute(select(Study)).scalars().all() == []  # nothing to analyse


def _send(config, dataset_or_path, sop_class=DigitalXRayImageStorageForPresentation) -> int:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate("127.0.0.1", config.node.port, ae_title="SCXNN")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset_or_path)
        return int(status.Status)
    finally:
        assoc.release()


def test_low_disk_answers_out_of_resources(tmp_path):
    config = node_config(tmp_path, storage={"min_free_bytes": 1 << 62})
    db = Database(config.database.url)
    db.create_schema()
    scp = StoreScp(config, IngestService(config, db, Spool(config.storage.spool_dir)))
    scp.start()
    try:
        assert _send(config, make_dataset(chest_pixels(64, bits=12))) == 0xA700
        assert _instances(db) == []
    finally:
        scp.shutdown()


def test_database_unavailable_answers_out_of_resources(sqlite_node):
    config, _, _ = sqlite_node
    path = config.database.url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        status = _send(config, make_dataset(chest_pixels(64, bits=12)))
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert status == 0xA700
    # The node keeps serving once the database is back.
    assert _send(config, make_dataset(chest_pixels(64, bits=12))) == 0x0000


def test_data_without_study_uid_answers_cannot_understand_and_is_kept(node, tmp_path):
    config, db, spool = node
    ds = make_dataset(chest_pixels(64, bits=12))
    del ds.StudyInstanceUID
    assert _send(config, ds) == 0xC000
    assert len(list((spool.root / "rejected").iterdir())) == 1  # kept for inspection
    assert _instances(db) == []
    assert _send(config, make_dataset(chest_pixels(64, bits=12))) == 0x0000  # still serving


def test_truncated_dataset_answers_cannot_understand(node, tmp_path):
    config, db, _ = node
    good = write(make_dataset(chest_pixels(64, bits=12)), tmp_path / "good.dcm")
    raw = good.read_bytes()
    # Cut inside the patient module: the SOP UIDs still parse, the rest does not.
    cut = raw.index(b"\x10\x00\x20\x00")  # (0010,0020) Patient ID
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(raw[:cut] + b"\x10\x00\x20\x00LO\xff\x7f" + b"x" * 8)
    status = _send(config, bad)
    assert status == 0xC000
    assert _instances(db) == []


def test_secondary_capture_chest_accepted(node):
    config, db, _ = node
    status = _send(config, DATA / "nih_dx_no_finding.dcm", SecondaryCaptureImageStorage)
    assert status == 0x0000 and _instances(db)[0].state == "stored"


def test_max_associations_enforced(tmp_path):
    config = node_config(tmp_path, node={"max_associations": 1})
    db = Database(config.database.url)
    db.create_schema()
    scp = StoreScp(config, IngestService(config, db, Spool(config.storage.spool_dir)))
    scp.start()
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context("1.2.840.10008.1.1")
        first = ae.associate("127.0.0.1", config.node.port, ae_title="SCXNN")
        second = ae.associate("127.0.0.1", config.node.port, ae_title="SCXNN")
        assert first.is_established and second.is_rejected
        first.release()
    finally:
        scp.shutdown()


def test_dcmtk_tools_present():
    assert shutil.which("storescu") and shutil.which("echoscu")
