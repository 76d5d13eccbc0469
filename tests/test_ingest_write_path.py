"""The C-STORE's lean write path: the instance row, its audit record and its study in one
Core-SQL transaction (concurrent stores of one instance or one new study on both databases),
the SQLite commit queue, the presentation contexts copied per association without a deep
copy, and the socket that reads a PDU whole."""

from __future__ import annotations

import copy
import socket
import threading

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification
from sqlalchemy import func, select

import scxnn_node.dicom.scp as scp_module
from scxnn_node.dicom.scp import SupportedContexts, WholeReadSocket
from scxnn_node.store.assembly import record_instance
from scxnn_node.store.audit import audit_counts
from scxnn_node.store.db import Database
from scxnn_node.store.models import AuditAction, Instance, InstanceState, Study, StudyState
from scxnn_node.store.spool import Spool
from scxnn_node.testing.datasets import chest_dataset, stored_instance_record, write_part10
from scxnn_node.testing.loopback import node_config

STUDY = "1.2.826.0.1.3680043.10.9.7"
DX = DigitalXRayImageStorageForPresentation




def _at_once(calls: list) -> list:
    """Run the calls in threads released together; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        results[index] = calls[index]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_the_same_instance_stored_at_once_is_new_once_and_a_duplicate_otherwise(db):
    record = stored_instance_record(STUDY, STUDY + ".1.1")
    results = _at_once([lambda: record_instance(db, record) for _ in range(4)])
    assert sorted(results) == [False, False, False, True]
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        counts = audit_counts(session)
    assert counts[(AuditAction.RECEIVED, "stored")] == 1
    assert counts[(AuditAction.RECEIVED, "duplicate")] == 3


def test_first_instances_of_a_new_study_stored_at_once_all_commit(db):
    records = [stored_instance_record(STUDY, f"{STUDY}.1.{n}") for n in range(1, 5)]
    results = _at_once([lambda r=r: record_instance(db, r) for r in records])
    assert results == [True] * 4
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 4
        study = session.get(Study, STUDY)
        assert study is not None and study.state == StudyState.RECEIVING
        assert study.first_received_at <= study.last_received_at


def test_a_new_instance_makes_a_reported_study_receiving_and_keeps_its_first_time(db):
    assert record_instance(db, stored_instance_record(STUDY, STUDY + ".1.1"))
    with db.session() as session:
        study = session.get(Study, STUDY)
        first = study.first_received_at
        study.state = StudyState.REPORTED
    assert record_instance(db, stored_instance_record(STUDY, STUDY + ".1.2"))
    # A re-sent instance is a duplicate: it leaves the study as it is.
    with db.session() as session:
        session.get(Study, STUDY).state = StudyState.REPORTED
    assert not record_instance(db, stored_instance_record(STUDY, STUDY + ".1.2"))
    with db.session() as session:
        study = session.get(Study, STUDY)
        assert study.state == StudyState.REPORTED
        assert study.first_received_at == first


def test_a_skipped_instance_is_recorded_with_its_reason_and_makes_no_study(db):
    record = stored_instance_record(STUDY, STUDY + ".1.1")
    skipped = type(record)(**{**vars(record), "skip_reason": "modality 'CT' is not allowed"})
    assert record_instance(db, skipped)
    with db.session() as session:
        instance = session.get(Instance, STUDY + ".1.1")
        assert instance.state == InstanceState.SKIPPED
        assert instance.skip_reason == "modality 'CT' is not allowed"
        assert session.get(Study, STUDY) is None
        assert audit_counts(session) == {(AuditAction.SKIPPED, "modality_not_allowed"): 1}


def _storage_contexts() -> list:
    ae = AE()
    ae.add_supported_context(DX, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae.supported_contexts


def test_contexts_copied_for_an_association_are_its_own():
    held = SupportedContexts(_storage_contexts())
    copied = copy.deepcopy(held)
    assert [(c.abstract_syntax, c.transfer_syntax) for c in copied] == [
        (c.abstract_syntax, c.transfer_syntax) for c in held
    ]
    dx = next(i for i, c in enumerate(held) if c.abstract_syntax == DX)
    # What negotiation writes to an association's copy stays out of the server's contexts.
    copied[dx].context_id = 1
    copied[dx].result = 0x00
    copied[dx].transfer_syntax.clear()
    assert held[dx].context_id is None and held[dx].result is None
    assert held[dx].transfer_syntax == list(ALL_TRANSFER_SYNTAXES)
    assert copy.deepcopy(held)[dx].transfer_syntax == held[dx].transfer_syntax


def _whole_reader(sock: socket.socket) -> WholeReadSocket:
    reader = WholeReadSocket.__new__(WholeReadSocket)
    reader.socket = sock
    return reader


def test_whole_read_socket_reads_exactly_what_is_asked_across_sends():
    ours, peer = socket.socketpair()
    with ours, peer:
        payload = bytes(range(256)) * 2048  # 512 KiB, larger than one socket buffer

        def send_in_pieces() -> None:
            for start in range(0, len(payload), 7000):
                peer.sendall(payload[start : start + 7000])

        sender = threading.Thread(target=send_in_pieces)
        sender.start()
        reader = _whole_reader(ours)
        first = reader.recv(6)
        rest = reader.recv(len(payload) - 6)
        sender.join(30)
    assert bytes(first + rest) == payload


def test_whole_read_socket_returns_what_arrived_when_the_peer_closes():
    ours, peer = socket.socketpair()
    with ours:
        peer.sendall(b"abcdef")
        peer.close()
        assert _whole_reader(ours).recv(100) == bytearray(b"abcdef")


def test_a_store_whose_commit_turn_does_not_come_still_commits(tmp_path, monkeypatch):
    """A C-STORE queued behind a commit that never ends goes to SQLite itself after
    COMMIT_TURN_WAIT_S: stored when the database is fine, never left waiting on the queue."""
    monkeypatch.setattr(scp_module, "COMMIT_TURN_WAIT_S", 0.2)
    config = node_config(tmp_path)
    db = Database(config.database.url)
    db.create_schema()
    ingest = scp_module.IngestService(config, db, Spool(config.storage.spool_dir))
    sop = STUDY + ".1.1"
    received = write_part10(chest_dataset(sop_uid=sop, study_uid=STUDY), tmp_path / "in.dcm")
    assert ingest._commit_turn is not None and ingest._commit_turn.acquire()  # held, never freed
    try:
        assert ingest.store(received, "PACS") == scp_module.SUCCESS
    finally:
        ingest._commit_turn.release()
    with db.session() as session:
        assert session.get(Instance, sop) is not None
    db.dispose()
