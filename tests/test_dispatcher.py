"""Delivery under faults: a missing outbox file, retention while a delivery waits, and two
dispatchers sharing one database, each against a real dcmtk storescp on loopback."""

from __future__ import annotations

import io
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import make_dataset
from result_rows import add_done_result, add_pending_delivery
from sqlalchemy import Executable, select, text, update

from scxnn_node.cleaner import Cleaner
from scxnn_node.dispatcher import Dispatcher
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery
from scxnn_node.store.results import (
    Attempt,
    claim_due_deliveries,
    record_attempts,
    retry_deliveries,
)
from scxnn_node.store.spool import Spool
from scxnn_node.testing.dcmtk import Storescp, dcmtk_tool
from scxnn_node.testing.loopback import node_config
from scxnn_node.testing.peers import wait_until


class CountingStorescp(Storescp):
    """storescp that never overwrites: every C-STORE it accepts is one more file."""

    def start(self) -> CountingStorescp:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                dcmtk_tool("storescp"),
                *("+uf", "-aet", self.aet, "-od", str(self.directory), str(self.port)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import socket
        import time

        for _ in range(100):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("storescp did not start")


@pytest.fixture
def pacs(tmp_path):
    server = CountingStorescp(tmp_path / "pacs").start()
    yield server
    server.stop()


def _config(tmp_path: Path, database_url: str, pacs_port: int, **sections):
    return node_config(
        tmp_path,
        database={"url": database_url},
        storage={"retention_days": 1},
        destinations=[
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
            {"name": "archive", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port},
        ],
        **sections,
    )


def _outbox_file(spool: Spool, rel: str, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 4095, (16, 16), dtype=np.uint16)
    buffer = io.BytesIO()
    make_dataset(pixels).save_as(buffer, enforce_file_format=True)
    spool.write_durably(rel, buffer.getvalue())


def _seed(db: Database, spool: Spool, destinations: dict[str, int], files: int = 1) -> list[str]:
    """`files` outbox files of one result, each to be delivered to every destination (name ->
    how many deliveries: a result id of its own per delivery so the unique key holds)."""
    now = db.now()
    paths = []
    with db.session() as s:
        for f in range(files):
            rel = f"outbox/{f + 1}/sr.dcm"
            _outbox_file(spool, rel, seed=f)
            paths.append(rel)
            for destination, count in destinations.items():
                for n in range(count):
                    result = add_done_result(s, "1.2.3", f"{destination}{f}-{n}", now)
                    s.add(
                        Delivery(
                            result_id=result.id,
                            destination=destination,
                            kind="sr",
                            path=rel,
                            state="pending",
                            next_attempt_at=now,
                            updated_at=now,
                        )
                    )
    return paths


def _deliveries(db: Database) -> dict[int, Delivery]:
    with db.session() as s:
        return {d.id: d for d in s.execute(select(Delivery)).scalars()}


def test_a_missing_outbox_file_fails_only_its_own_delivery(tmp_path, database_url, pacs):
    config = _config(tmp_path, database_url, pacs.port)
    db = Database(database_url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    try:
        kept, lost = _seed(db, spool, {"pacs": 1}, files=2)
        spool.absolute(lost).unlink()
        assert Dispatcher(config, db, spool).deliver_due() == 1
        rows = {d.path: d for d in _deliveries(db).values()}
        assert rows[kept].state == "sent" and rows[kept].last_error is None
        # Missing files do not come back by waiting: dead at once, saying which file.
        assert rows[lost].state == "dead" and rows[lost].attempts == 1
        assert rows[lost].last_error == f"outbox file {lost} is missing"
        assert len(pacs.received()) == 1
        # Retry refuses what it could never send, and says why.
        outcome = retry_deliveries(db, spool.root, rows[lost].id)
        assert outcome.retried == 0
        assert outcome.missing == [(rows[lost].id, f"outbox file {lost} is missing")]
        assert _deliveries(db)[rows[lost].id].state == "dead"
    finally:
        db.dispose()


def test_an_unreadable_outbox_file_fails_only_its_own_delivery(tmp_path, database_url, pacs):
    config = _config(tmp_path, database_url, pacs.port)
    db = Database(database_url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    try:
        broken, kept = _seed(db, spool, {"pacs": 1}, files=2)
        spool.write_durably(broken, b"not DICOM")
        assert Dispatcher(config, db, spool).deliver_due() == 1
        rows = {d.path: d for d in _deliveries(db).values()}
        assert rows[kept].state == "sent"
        assert rows[broken].state == "pending" and rows[broken].attempts == 1  # backs off
        assert "InvalidDicomError" in rows[broken].last_error
        assert len(pacs.received()) == 1
    finally:
        db.dispose()


def test_retention_keeps_an_output_a_pending_delivery_needs(tmp_path, database_url, pacs):
    config = _config(tmp_path, database_url, pacs.port)
    db = Database(database_url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    cleaner = Cleaner(config, db, spool)
    try:
        (path,) = _seed(db, spool, {"pacs": 1, "archive": 1})
        long_ago = db.now() - timedelta(days=2)
        with db.session() as s:  # sent to the PACS long ago; the archive still waits
            s.execute(
                update(Delivery)
                .where(Delivery.destination == "pacs")
                .values(state="sent", updated_at=long_ago)
            )
        cleaner.purge_spool()
        assert spool.absolute(path).is_file()
        assert Dispatcher(config, db, spool).deliver_due() == 1
        cleaner.purge_spool()
        assert spool.absolute(path).is_file()  # the archive's copy was sent just now
        with db.session() as s:
            s.execute(update(Delivery).values(updated_at=long_ago))
        cleaner.purge_spool()
        assert not spool.absolute(path).exists()
        assert {d.state for d in _deliveries(db).values()} == {"sent"}
    finally:
        db.dispose()


def test_two_dispatchers_on_one_database_send_each_delivery_once(tmp_path, database_url, pacs):
    config = _config(tmp_path, database_url, pacs.port)
    setup = Database(database_url)
    setup.create_schema()
    spool = Spool(config.storage.spool_dir)
    _seed(setup, spool, {"pacs": 10, "archive": 10}, files=2)
    setup.dispose()
    # Two nodes: each its own engine, dispatcher and lease owner, started at the same moment.
    databases = [Database(database_url) for _ in range(2)]
    dispatchers = [Dispatcher(config, db, spool) for db in databases]
    start = threading.Barrier(2)
    sent: list[int] = []

    def run(dispatcher: Dispatcher) -> None:
        start.wait()
        sent.append(dispatcher.deliver_due())

    threads = [threading.Thread(target=run, args=(d,)) for d in dispatchers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sum(sent) == 40
        assert len(pacs.received()) == 40  # not 80: no delivery went out twice
        rows = _deliveries(databases[0]).values()
        assert {(d.state, d.attempts, d.lease_owner) for d in rows} == {("sent", 1, None)}
    finally:
        for db in databases:
            db.dispose()


def test_a_claim_excludes_others_until_it_is_recorded_or_its_lease_expires(tmp_path, database_url):
    config = _config(tmp_path, database_url, 1)
    db = Database(database_url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    try:
        _seed(db, spool, {"pacs": 3})
        lease = timedelta(minutes=10)
        first = claim_due_deliveries(db, "node-a", 2, lease)
        assert len(first) == 2
        second = claim_due_deliveries(db, "node-b", 10, lease)
        assert len(second) == 1 and second[0].id not in {d.id for d in first}
        assert claim_due_deliveries(db, "node-b", 10, lease) == []
        with db.session() as s:  # node-a stopped: its lease runs out
            s.execute(
                update(Delivery)
                .where(Delivery.lease_owner == "node-a")
                .values(lease_expires_at=db.now() - timedelta(seconds=1))
            )
        taken_over = claim_due_deliveries(db, "node-b", 10, lease)
        assert sorted(d.id for d in taken_over) == sorted(d.id for d in first)
    finally:
        db.dispose()


def test_deliveries_retry_command_names_a_missing_file(tmp_path, pacs):
    config = _config(tmp_path, f"sqlite:///{tmp_path / 'node.db'}", pacs.port)
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    kept, lost = _seed(db, spool, {"pacs": 1}, files=2)
    with db.session() as s:
        s.execute(update(Delivery).values(state="dead", attempts=8))
    db.dispose()
    spool.absolute(lost).unlink()
    config_path = tmp_path / "c.yaml"
    config_path.write_text(config.model_dump_json())
    run = subprocess.run(
        [
            *(sys.executable, "-m", "scxnn_node.cli", "deliveries", "retry", "--all-dead"),
            *("--config", str(config_path)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "1 delivery(ies) back to pending" in run.stdout
    assert f"outbox file {lost} is missing" in run.stdout
    db = Database(config.database.url)
    try:
        assert {d.path: d.state for d in _deliveries(db).values()} == {
            kept: "pending",
            lost: "dead",
        }
    finally:
        db.dispose()


def test_an_attempt_recorded_while_another_dispatcher_retakes_it_changes_nothing(
    tmp_path, postgres_url
):
    """Dispatcher A's lease ran out while it was sending, and B is claiming the delivery. A
    records its attempt while B's claim is still committing: A must judge whether it holds
    the delivery by the row as B leaves it, not overwrite B's claim with `sent` on the strength
    of what it read before (B would then send a second time, unrecorded)."""
    db = Database(postgres_url)
    db.create_schema()
    delivery_id = add_pending_delivery(db, Spool(tmp_path / "spool"), 1, owner="A")
    retake = update(Delivery).where(Delivery.id == delivery_id)
    with db.session() as s:
        s.execute(retake.values(lease_expires_at=db.now() - timedelta(seconds=1)))
    claim = retake.values(lease_owner="B", lease_expires_at=db.now() + timedelta(hours=1))
    sent = _behind_an_open_transaction(
        db, claim, lambda: record_attempts(db, "A", [Attempt(delivery_id)], 5, _a_day)
    )
    assert sent == 0
    with db.session() as s:
        row = s.get(Delivery, delivery_id)
        assert (row.state, row.lease_owner, row.attempts) == ("pending", "B", 0)
    db.dispose()


def _a_day(_attempts: int) -> timedelta:
    return timedelta(days=1)


def _behind_an_open_transaction(
    db: Database, statement: Executable, call: Callable[[], int]
) -> int:
    """What `call` returns when it runs while another transaction has run `statement` (and so
    holds its rows' locks) without committing yet: that transaction commits once `call` waits
    on its lock."""
    returned: list[int] = []
    with db.engine.connect() as other:
        transaction = other.begin()
        other.execute(statement)
        thread = threading.Thread(target=lambda: returned.append(call()))
        thread.start()
        wait_until(lambda: _sessions_waiting_on_a_lock(db) == 1, 30, 0.05)
        transaction.commit()
    thread.join(30)
    assert len(returned) == 1, "the call raised or did not return"
    return returned[0]


def _sessions_waiting_on_a_lock(db: Database) -> int:
    # A connection of its own each time: pg_stat_activity is a snapshot per transaction.
    with db.reading() as probe:
        return probe.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()


def test_retrying_a_delivery_under_way_leaves_it_to_its_dispatcher(tmp_path, database_url):
    """An operator's retry of a pending delivery a dispatcher is sending right now: reset (its
    lease dropped), another dispatcher would send it a second time."""
    db = Database(database_url)
    db.create_schema()
    spool = Spool(tmp_path / "spool")
    sending = add_pending_delivery(db, spool, 1, owner="A")  # leased: A is sending it
    assert retry_deliveries(db, spool.root, sending).retried == 0
    assert record_attempts(db, "A", [Attempt(sending)], 5, _a_day) == 1
    db.dispose()


def test_a_retry_racing_the_record_of_a_send_does_not_undo_it(tmp_path, postgres_url):
    """The retry reads the delivery as pending while the dispatcher commits `sent`: it must
    wait for that commit and leave the delivery sent, not turn it back to pending."""
    db = Database(postgres_url)
    db.create_schema()
    spool = Spool(tmp_path / "spool")
    delivery_id = add_pending_delivery(db, spool, 1)  # pending, backing off, no lease
    record_sent = update(Delivery).where(Delivery.id == delivery_id).values(state="sent")
    retried = _behind_an_open_transaction(
        db, record_sent, lambda: retry_deliveries(db, spool.root, delivery_id).retried
    )
    assert retried == 0
    with db.session() as s:
        assert s.get(Delivery, delivery_id).state == "sent"
    db.dispose()
