"""The audit trail: a real flow on loopback leaves a record of each thing that happened (received
from whom, skipped and why, analysed with which bundle, verdict, delivered where and when);
refusals are recorded; records are never changed; `audit export` writes them as JSON lines
and no patient identifier appears in them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from scxnn_node.cleaner import Cleaner
from scxnn_node.cli import main
from scxnn_node.dicom.scp import IngestService, StoreScp
from scxnn_node.logs import short_hash
from scxnn_node.node import Node
from scxnn_node.store.assembly import (
    InstanceRecord,
    enqueue_quiet_studies,
    mark_instances_unusable,
    record_instance,
)
from scxnn_node.store.audit import audit_records
from scxnn_node.store.db import Database
from scxnn_node.store.models import AuditRecord, Delivery, Instance, Job, Result
from scxnn_node.store.queue import JobQueue
from scxnn_node.store.results import Attempt, claim_due_deliveries, record_attempts
from scxnn_node.store.spool import Spool
from scxnn_node.testing.datasets import chest_dataset, write_part10
from scxnn_node.testing.dcmtk import Storescp, storescu
from scxnn_node.testing.loopback import node_config, wait_for
from scxnn_node.testing.peers import store_files

PACKAGE = Path(__file__).resolve().parents[1] / "scxnn_node"
# Patient data the test datasets carry: none of it may reach an audit record.
PATIENT = {"PatientName": "Quasimodo^Zebediah", "PatientID": "PID-771903"}
PATIENT_TEXT = ("Quasimodo", "Zebediah", "PID-771903", "ACC-55501")


def _dataset(tmp_path: Path, name: str, study_uid: str | None = None, **values) -> Path:
    ds = chest_dataset(study_uid=study_uid, AccessionNumber="ACC-55501", **PATIENT, **values)
    return write_part10(ds, tmp_path / name)


def _identifiers(path: Path) -> set[str]:
    """Every UID and patient value of a sent file, as its raw text."""
    ds = pydicom.dcmread(path, force=True)
    found = {
        str(ds.get(k, ""))
        for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        if ds.get(k, "")
    }
    return found | {str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber)}


def _records(db: Database) -> list[dict]:
    return list(audit_records(db, datetime(2000, 1, 1)))


def _of(records: list[dict], action: str) -> list[dict]:
    return [r for r in records if r["action"] == action]


def _assert_no_patient_data(text: str, identifiers: set[str]) -> None:
    for value in identifiers | set(PATIENT_TEXT):
        assert value not in text, value


def _spooled_size(db: Database, config, sop_instance_uid: str) -> int:
    """The size of the file the node stored for an instance (as received over the wire)."""
    with db.session() as s:
        path = s.get(Instance, sop_instance_uid).path
    return (config.storage.spool_dir / path).stat().st_size


def _flow_config(tmp_path: Path, bundle: Path, pacs_port: int):
    return node_config(
        tmp_path,
        model={"bundle": str(bundle)},
        destinations=[
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": pacs_port,
                "outputs": ["sr", "summary"],
            }
        ],
        # Retention at a tenth of a second: the cleaner below may purge the finished studies.
        storage={"retention_days": 1e-6, "amendment_window_days": 1e-6},
        delivery={"backoff_seconds": 0.5, "max_backoff_seconds": 1.0, "max_attempts": 50},
        scheduler={"readiness_seconds": 0.2, "delivery_seconds": 0.3},
        worker={"poll_seconds": 0.2, "lease_seconds": 5, "heartbeat_seconds": 1},
    )


def test_a_real_flow_is_recorded_append_only_and_exported_without_patient_data(
    tmp_path, small_bundle_dir
):
    pacs = Storescp(tmp_path / "pacs").start()
    config = _flow_config(tmp_path, small_bundle_dir, pacs.port)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(config.model_dump_json())  # JSON is valid YAML
    node = Node(config)
    node.start()
    try:
        chests = [_dataset(tmp_path, f"chest{i}.dcm", seed=i) for i in range(2)]
        knee = _dataset(tmp_path, "knee.dcm", BodyPartExamined="KNEE")
        lateral = _dataset(tmp_path, "lateral.dcm", ViewPosition="LL")
        assert storescu(config.node.port, *chests, knee, lateral).returncode == 0
        assert storescu(config.node.port, chests[0]).returncode == 0  # a re-send
        wait_for(lambda: len(_of(_records(node.db), "delivered")) >= 4, 180)
    finally:
        node.stop()
        pacs.stop()
    db = Database(config.database.url)
    records = _records(db)
    sent = {p: _identifiers(p) for p in (*chests, knee, lateral)}
    identifiers = set().union(*sent.values())
    chest_studies = {short_hash(str(pydicom.dcmread(p).StudyInstanceUID)) for p in chests}

    received = _of(records, "received")
    assert sorted(r["outcome"] for r in received) == ["duplicate", "stored", "stored"]
    for record, path in zip(received, [*chests, chests[0]], strict=True):
        ds = pydicom.dcmread(path)
        assert record["party"] == "PACS"  # received from whom
        assert record["instance"] == short_hash(str(ds.SOPInstanceUID))
        assert record["study"] == short_hash(str(ds.StudyInstanceUID))
        assert record["size_bytes"] == _spooled_size(db, config, str(ds.SOPInstanceUID))
    skipped = {r["outcome"]: r for r in _of(records, "skipped")}
    assert set(skipped) == {"body_part_not_allowed", "lateral_view"}  # skipped, and why
    assert "KNEE" in skipped["body_part_not_allowed"]["detail"]
    lateral_uid = str(pydicom.dcmread(lateral).SOPInstanceUID)
    assert skipped["lateral_view"]["size_bytes"] == _spooled_size(db, config, lateral_uid)

    with db.session() as s:
        results = {short_hash(r.study_instance_uid): r for r in s.scalars(select(Result))}
        jobs = list(s.scalars(select(Job)))
    analysed = _of(records, "analysed")
    assert {r["study"] for r in analysed} == chest_studies == set(results)
    for record in analysed:
        result = results[record["study"]]
        assert record["bundle_version"] == "1.2.3"  # the small bundle's version
        assert record["outcome"] == result.verdict  # the verdict
        assert record["risk_tier"] == (result.risk_tier or "")
        assert record["party"].endswith(":cpu")  # the worker: host:pid:device
        assert record["seconds"] is not None and record["seconds"] > 0
    assert all(j.state == "done" for j in jobs)

    delivered = _of(records, "delivered")
    assert sorted((r["party"], r["outcome"]) for r in delivered) == [
        ("pacs", "sr"),
        ("pacs", "sr"),
        ("pacs", "summary"),
        ("pacs", "summary"),
    ]
    for record in delivered:
        assert record["study"] in chest_studies
        # From the study's last instance to the send: at least the quiet time it waited.
        assert record["seconds"] >= config.study.quiet_seconds
        analysed_at = next(r["at"] for r in analysed if r["study"] == record["study"])
        assert datetime.fromisoformat(record["at"]) >= datetime.fromisoformat(analysed_at)
    assert [r["id"] for r in records] == sorted(r["id"] for r in records)

    # Append-only: the cleaner's housekeeping and retention change no record (and add
    # `purged` ones for the files they remove).
    time.sleep(0.2)  # past the tenth of a second of retention
    cleaner = Cleaner(config, db, Spool(config.storage.spool_dir))
    assert cleaner.purge_spool() == 4
    cleaner.housekeeping()
    after = _records(db)
    assert after[: len(records)] == records
    purged = _of(after[len(records) :], "purged")
    assert len(purged) == 4 and {r["outcome"] for r in purged} == {"retention"}

    # The export: JSON lines, oldest first, every record, no patient data.
    out = tmp_path / "audit.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", "audit", "export", "--config", str(config_file),
         "--since", "2000-01-01", "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    text = out.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines == after
    _assert_no_patient_data(text, identifiers)
    _assert_no_patient_data(run.stdout + run.stderr, identifiers)


def _scp(tmp_path: Path, **sections):
    config = node_config(tmp_path, **sections)
    db = Database(config.database.url)
    db.create_schema()
    scp = StoreScp(config, IngestService(config, db, Spool(config.storage.spool_dir)))
    scp.start()
    return config, db, scp


def test_refused_stores_and_associations_are_recorded(tmp_path):
    config, db, scp = _scp(tmp_path, storage={"max_instance_bytes": 100_000})
    try:
        odd = chest_dataset(study_uid="1.2.840.99999.abc", **PATIENT)
        bad_uid = write_part10(odd, tmp_path / "bad_uid.dcm")
        large = write_part10(chest_dataset(size=300, **PATIENT), tmp_path / "large.dcm")
        assert large.stat().st_size > 100_000 > bad_uid.stat().st_size
        statuses = [s.status for s in store_files(config.node.port, [bad_uid, large])]
        assert statuses == [0xC000, 0xC000]
        intruder = store_files(config.node.port, [large], aet="INTRUDER")
        misdialled = store_files(config.node.port, [large], aec="ELSEWHERE")
        assert intruder[0].status is None and misdialled[0].status is None
    finally:
        scp.shutdown()
    records = _records(db)
    refused = _of(records, "refused")
    assert [(r["party"], r["outcome"]) for r in refused] == [("PACS", "0xC000")] * 2
    assert "Study Instance UID" in refused[0]["detail"]
    assert refused[1]["size_bytes"] > config.storage.max_instance_bytes  # as received
    assert "max_instance_bytes" in refused[1]["detail"]
    associations = _of(records, "association_refused")
    assert [(r["party"], r["outcome"]) for r in associations] == [
        ("INTRUDER", "calling_ae_not_allowed"),
        ("PACS", "called_ae_mismatch"),
    ]
    assert _of(records, "received") == []
    _assert_no_patient_data(json.dumps(records), _identifiers(bad_uid) | _identifiers(large))


def _receive(db: Database, study: str, sop: str) -> None:
    assert record_instance(db, InstanceRecord(sop, study, "1.2.9", "1.2.3", "x", 10, "PACS"))


def test_unusable_instances_failed_jobs_and_deliveries_are_recorded(database_url):
    db = Database(database_url)
    db.create_schema()
    study = "1.2.826.0.1.3680043.2.1125.77"
    _receive(db, study, study + ".1")
    with db.session() as s:
        mark_instances_unusable(s, {study + ".1": f"not_dicom: {study}.1 is not a DICOM file"})
    _receive(db, study, study + ".2")
    assert enqueue_quiet_studies(db, 0, "9.9") == 1
    queue = JobQueue(db, "worker-x", max_attempts=1)
    job = queue.claim_ready_job()
    assert job is not None
    assert queue.fail(job.id, f"RuntimeError: {study} went wrong") == "failed"

    now = db.now()
    with db.session() as s:
        result = Result(
            job_id=job.id,
            study_instance_uid=study,
            verdict="abnormal",
            risk_tier="urgent",
            abnormality_score=1.0,
            result_json="{}",
            sr_sop_instance_uid=f"{study}.7",
            summary_sop_instance_uid=f"{study}.8",
            created_at=now,
        )
        s.add(result)
        s.flush()
        for kind in ("sr", "summary"):
            s.add(
                Delivery(
                    result_id=result.id,
                    destination="pacs",
                    kind=kind,
                    path=f"outbox/1/{kind}.dcm",
                    state="pending",
                    attempts=0,
                    next_attempt_at=now,
                    updated_at=now,
                )
            )
    sr, summary = (d.id for d in claim_due_deliveries(db, "me", 10, timedelta(minutes=1)))
    failures = [Attempt(sr, f"status 0xA700 for {study}"), Attempt(summary, "gone", final=True)]
    assert record_attempts(db, "me", failures, 3, lambda n: timedelta(0)) == 0
    records = _records(db)

    unusable = _of(records, "unusable")
    assert [(r["instance"], r["outcome"]) for r in unusable] == [
        (short_hash(study + ".1"), "not_dicom")
    ]
    failed = _of(records, "not_analysed")
    assert [(r["party"], r["outcome"], r["bundle_version"]) for r in failed] == [
        ("worker-x", "job_failed", "9.9")
    ]
    assert [(r["party"], r["outcome"]) for r in _of(records, "delivery_failed")] == [
        ("pacs", "sr")
    ]
    assert "0xA700" in _of(records, "delivery_failed")[0]["detail"]
    assert [(r["outcome"], r["detail"]) for r in _of(records, "dead")] == [("summary", "gone")]
    assert study not in json.dumps(records)  # every identifier hashed, details included


def _seed_at(db: Database, *times: datetime) -> None:
    with db.session() as s:
        for at in times:
            s.add(AuditRecord(at=at, action="received", outcome="stored", party=at.isoformat()))


def test_export_filters_by_since_and_until(tmp_path, capsys):
    config = node_config(tmp_path)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(config.model_dump_json())
    db = Database(config.database.url)
    db.create_schema()
    _seed_at(db, datetime(2026, 11, 25, 23), datetime(2026, 11, 26, 12), datetime(2026, 11, 27, 1))

    def export(*args: str) -> list[str]:
        assert main(["audit", "export", "--config", str(config_file), *args]) == 0
        return [json.loads(line)["party"] for line in capsys.readouterr().out.splitlines()]

    assert export("--since", "2026-11-26") == ["2026-11-26T12:00:00", "2026-11-27T01:00:00"]
    assert export("--since", "2026-11-26", "--until", "2026-11-27") == ["2026-11-26T12:00:00"]
    # A datetime with a zone is taken in UTC: 13:00+01:00 is noon UTC, inclusive.
    assert export("--since", "2026-11-26T13:00:00+01:00") == [
        "2026-11-26T12:00:00",
        "2026-11-27T01:00:00",
    ]
    assert export("--since", "2026-11-28") == []
    out = tmp_path / "a.jsonl"
    export("--since", "2000-01-01", "--output", str(out))
    assert len(out.read_text().splitlines()) == 3
    with pytest.raises(SystemExit):
        main(["audit", "export", "--config", str(config_file), "--since", "yesterday"])


# An UPDATE or DELETE aimed at the audit table, in ORM or SQL form.
_CHANGES_AUDIT = re.compile(
    r"(update|delete)\(\s*AuditRecord|(UPDATE|DELETE\s+FROM)\s+audit_records", re.IGNORECASE
)


def test_no_code_path_updates_or_deletes_audit_records():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "migrations" not in path.parts and _CHANGES_AUDIT.search(path.read_text())
    ]
    assert offenders == []
