"""Database connection: SQLite in WAL mode by default, PostgreSQL by URL; the schema made or
checked at the revision the code expects (store/migrate.py upgrades an older one in place)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Executable, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from scxnn_node.logs import redact, redact_url
from scxnn_node.store import migrate
from scxnn_node.store.models import Base, Event

# Any constant: PostgreSQL's advisory lock that serialises schema creation and upgrades of
# nodes starting together on one database (SQLite's BEGIN IMMEDIATE already does).
_SCHEMA_LOCK = 0x5C7A0001
_READING = "scxnn_reading"  # execution option of Database.reading's connections
_CLOCK = "scxnn_clock"  # Session.info key: the Database.now of the session's database
# How often a process reads PostgreSQL's clock again: a host clock stepped by NTP in between is
# followed within this, and one round trip per process per period costs nothing.
SERVER_CLOCK_REFRESH_SECONDS = 10.0
_SERVER_UTC = text("SELECT timezone('UTC', clock_timestamp())")

log = logging.getLogger(__name__)


class SchemaMismatch(Exception):
    """The database's schema is not the revision this code uses."""


def _host_utc() -> datetime:
    """Naive UTC (SQLite stores no zone; every timestamp here is UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def session_now(session: Session) -> datetime:
    """Database.now() of the database a session (from Database.session) works on."""
    clock: Callable[[], datetime] = session.info[_CLOCK]
    return clock()


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
    # A read (Database.reading) needs no write lock: a WAL reader sees the last commit.
    reading = conn.get_execution_options().get(_READING, False)
    conn.exec_driver_sql("BEGIN" if reading else "BEGIN IMMEDIATE")


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
        # hide_parameters: a failed statement's message (logged, stored) quotes no UIDs.
        self.engine: Engine = create_engine(url, hide_parameters=True, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, info={_CLOCK: self.now})
        self._server_offset = timedelta(0)
        self._server_offset_read_at = -SERVER_CLOCK_REFRESH_SECONDS  # monotonic; never read yet
        self._server_clock_lock = threading.Lock()

    def now(self) -> datetime:
        """Naive UTC on the one clock that every node sharing this database reads. Leases,
        heartbeats and a study's quiet time are compared across nodes, so a host whose clock is
        off must not judge them by its own: on PostgreSQL this is the server's clock (this
        host's, corrected by the offset last measured); SQLite is one host's file, its clock."""
        if self.is_sqlite:
            return _host_utc()
        if time.monotonic() - self._server_offset_read_at >= SERVER_CLOCK_REFRESH_SECONDS:
            self._read_server_clock()
        return _host_utc() + self._server_offset

    def _read_server_clock(self) -> None:
        with self._server_clock_lock:
            if time.monotonic() - self._server_offset_read_at < SERVER_CLOCK_REFRESH_SECONDS:
                return  # another thread just read it
            try:
                with self.engine.connect() as connection:
                    sent = _host_utc()
                    server = connection.execute(_SERVER_UTC).scalar_one()
                    answered = _host_utc()
            except Exception as exc:  # the caller's own statement will meet the same outage
                log.warning(
                    "database clock not read (%s): keeping the last offset", type(exc).__name__
                )
            else:
                # The server read its clock about halfway through the round trip.
                self._server_offset = server - (sent + (answered - sent) / 2)
            self._server_offset_read_at = time.monotonic()

    @property
    def shown_url(self) -> str:
        """The URL as messages show it: without its password."""
        return redact_url(self.url)

    @contextmanager
    def _schema_transaction(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            if not self.is_sqlite:
                lock = text("SELECT pg_advisory_xact_lock(:key)")
                connection.execute(lock, {"key": _SCHEMA_LOCK})
            yield connection

    def create_schema(self) -> None:
        """A database without the node's tables gets them all, stamped with the current
        revision; an existing one must already be at it (SchemaMismatch names the upgrade)."""
        with self._schema_transaction() as connection:
            revision = migrate.current_revision(connection)
            if revision is None:
                Base.metadata.create_all(connection)
                migrate.stamp_head(connection)
                return
        self._require_head(revision)

    def check_schema(self) -> None:
        """Refuse a database that is not at the revision this code uses."""
        with self.engine.connect() as connection:
            revision = migrate.current_revision(connection)
        self._require_head(revision)

    def _require_head(self, revision: str | None) -> None:
        head = migrate.head_revision()
        if revision != head:
            raise SchemaMismatch(
                f"database {self.shown_url} has schema revision {revision}; this node uses "
                f"{head}: back it up, then run `{migrate.UPGRADE_COMMAND}` (or point "
                "database.url elsewhere)"
            )

    def upgrade_schema(self) -> tuple[str | None, str]:
        """Bring the schema to the current revision in place, in one transaction (a new
        database is created); returns (revision before, revision after)."""
        with self._schema_transaction() as connection:
            if migrate.current_revision(connection) is None:
                Base.metadata.create_all(connection)
                migrate.stamp_head(connection)
                return None, migrate.head_revision()
            try:
                return migrate.upgrade(connection)
            except ValueError as exc:
                raise SchemaMismatch(f"database {self.shown_url}: {exc}") from None

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

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        """A connection for reads alone (Core statements), lighter than a session; on SQLite it
        takes no write lock, so a poll never makes a writer wait."""
        with self.engine.connect() as connection:
            yield connection.execution_options(**{_READING: True})

    def finds_any(self, statement: Executable, parameters: dict[str, Any]) -> bool:
        """Whether `statement` (a SELECT ... LIMIT 1) returns a row: the cheap read an idle poll
        makes before its claim (which checks again under its lock)."""
        with self.reading() as connection:
            return connection.execute(statement, parameters).first() is not None

    def record_event(self, kind: str, message: str, subject: str = "", level: str = "INFO") -> None:
        """An audit event; UIDs in the message are hashed, passwords hidden."""
        with self.session() as session:
            message = redact(message)
            session.add(
                Event(at=self.now(), level=level, kind=kind, subject=subject, message=message)
            )

    def checkpoint(self) -> None:
        """SQLite: fold the write-ahead log into the database file and truncate it."""
        if not self.is_sqlite:
            return
        raw = self.engine.raw_connection()  # outside any transaction: the driver autocommits
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()

    def dispose(self) -> None:
        self.engine.dispose()
