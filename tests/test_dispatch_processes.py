"""The dispatcher in processes of its own (node.dispatch_processes): they, not the serve
process, send the results, each delivery once; one killed in the middle of a send is restarted
and its delivery goes out at once, not when its lease expires; stop stays bounded while one
waits on a peer that never answers."""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
from result_rows import add_pending_delivery
from sqlalchemy import select

from scxnn_node.node import Node, ProcessRole
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, DeliveryState, Event
from scxnn_node.store.spool import Spool
from scxnn_node.testing.dcmtk import Storescp
from scxnn_node.testing.loopback import free_port, node_config, wait_for
from scxnn_node.testing.node_process import process_alive, send_signal

DELIVERIES = 12


def _node(tmp_path: Path, bundle: Path, port: int, processes: int, url: str | None = None) -> Node:
    config = node_config(
        tmp_path,
        node={"dispatch_processes": processes},
        database={"url": url or f"sqlite:///{tmp_path / 'node.db'}"},
        model={"bundle": str(bundle)},
        destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": port}],
        delivery={"lease_seconds": 3600},  # longer than any wait below
        scheduler={"delivery_seconds": 0.2},
    )
    return Node(config, workers=False)


def _dispatch_pids(node: Node) -> list[int]:
    return [pid for _name, role, pid in node.process_ids() if role == ProcessRole.DISPATCH]


def _deliveries(db: Database) -> dict[int, tuple[str, int, str | None]]:
    """Each delivery's (state, attempts, lease owner)."""
    with db.session() as s:
        rows = s.execute(select(Delivery)).scalars()
        return {d.id: (d.state, d.attempts, d.lease_owner) for d in rows}


@contextlib.contextmanager
def _silent_peer(port: int) -> Iterator[None]:
    """A peer that accepts connections on `port` and never says a word: a PACS hung mid-way.
    The caller waits for its association until its timeout (60 s)."""
    server = socket.create_server(("127.0.0.1", port))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


def test_the_dispatch_processes_send_each_delivery_once_and_the_serve_process_none(
    tmp_path, small_bundle_dir, database_url
):
    pacs = Storescp(tmp_path / "pacs").start()
    node = _node(tmp_path, small_bundle_dir, pacs.port, 2, database_url)
    node.start()
    db = Database(database_url)
    spool = Spool(node.config.storage.spool_dir)
    try:
        pids = _dispatch_pids(node)
        assert len(pids) == 2 and all(process_alive(pid) for pid in pids)
        for pid in pids:  # with nothing due they hold no lock (a due check is a read)
            send_signal(pid, signal.SIGSTOP)
        ids = [add_pending_delivery(db, spool, n) for n in range(DELIVERIES)]
        time.sleep(2.0)  # ten delivery polls
        assert all(state == DeliveryState.PENDING for state, *_ in _deliveries(db).values())
        assert pacs.received() == []  # the serve process sends nothing itself
        for pid in pids:
            send_signal(pid, signal.SIGCONT)
        wait_for(lambda: all(s == DeliveryState.SENT for s, *_ in _deliveries(db).values()), 120)
        assert sorted(_deliveries(db)) == sorted(ids)
        assert all(attempts == 1 for _s, attempts, _o in _deliveries(db).values())
        received = [pydicom.dcmread(f).SOPInstanceUID for f in pacs.received()]
        assert len(received) == len(set(received)) == DELIVERIES  # each once
    finally:
        for pid in _dispatch_pids(node):
            send_signal(pid, signal.SIGCONT)  # a failed assertion must not leave one stopped
        node.stop()
        pacs.stop()
        db.dispose()


