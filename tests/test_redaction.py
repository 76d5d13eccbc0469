"""No patient identifier and no database password leaves the node in clear: not in logs at INFO
and above (whichever library logs), not in stored errors that `status` shows, not in the
output of `check-config` or a schema error."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from scxnn_node.logs import hash_uids, redact, redact_url, short_hash
from scxnn_node.store.db import Database, SchemaMismatch
from scxnn_node.store.models import Job
from scxnn_node.store.queue import JobQueue

UID = "1.2.826.0.1.3680043.10.543.7.20261120.1"
SCHEMA = Path(__file__).parent / "data" / "schema"


def test_hash_uids_hashes_identifiers_and_keeps_the_standards_own_uids():
    text = (
        f"study {UID} failed; SOP class 1.2.840.10008.5.1.4.1.1.1.1 from 127.0.0.1, "
        f"bundle 0.1.0, 2.25.329800735698586629295641978511506172918, file {UID}.dcm"
    )
    hashed = hash_uids(text)
    assert UID not in hashed and "329800735698586629295641978511506172918" not in hashed
    assert hashed.count(short_hash(UID)) == 2
    assert "1.2.840.10008.5.1.4.1.1.1.1" in hashed and "127.0.0.1" in hashed
    assert "bundle 0.1.0" in hashed
    # A validator's quoted value is an identifier even when it is no valid UID.
    assert "abc" not in hash_uids("Invalid 'Study Instance UID' value '1.2.abc' - bad")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://scxnn:s3cret@db:5432/n", "postgresql+psycopg://scxnn:***@db:5432/n"),
        ("postgresql://u:p@ss/w@db/n", "postgresql://u:***@db/n"),
        ("postgresql+psycopg://scxnn@db/n", "postgresql+psycopg://scxnn@db/n"),
        ("sqlite:///var/scxnn.db", "sqlite:///var/scxnn.db"),
    ],
)
def test_redact_url_hides_the_password_only(url, shown):
    assert redact_url(url) == shown


def test_library_warnings_and_errors_in_the_logs_carry_no_uid(tmp_path):
    """pydicom's and pynetdicom's validators quote the UIDs they check, and SQLAlchemy quotes a
    failed statement's parameters: the node's logging shows none of them at INFO."""
    script = textwrap.dedent(
        f"""
        import logging
        import pydicom
        from pydicom.dataset import Dataset
        from pynetdicom.utils import set_uid
        from scxnn_node.logs import configure_logging
        from scxnn_node.store.db import Database
        from scxnn_node.store.models import Event

        configure_logging("INFO")
        pydicom.config.settings.writing_validation_mode = pydicom.config.WARN
        Dataset().StudyInstanceUID = "{UID}.x"  # invalid: pydicom warns and logs it
        set_uid("{UID}.01", "Affected SOP Instance UID", True, False, True)  # non-conformant
        db = Database("sqlite:///{tmp_path / "n.db"}")
        db.create_schema()
        try:
            with db.session() as s:
                s.add(Event(id=1, at=None, level="INFO", kind="x", subject="{UID}", message="m"))
        except Exception:
            logging.getLogger("scxnn_node.worker").exception("job failed")
        logging.getLogger("scxnn_node").info("done")
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "Non-conformant" in run.stderr and "job failed" in run.stderr  # they were logged
    assert "done" in run.stderr
    assert UID not in run.stderr
    assert short_hash(f"{UID}.01") in run.stderr


def test_a_failed_statement_does_not_quote_its_parameters(database_url):
    db = Database(database_url)
    db.create_schema()
    try:
        with pytest.raises(IntegrityError) as failure, db.session() as s:
            s.add(Job(study_instance_uid=UID))  # not-null columns missing
        # (PostgreSQL's own detail still quotes the row: logs and stored errors hash it.)
        assert "[SQL parameters hidden due to hide_parameters=True]" in str(failure.value)
        assert UID not in redact(str(failure.value))
    finally:
        db.dispose()


def test_a_jobs_stored_error_shows_hashed_uids(database_url):
    db = Database(database_url)
    db.create_schema()
    try:
        queue = JobQueue(db, "w1", max_attempts=1)
        with db.session() as s:
            JobQueue.enqueue(s, UID, [f"{UID}.5"], "1.2.3")
        job = queue.claim_ready_job()
        assert job is not None
        queue.fail(job.id, f"IsADirectoryError: [Errno 21] Is a directory: '/spool/{UID}.5.dcm'")
        with db.session() as s:
            stored = s.get(Job, job.id).last_error
        assert UID not in stored and short_hash(f"{UID}.5") in stored
    finally:
        db.dispose()


def test_check_config_does_not_print_the_database_password(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("database: {url: 'postgresql+psycopg://scxnn:s3cret@db.example:5432/n'}\n")
    run = subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", "check-config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "s3cret" not in run.stdout + run.stderr
    assert "postgresql+psycopg://scxnn:***@db.example:5432/n" in run.stdout


def test_a_schema_error_does_not_print_the_database_password(postgres_database):
    """A database of the previous release, reached with a password (the test server trusts
    every local user, so any password connects)."""
    url = postgres_database.replace("postgresql+psycopg://postgres@", "postgresql+psycopg://postgres:s3cret@")
    _load_postgres(postgres_database, SCHEMA / "v1-postgresql.sql")
    db = Database(url)
    try:
        with pytest.raises(SchemaMismatch) as refused:
            db.create_schema()
        assert "s3cret" not in str(refused.value) and "***" in str(refused.value)
        assert "scxnn-node db upgrade" in str(refused.value)
    finally:
        db.dispose()


@pytest.fixture
def postgres_database():
    import os

    import psycopg

    admin = os.environ.get("SCXNN_TEST_POSTGRES_URL")
    if not admin:
        pytest.fail("SCXNN_TEST_POSTGRES_URL is not set (see tests/conftest.py)")
    name = f"scxnn_test_{uuid.uuid4().hex[:12]}"
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield admin.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _load_postgres(url: str, dump: Path) -> None:
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", plain, "-f", str(dump)],
        check=True,
        capture_output=True,
        timeout=120,
    )
