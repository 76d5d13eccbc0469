"""Database connection: SQLite in WAL mode by default, PostgreSQL by URL; schema version check."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from scxnn_node.store.models import SCHEMA_VERSION, Base, Event, SchemaInfo


class SchemaMismatch(Exception):
    """The database was made by another schema version."""


def utc_now() -> datetime:
    """Naive UTC (SQLite stores no zone; every timestamp here is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def short_hash(value: str) -> str:
    """A UID as logs show it at INFO: 12 hex digits of its sha256, never the UID itself."""
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Autocommit at the driver level so that we issue BEGIN IMMEDIATE ourselves: writers then
    # queue on the database lock instead of failing a deferred transaction's upgrade.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # durable, then acknowledge
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class Database:
    """Engine and session factory for one database URL."""

    def __init__(self, url: str, busy_timeout_s: float = 30.0) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        kwargs = (
            {"connect_args": {"timeout": busy_timeout_s}}
            if self.is_sqlite
            else {"pool_pre_ping": True}
        )
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        """Create missing tables and record the schema version; refuse another version."""
        Base.metadata.create_all(self.engine)
        with self.session() as session:
            info = session.get(SchemaInfo, 1)
            if info is None:
                session.add(SchemaInfo(id=1, version=SCHEMA_VERSION))
            elif info.version != SCHEMA_VERSION:
                raise SchemaMismatch(
                    f"database {self.url} has schema version {info.version}; this node uses "
                    f"{SCHEMA_VERSION} (migrate or point database.url elsewhere)"
                )

    def check_schema(self) -> None:
        with self.session() as session:
            info = session.execute(select(SchemaInfo)).scalar_one_or_none()
        if info is None or info.version != SCHEMA_VERSION:
            found = None if info is None else info.version
            raise SchemaMismatch(
                f"database {self.url} schema version {found}, expected {SCHEMA_VERSION}"
            )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def record_event(self, kind: str, message: str, subject: str = "", level: str = "INFO") -> None:
        with self.session() as session:
            session.add(
                Event(at=utc_now(), level=level, kind=kind, subject=subject, message=message)
            )

    def dispose(self) -> None:
        self.engine.dispose()
