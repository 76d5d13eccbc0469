"""The SCP against real peers: dcmtk storescu/echoscu and a pynetdicom SCU, on loopback."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
import warnings
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
from scxnn_node.testing.datasets import chest_dataset, write_part10
from scxnn_node.testing.dcmtk import dcmtk_tool
from scxnn_node.testing.dcmtk import storescu as run_storescu
from scxnn_node.testing.loopback import node_config
from scxnn_node.testing.peers import Sent, store_files


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
        [
            dcmtk_tool("echoscu"),
            *("-aet", "PACS", "-aec", "SCXNN", "127.0.0.1", str(config.node.port)),
        ],
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


def test_a_full_disk_refuses_the_c_store_and_the_node_keeps_serving(
    small_filesystem, tmp_path, caplog
):
    """The spool's and the database's disk fills for real (tmpfs, the kernel's ENOSPC): the
    C-STORE is refused, nothing half-kept, and once there is room the retry is stored once."""
    fs = small_filesystem.mount(8 << 20)
    config = node_config(
        tmp_path,
        storage={"spool_dir": str(fs / "spool"), "min_free_bytes": 0},  # the kernel says full
        database={"url": f"sqlite:///{fs / 'node.db'}"},
    )
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    scp = StoreScp(config, IngestService(config, db, spool))
    scp.start()
    sample = DATA / "nih_dx_no_finding.dcm"
    try:
        filler = small_filesystem.fill(fs)
        refused = storescu(config, sample)
        assert refused.returncode != 0  # not acknowledged: the sender keeps it and retries
        assert "(OSError: No space left on device); answered 0xA700" in caplog.text
        assert _instances(db) == []
        assert not [p for p in spool.root.rglob("*") if p.is_file()], "a torn file was kept"
        run_echo = [dcmtk_tool("echoscu"), *("-aet", "PACS", "-aec", "SCXNN")]
        run_echo += ["127.0.0.1", str(config.node.port)]
        assert subprocess.run(run_echo, capture_output=True, timeout=30).returncode == 0

        filler.unlink()  # room again: the sender's retry is stored, once, whole
        assert storescu(config, sample).returncode == 0
        (row,) = _instances(db)
        original = pydicom.dcmread(sample)
        assert row.sop_instance_uid == original.SOPInstanceUID
        assert pydicom.dcmread(spool.absolute(row.path)).PixelData == original.PixelData
        with db.session() as s:  # and the database the full disk refused is whole
            assert s.connection().exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
    finally:
        scp.shutdown()
        db.dispose()


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


def test_the_dcmtk_tools_are_found_behind_pynetdicoms_namesakes(tmp_path, monkeypatch):
    """pynetdicom installs Python scripts named storescp and storescu into the venv; with the
    venv activated they come first on PATH, and the tests must still run dcmtk's."""
    for name in ("storescp", "storescu", "echoscu"):
        script = tmp_path / name
        script.write_text("#!/usr/bin/env python3\nraise SystemExit(3)\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    dcmtk_tool.cache_clear()
    try:
        for name in ("storescp", "storescu", "echoscu"):
            assert shutil.which(name) == str(tmp_path / name)  # the namesake comes first
            found = dcmtk_tool(name)
            version = subprocess.run([found, "--version"], capture_output=True, text=True)
            assert "dcmtk" in version.stdout.lower(), (found, version.stdout)
    finally:
        dcmtk_tool.cache_clear()  # later tests resolve on the real PATH


# --- integrity under hostile input (issue 9) ----------------------------------------------


def _store(config, tmp_path, datasets, aet: str = "PACS") -> list[Sent]:
    """C-STORE datasets as they are (odd or over-long UIDs included) over one association."""
    files = [
        write_part10(ds, tmp_path / "sent" / f"{uuid.uuid4().hex}.dcm") for ds in datasets
    ]
    return store_files(config.node.port, files, aet=aet, aec=config.node.ae_title)


def test_a_file_holding_another_instance_is_not_taken_for_this_one(node, tmp_path):
    config, db, spool = node
    ds = chest_dataset(seed=1)
    rel = spool.instance_path(ds.StudyInstanceUID, ds.SOPInstanceUID)
    # Whatever lies at the instance's name (a stale file, a name shared with another UID)
    # is reused only if it holds this very instance.
    other = chest_dataset(study_uid=ds.StudyInstanceUID, seed=2)
    spool.write_durably(rel, write_part10(other, tmp_path / "other.dcm").read_bytes())
    (sent,) = _store(config, tmp_path, [ds])
    assert sent.status == 0x0000
    (row,) = _instances(db)
    held = pydicom.dcmread(spool.absolute(row.path))
    assert held.SOPInstanceUID == ds.SOPInstanceUID
    assert held.PixelData == ds.PixelData


OVER_LONG = "1.2." + "3" * 76  # 80 characters: too long for any UID column (PostgreSQL refuses)


@pytest.mark.parametrize(
    "uids",
    [
        {"sop_uid": ("1.2." + "1234567890" * 30)[:300]},  # ENAMETOOLONG on the old spool
        {"sop_uid": OVER_LONG},
        {"study_uid": OVER_LONG},
        {"series_uid": OVER_LONG},
        {"sop_uid": "1.2.3.4.5a"},
        {"sop_uid": "1.2.3.4.5."},
        {"study_uid": "1.2..3"},
        {"SOPClassUID": "1.2.840.10008.5.1.4.1.1.1.1." + "1" * 40},  # the command's is fine
    ],
    ids=["sop300", "sop80", "study80", "series80", "letter", "trailing-dot", "empty-part", "class"],
)
def test_invalid_uids_answer_cannot_understand_at_once(node, tmp_path, uids):
    """Input that fails the same way every time is refused (0xC000), never 0xA700 (the sender
    would retry forever); it is kept in rejected/ and leaves no temp file behind."""
    config, db, spool = node
    (sent,) = _store(config, tmp_path, [chest_dataset(**uids)])
    assert sent.status == 0xC000
    assert _instances(db) == []
    assert len(list((spool.root / "rejected").iterdir())) == 1
    assert list((spool.root / "tmp").iterdir()) == []
    (good,) = _store(config, tmp_path, [chest_dataset()])
    assert good.status == 0x0000  # still serving


def test_uids_with_leading_zero_components_are_accepted(node, tmp_path):
    """Decided leniency: a leading zero in a component breaks PS3.5 9.1 but is seen in the
    field and is harmless to storage; every other rule is enforced."""
    config, db, _ = node
    (sent,) = _store(config, tmp_path, [chest_dataset(sop_uid="1.2.03.4", study_uid="1.2.05")])
    assert sent.status == 0x0000
    assert [r.sop_instance_uid for r in _instances(db)] == ["1.2.03.4"]


def _with_dataset_uid(ds, sop_uid: str, path: Path) -> Path:
    """A Part 10 file whose dataset carries `sop_uid` while its meta (and so the C-STORE
    command) carries a conformant stand-in: only the node's own reading meets the odd UID."""
    write_part10(ds, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = pydicom.dcmread(path)
        saved.SOPInstanceUID = sop_uid
        saved.save_as(path)
    return path


def test_nothing_logged_at_info_or_above_names_a_uid(sqlite_node, tmp_path, caplog):
    """What this process logs while it receives (the sender runs in another process) names
    no UID at INFO or above. The command carries conformant stand-ins: pynetdicom logs the
    command's UIDs through the pydicom and pynetdicom loggers, which the log filter (logs.py)
    answers for."""
    config, _, _ = sqlite_node
    sop_long = ("1.2." + "1234567890" * 30)[:300]
    study, odd, zero = "1.2.3.44444.5555", "1.2.3.77777.8888a", "1.2.3.66666.0999.1"
    files = [
        _with_dataset_uid(chest_dataset(study_uid=study), uid, tmp_path / f"{i}.dcm")
        for i, uid in enumerate([sop_long, odd, zero, zero])  # the last one is a duplicate
    ]
    caplog.clear()
    caplog.set_level(logging.INFO)
    sender = (
        "import sys; from pathlib import Path; "
        "from scxnn_node.testing.peers import store_files; "
        "print([s.status for s in store_files(int(sys.argv[1]), [Path(a) for a in sys.argv[2:]])])"
    )
    run = subprocess.run(
        [sys.executable, "-c", sender, str(config.node.port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout.strip() == str([0xC000, 0xC000, 0x0000, 0x0000]), run.stderr
    logged = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.INFO and not r.name.startswith("pynetdicom")
    ]
    assert any("stored" in m for m in logged)  # the SCP does log what it did, UIDs hashed
    for uid in (sop_long, study, odd, zero):
        assert not [m for m in logged if uid[:16] in m], uid


def test_wrong_called_ae_title_is_refused(node):
    config, db, _ = node
    run = run_storescu(config.node.port, DATA / "siim_cr_negative.dcm", aet="PACS", aec="OTHER")
    assert run.returncode != 0
    assert "called ae title not recognized" in (run.stdout + run.stderr).lower()
    assert _instances(db) == []


def test_called_ae_title_check_can_be_turned_off(tmp_path):
    config = node_config(tmp_path, node={"check_called_ae": False})
    db = Database(config.database.url)
    db.create_schema()
    scp = StoreScp(config, IngestService(config, db, Spool(config.storage.spool_dir)))
    scp.start()
    try:
        run = run_storescu(config.node.port, DATA / "siim_cr_negative.dcm", aec="ANYNAME")
        assert run.returncode == 0, run.stderr
        assert len(_instances(db)) == 1
    finally:
        scp.shutdown()
        db.dispose()


def test_instance_above_the_size_limit_answers_cannot_understand(tmp_path):
    config = node_config(tmp_path, storage={"max_instance_bytes": 1 << 20})
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    scp = StoreScp(config, IngestService(config, db, spool))
    scp.start()
    try:
        big, small = chest_dataset(size=1024), chest_dataset(size=96)  # 2 MiB and 18 KiB
        assert [s.status for s in _store(config, tmp_path, [big, small])] == [0xC000, 0x0000]
        assert [r.sop_instance_uid for r in _instances(db)] == [small.SOPInstanceUID]
        assert list((spool.root / "tmp").iterdir()) == []
    finally:
        scp.shutdown()
        db.dispose()
