"""The node's operational commands, run as an administrator would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import DATA
from sqlalchemy import select

from scxnn_node.node import Node
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, Job, Result
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.loopback import node_config


def _cli(config_path: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", *args, "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def _write(config, path: Path) -> Path:
    path.write_text(config.model_dump_json())  # JSON is valid YAML
    return path


def _seed_failures(db: Database) -> None:
    now = db.now()
    with db.session() as s:
        job = Job(
            study_instance_uid="1.2.3",
            instance_set="x" * 64,
            instance_uids="[]",
            bundle_version="0.1.0",
            state="failed",
            attempts=3,
            last_error="boom",
            created_at=now,
            updated_at=now,
        )
        s.add(job)
        s.flush()
        result = Result(
            job_id=job.id,
            study_instance_uid="1.2.3",
            verdict="abnormal",
            risk_tier="urgent",
            abnormality_score=1.0,
            result_json="{}",
            sr_sop_instance_uid="1.2",
            summary_sop_instance_uid="1.3",
            created_at=now,
        )
        s.add(result)
        s.flush()
        s.add(
            Delivery(
                result_id=result.id,
                destination="pacs",
                kind="sr",
                path="outbox/1/sr.dcm",
                state="dead",
                attempts=8,
                next_attempt_at=now,
                last_error="refused",
                updated_at=now,
            )
        )


def test_status_jobs_and_deliveries(tmp_path):
    config = node_config(tmp_path)
    path = _write(config, tmp_path / "c.yaml")
    db = Database(config.database.url)
    db.create_schema()
    _seed_failures(db)
    outbox = config.storage.spool_dir / "outbox" / "1"  # retry checks the file is still there
    outbox.mkdir(parents=True)
    (outbox / "sr.dcm").write_bytes(b"DICM")
    status = _cli(path, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["jobs"] == {"failed": 1} and report["deliveries"] == {"dead": 1}
    assert {e["error"] for e in report["last_errors"]} >= {"boom", "refused"}
    text = _cli(path, "status")
    assert "jobs        failed 1" in text.stdout and "last errors:" in text.stdout
    assert "failed" in _cli(path, "jobs", "list").stdout
    assert _cli(path, "jobs", "retry").returncode == 2  # needs an ID or --all-failed
    assert "1 job(s)" in _cli(path, "jobs", "retry", "--all-failed").stdout
    assert "1 delivery" in _cli(path, "deliveries", "retry", "--all-dead").stdout
    with db.session() as s:
        assert s.execute(select(Job.state)).scalar() == "ready"
        delivery = s.execute(select(Delivery)).scalar_one()
        assert delivery.state == "pending" and delivery.attempts == 0


def test_echo_and_send(tmp_path, small_bundle_dir):
    pacs = Storescp(tmp_path / "pacs").start()
    config = node_config(
        tmp_path,
        allowed_callers=None,
        model={"bundle": str(small_bundle_dir)},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}],
    )
    path = _write(config, tmp_path / "c.yaml")
    try:
        ok = _cli(path, "echo", "pacs")
        assert ok.returncode == 0 and ": ok" in ok.stdout
        assert _cli(path, "echo", "nowhere").returncode == 2
    finally:
        pacs.stop()
    assert _cli(path, "echo", "pacs").returncode == 1  # down now
    node = Node(config, workers=False)
    node.start()
    try:
        sent = _cli(path, "send", str(DATA / "siim_cr_negative.dcm"))
        assert sent.returncode == 0 and "0x0000" in sent.stdout
    finally:
        node.stop()


def test_demo_command_runs_the_whole_flow(tmp_path, demo_bundle_dir):
    config = node_config(tmp_path, model={"bundle": str(demo_bundle_dir)})
    path = _write(config, tmp_path / "c.yaml")
    run = _cli(path, "demo", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("sr       sent -> ") == 2
    assert run.stdout.count("summary  sent -> ") == 2
    assert "NOT FOR CLINICAL USE" in run.stdout
    assert len(list((tmp_path / "var" / "demo" / "pacs").glob("SR_*.dcm"))) == 2
