"""Schema revisions (Alembic, scripts in store/migrations): the revision this code expects, the
one a database is at, and the in-place upgrade of a database made by an earlier release.

The revision is the schema's version. A database of release 0.1.0 predates Alembic: it has a
`schema_info` table with version 1 instead, and is recognised as revision v1.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
LEGACY_REVISIONS = {1: "v1"}  # schema_info.version of a pre-Alembic release -> its revision
UPGRADE_COMMAND = "scxnn-node db upgrade"


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection  # env.py runs on the caller's connection
    return config


def head_revision() -> str:
    """The revision the current models correspond to."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The database's revision; None for a database with none of the node's tables."""
    revision = MigrationContext.configure(connection).get_current_revision()
    if revision is not None:
        return revision
    tables = set(inspect(connection).get_table_names())
    if "schema_info" in tables:
        version = connection.execute(text("SELECT version FROM schema_info")).scalar()
        return LEGACY_REVISIONS.get(version, f"schema_info version {version}")
    if tables & {"instances", "jobs", "results", "deliveries"}:
        return "unknown (tables without a revision)"
    return None


def stamp_head(connection: Connection) -> None:
    """Record a schema just made from the current models as the head revision."""
    command.stamp(_config(connection), "head")


def upgrade(connection: Connection) -> tuple[str | None, str]:
    """Upgrade the database in place to the head revision, inside the caller's transaction;
    returns (revision before, revision after). Raises ValueError for a database this release
    cannot upgrade (made by an unknown or a later version)."""
    before = current_revision(connection)
    head = head_revision()
    if before == head:
        return before, head
    known = {s.revision for s in ScriptDirectory.from_config(_config(connection)).walk_revisions()}
    if before not in known:
        raise ValueError(f"schema revision {before!r} is not one this release can upgrade")
    if MigrationContext.configure(connection).get_current_revision() is None:
        command.stamp(_config(connection), before)  # a pre-Alembic release: name its revision
    command.upgrade(_config(connection), "head")
    return before, head