def test_a_dispatch_process_killed_mid_send_is_restarted_and_its_delivery_goes_out_at_once(
    tmp_path, small_bundle_dir
):
    port = free_port()
    node = _node(tmp_path, small_bundle_dir, port, 1)
    db = Database(node.config.database.url)
    pacs = Storescp(tmp_path / "pacs", port=port)
    try:
        with _silent_peer(port):
            node.start()
            delivery = add_pending_delivery(db, Spool(node.config.storage.spool_dir), 1)
            (victim,) = _dispatch_pids(node)

            def leased_to_the_victim() -> bool:
                owner = _deliveries(db)[delivery][2]
                return owner is not None and f":{victim}:dispatcher:" in owner

            wait_for(leased_to_the_victim, 60)  # it waits on the silent peer now
            send_signal(victim, signal.SIGKILL)
            wait_for(lambda: not process_alive(victim), 30)
        pacs.start()  # the PACS answers from now on, on the same port
        # Sent by the restarted process, long before the hour's lease would have let it go.
        wait_for(lambda: _deliveries(db)[delivery][0] == DeliveryState.SENT, 90)
        assert len(pacs.received()) == 1
        (successor,) = wait_for(lambda: _dispatch_pids(node), 30)
        assert successor != victim
        with db.session() as s:
            messages = s.execute(select(Event.message).where(Event.kind == "dispatch"))
            assert any(f"(pid {victim}) died" in m for m in messages.scalars())
    finally:
        node.stop()
        pacs.stop()
        db.dispose()


def test_stop_ends_a_dispatch_process_waiting_on_a_peer_that_never_answers(
    tmp_path, small_bundle_dir
):
    port = free_port()
    node = _node(tmp_path, small_bundle_dir, port, 1)
    db = Database(node.config.database.url)
    with _silent_peer(port):
        node.start()
        try:
            delivery = add_pending_delivery(db, Spool(node.config.storage.spool_dir), 1)
            wait_for(lambda: _deliveries(db)[delivery][2] is not None, 60)
            (pid,) = _dispatch_pids(node)
        finally:
            stopper = threading.Thread(target=node.stop, kwargs={"timeout": 1.0}, daemon=True)
            started = time.monotonic()
            stopper.start()
            stopper.join(30)
        assert not stopper.is_alive()
        assert time.monotonic() - started < 20  # 1 s, then SIGKILL (not the peer's 60 s)
        assert not process_alive(pid)
        # Not sent, and due again for the next dispatcher once its lease ends.
        assert _deliveries(db)[delivery][0] == DeliveryState.PENDING
    db.dispose()


def test_a_dispatch_process_killed_at_random_moments_loses_no_delivery(tmp_path, small_bundle_dir):
    """kill -9 four times while 30 deliveries go out: every one is sent in the end, and the
    PACS holds each file, at most once more per kill (one caught between its C-STORE and the
    record of it sends that file again, which the PACS takes as the same instance)."""
    kills, deliveries = 4, 30
    pacs = Storescp(tmp_path / "pacs").start()
    node = _node(tmp_path, small_bundle_dir, pacs.port, 1)
    db = Database(node.config.database.url)
    rng = random.Random(20261128)
    try:
        node.start()
        spool = Spool(node.config.storage.spool_dir)
        batches = [range(n, deliveries, kills + 1) for n in range(kills + 1)]
        for batch in batches[:-1]:  # work arrives while the process is killed, again and again
            (pid,) = wait_for(lambda: _dispatch_pids(node), 120)
            for n in batch:
                add_pending_delivery(db, spool, n)
            time.sleep(rng.uniform(0.0, 1.0))  # starting, claiming, sending or recording
            send_signal(pid, signal.SIGKILL)
            wait_for(lambda pid=pid: not process_alive(pid), 30)
        for n in batches[-1]:
            add_pending_delivery(db, spool, n)
        wait_for(lambda: all(s == DeliveryState.SENT for s, *_ in _deliveries(db).values()), 180)
        received = [pydicom.dcmread(f).SOPInstanceUID for f in pacs.received()]
        assert len(set(received)) == deliveries
        assert len(received) <= deliveries + kills
    finally:
        node.stop()
        pacs.stop()
        db.dispose()
