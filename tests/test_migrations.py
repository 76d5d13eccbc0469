"""Schema upgrades: a database made by release 0.1.0 (tests/data/schema) is upgraded in place by
`scxnn-node db upgrade`, keeps its rows, and ends with exactly the schema a new database gets
from the current models; the node refuses an old schema until then."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, select

from scxnn_node.store.db import Database, SchemaMismatch
from scxnn_node.store.migrate import current_revision, head_revision
from scxnn_node.store.models import Delivery, Event, Instance, Job, Result, Study
from scxnn_node.testing.loopback import node_config

SCHEMA = Path(__file__).parent / "data" / "schema"


def _load_v1(url: str) -> None:
    """The committed dump of a 0.1.0 database, loaded as an administrator would restore it."""
    if url.startswith("sqlite:///"):
        connection = sqlite3.connect(url[len("sqlite:///") :])
        connection.executescript((SCHEMA / "v1-sqlite.sql").read_text())
        connection.close()
        return
    plain = url.replace("postgresql+psycopg://", "postgresql://")
    subprocess.run(
        ["psql", "-q", "-v", "ON_ERROR_STOP=1", "-d", plain, "-f", SCHEMA / "v1-postgresql.sql"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _cli(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "c.yaml"
    config.write_text(node_config(tmp_path, database={"url": url}).model_dump_json())
    return subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _schema(url: str) -> dict[str, Any]:
    """What the comparison holds equal: tables; columns with their generic type, length and
    nullability; primary keys; indexes; unique constraints; foreign keys (names of unnamed
    constraints differ between a create and an ALTER, so those compare by columns)."""
    engine = create_engine(url)
    try:
        inspector = inspect(engine)
        schema: dict[str, Any] = {}
        for table in sorted(inspector.get_table_names()):
            columns = {
                c["name"]: (
                    type(c["type"].as_generic()).__name__,
                    getattr(c["type"], "length", None),
                    c["nullable"],
                )
                for c in inspector.get_columns(table)
            }
            schema[table] = {
                "columns": columns,
                "primary key": inspector.get_pk_constraint(table)["constrained_columns"],
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(table)
                ),
                "unique": sorted(
                    tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)
                ),
                "foreign keys": sorted(
                    (tuple(f["constrained_columns"]), f["referred_table"], *f["referred_columns"])
                    for f in inspector.get_foreign_keys(table)
                ),
            }
        return schema
    finally:
        engine.dispose()


@pytest.fixture
def second_database_url(database_url, tmp_path):
    """Another fresh database of the same kind as database_url (for the reference schema)."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'reference.db'}"
        return
    import psycopg

    name = database_url.rsplit("/", 1)[1] + "_ref"
    admin = database_url.rsplit("/", 1)[0] + "/postgres"
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield database_url.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_a_release_0_1_0_database_is_upgraded_in_place(
    tmp_path, database_url, second_database_url
):
    _load_v1(database_url)
    # The node (and every command that opens the database) refuses the old schema.
    db = Database(database_url)
    with pytest.raises(SchemaMismatch, match="scxnn-node db upgrade"):
        db.create_schema()
    with pytest.raises(SchemaMismatch, match="scxnn-node db upgrade"):
        db.check_schema()
    refused = _cli(tmp_path, database_url, "status")
    assert refused.returncode == 2 and "scxnn-node db upgrade" in refused.stderr
    db.dispose()

    run = _cli(tmp_path, database_url, "db", "upgrade")
    assert run.returncode == 0, run.stderr
    assert f"upgraded from v1 to revision {head_revision()}" in run.stdout
    again = _cli(tmp_path, database_url, "db", "upgrade")
    assert again.returncode == 0 and "already at revision" in again.stdout

    db = Database(database_url)
    try:
        db.check_schema()
        db.create_schema()  # what the node does at start: accepted now
        with db.engine.connect() as connection:
            assert current_revision(connection) == head_revision()
        with db.session() as s:
            assert {i.sop_instance_uid for i in s.execute(select(Instance)).scalars()} == {
                "1.2.826.0.1.3680043.10.1.1.1",
                "1.2.826.0.1.3680043.10.1.2.1",
            }
            assert {st.study_instance_uid: st.state for st in s.execute(select(Study)).scalars()}[
                "1.2.826.0.1.3680043.10.1.1"
            ] == "reported"
            assert s.execute(select(Job.state)).scalars().all() == ["done"]
            result = s.execute(select(Result)).scalar_one()
            assert result.sr_sop_instance_uid == "1.2.826.0.1.3680043.10.1.1.9"
            assert result.sr_sop_class_uid == "1.2.840.10008.5.1.4.1.1.88.34"  # 0.1.0 wrote these
            assert sorted(d.kind for d in s.execute(select(Delivery)).scalars()) == [
                "sr",
                "summary",
            ]
            assert s.execute(select(Event.message)).scalars().all() == ["instance received"]
        db.record_event("test", "after the upgrade")  # the id sequences carry on
        with db.session() as s:
            assert sorted(s.execute(select(Event.id)).scalars()) == [1, 2]
    finally:
        db.dispose()

    reference = Database(second_database_url)
    reference.create_schema()
    with reference.engine.connect() as connection:
        assert current_revision(connection) == head_revision()  # a new database is stamped
    reference.dispose()
    assert _schema(database_url) == _schema(second_database_url)
