"""HL7 results to a RIS: the ORU^R01 a result becomes, and its delivery over MLLP to a real
listener on loopback (accepted, rejected, garbage, silent, down and back), on the same queue,
retries and dead letters as the DICOM deliveries."""

from __future__ import annotations

import io
import re
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from dicom_factory import chest_pixels, make_dataset
from hl7apy.parser import parse_message
from sqlalchemy import select, update

from scxnn_node.config import ConfigError, Hl7Destination, NodeConfig, validated
from scxnn_node.dispatcher import Dispatcher
from scxnn_node.findings import RiskTier
from scxnn_node.hl7.mllp import END, START
from scxnn_node.hl7.oru import StudyHeaders, ack_failure, build_oru, control_id_of
from scxnn_node.logs import short_hash
from scxnn_node.model.result import (
    BundleIdentity,
    FindingResult,
    MemberCall,
    StudyResult,
    Verdict,
)
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, Job, Result
from scxnn_node.store.spool import Spool
from scxnn_node.testing.loopback import free_port, node_config
from scxnn_node.testing.pki import Pki
from scxnn_node.worker import TriageWorker

Reply = Callable[[bytes], bytes | None]  # a received message -> the listener's answer


def ack(code: str, text: str = "") -> Reply:
    def answer(message: bytes) -> bytes:
        control = control_id_of(message)
        return START + (
            f"MSH|^~\\&|RIS|HOSP|SCXNN||20260101120000||ACK^R01^ACK|A{control}|P|2.5.1\r"
            f"MSA|{code}|{control}|{text}\r"
        ).encode() + END

    return answer


class MllpListener:
    """A RIS on loopback: reads framed messages, keeps them, and writes back whatever `reply`
    makes of each (nothing when it returns None). With `tls` it speaks only TLS, and keeps the
    protocol version of each connection that completed its handshake."""

    def __init__(self, port: int, reply: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.reply = reply
        self.tls = tls
        self.received: list[bytes] = []
        self.tls_versions: list[str | None] = []
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                connection, _ = self.server.accept()
            except TimeoutError:
                continue
            connection.settimeout(5)
            try:
                if self.tls is not None:  # a handshake the client refuses raises SSLError
                    connection = self.tls.wrap_socket(connection, server_side=True)
                    self.tls_versions.append(connection.version())
                self._answer(connection)
            except OSError:
                pass
            finally:
                connection.close()

    def _answer(self, connection: socket.socket) -> None:
        buffer = b""
        while chunk := connection.recv(4096):
            buffer += chunk
            while END in buffer:
                framed, buffer = buffer.split(END, 1)
                message = framed.removeprefix(START)
                self.received.append(message)
                answer = self.reply(message)
                if answer is not None:
                    connection.sendall(answer)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.server.close()


@pytest.fixture
def listen() -> Iterator[Callable[..., MllpListener]]:
    started: list[MllpListener] = []

    def start(
        reply: Reply, port: int | None = None, tls: ssl.SSLContext | None = None
    ) -> MllpListener:
        started.append(MllpListener(port or free_port(), reply, tls))
        return started[-1]

    yield start
    for listener in started:
        if not listener.stopping.is_set():
            listener.stop()


def _destination(port: int, **keys: object) -> Hl7Destination:
    return Hl7Destination.model_validate(
        {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": port, **keys}
    )


def _result(tier: RiskTier | None) -> StudyResult:
    bundle = BundleIdentity("chest-demo", "1.4.0", demo=True)
    if tier is None:
        finding = FindingResult(
            "effusion", RiskTier.URGENT, MemberCall.NORMAL,
            {"normal": 0.9, "target": 0.05, "others": 0.05},
        )
        return StudyResult("1.2.826.0.1.3680043.8.498.1", Verdict.DEFINITE_NORMAL, None, None,
                           0.1, 0.5, (finding,), bundle)
    finding = FindingResult(
        "pneumothorax" if tier is RiskTier.CRITICAL else "effusion", tier, MemberCall.TARGET,
        {"normal": 0.1, "target": 0.8, "others": 0.1},
    )
    return StudyResult("1.2.826.0.1.3680043.8.498.1", Verdict.ABNORMAL, None, tier.value, 0.93,
                       0.5, (finding,), bundle)


def _headers(patient_id: str = "P|12^3&4", accession: str = "ACC~77") -> StudyHeaders:
    ds = make_dataset(chest_pixels(32, seed=0, bits=12), study_uid="1.2.826.0.1.3680043.8.498.1")
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "HOSP"
    ds.AccessionNumber = accession
    return StudyHeaders.of(ds)


def _oru(result: StudyResult, destination: Hl7Destination, amended: bool = False) -> bytes:
    return build_oru(
        result,
        _headers(),
        destination,
        model_name="chest-demo",
        model_version="1.4.0",
        finding_codes={"pneumothorax": ("36118008", "SCT", "Pneumothorax")},
        control_id="c0ffee",
        amended=amended,
        now=datetime(2026, 11, 27, 5, 0, tzinfo=UTC),
    )


def _observations(message: bytes) -> dict[str, list[str]]:
    """OBX-3 identifier code -> the OBX-5 values of that identifier, as a RIS parses them."""
    parsed = parse_message(message.decode().strip("\r"), find_groups=False)
    found: dict[str, list[str]] = {}
    for obx in parsed.obx:
        found.setdefault(obx.obx_3.obx_3_1.to_er7(), []).append(obx.obx_5.to_er7())
    return found


def test_the_oru_carries_the_study_as_received_and_every_part_of_the_result():
    message = _oru(_result(RiskTier.CRITICAL), _destination(2575, receiving_facility="RAD"))
    parsed = parse_message(message.decode().strip("\r"), find_groups=False)
    assert parsed.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert parsed.msh.msh_12.to_er7() == "2.5.1"
    assert parsed.msh.msh_10.to_er7() == control_id_of(message) == "c0ffee"
    assert parsed.msh.msh_6.to_er7() == "RAD"
    # Delimiters in what the modality sent stay data: escaped, then read back unchanged.
    pid_3 = parsed.pid.pid_3
    assert pid_3.cx_1.to_er7() == "P\\F\\12\\S\\3\\T\\4"
    assert pid_3.cx_4.to_er7() == "HOSP"
    assert parsed.obr.obr_3.to_er7() == "ACC\\R\\77"
    assert parsed.obr.obr_25.to_er7() == "F"
    obx = _observations(message)
    assert obx["113014"] == ["1.2.826.0.1.3680043.8.498.1"]
    assert obx["verdict"][0].startswith("abnormal^")
    assert obx["risk-tier"][0].startswith("critical^")
    assert obx["finding"] == ["36118008^Pneumothorax^SCT"]
    assert obx["abnormality-score"] == ["0.930000"]
    assert obx["model"] == ["chest-demo 1.4.0"]
    assert parsed.tq1.tq1_9.to_er7().startswith("S^STAT")


@pytest.mark.parametrize(
    ("tier", "keys", "code"),
    [
        (RiskTier.CRITICAL, {}, "S"),
        (RiskTier.URGENT, {}, "A"),
        (RiskTier.NON_URGENT, {}, "R"),
        (None, {}, "R"),
        (RiskTier.URGENT, {"priorities": {"urgent": "stat"}}, "S"),
        (None, {"default_priority": "asap"}, "A"),
    ],
)
def test_the_priority_a_worklist_sorts_by_follows_the_tier_and_the_config(tier, keys, code):
    message = _oru(_result(tier), _destination(2575, **keys))
    parsed = parse_message(message.decode().strip("\r"), find_groups=False)
    assert parsed.tq1.tq1_9.tq1_9_1.to_er7() == code
    assert parsed.obr.obr_27.to_er7().endswith(f"^{code}")


def test_a_definite_normal_result_flags_nothing_and_an_amended_one_is_a_correction():
    message = _oru(_result(None), _destination(2575), amended=True)
    obx = _observations(message)
    assert obx["verdict"][0].startswith("definite_normal^")
    assert "risk-tier" not in obx and "finding" not in obx
    parsed = parse_message(message.decode().strip("\r"), find_groups=False)
    assert parsed.obr.obr_25.to_er7() == "C"


def test_a_study_not_analysed_reaches_the_ris_with_its_reason():
    instance = "1.2.826.0.1.3680043.8.498.77"
    result = StudyResult(
        "1.2.826.0.1.3680043.8.498.1", Verdict.NOT_ANALYSED,
        f"no usable frontal chest image: unusable: {instance} has no pixel data",
        None, None, None, (), BundleIdentity("chest-demo", "1.4.0", demo=True),
    )  # fmt: skip
    destination = _destination(2575, default_priority="routine", priorities={"critical": "stat"})
    message = _oru(result, destination)
    obx = _observations(message)
    assert obx["verdict"][0].startswith("not_analysed^")
    assert obx["model"] == ["chest-demo 1.4.0"]
    assert obx["113014"] == ["1.2.826.0.1.3680043.8.498.1"]
    [reason] = obx["reason"]
    assert reason.startswith("no usable frontal chest image: unusable: ")
    assert instance not in reason and short_hash(instance) in reason
    assert not {"risk-tier", "finding", "abnormality-score"} & set(obx)
    parsed = parse_message(message.decode().strip("\r"), find_groups=False)
    [verdict] = [o for o in parsed.obx if o.obx_3.obx_3_1.to_er7() == "verdict"]
    assert verdict.obx_8.to_er7() == "N"  # not flagged abnormal
    assert parsed.tq1.tq1_9.tq1_9_1.to_er7() == "R"
    assert parsed.pid.pid_3.cx_4.to_er7() == "HOSP"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"MSH|^~\\&|RIS||||||ACK|9|P|2.5.1\rMSA|AA|c0ffee\r", None),
        (b"MSH|^~\\&|RIS||||||ACK|9|P|2.5.1\rMSA|CA|c0ffee\r", None),
        (b"MSH|^~\\&|RIS||||||ACK|9|P|2.5.1\rMSA|AR|c0ffee|unknown patient\r", "AR: unknown"),
        (b"MSH|^~\\&|RIS||||||ACK|9|P|2.5.1\rMSA|AE|c0ffee\r", "RIS answered AE"),
        (b"MSH|^~\\&|RIS||||||ACK|9|P|2.5.1\rMSA|AA|other\r", "not of 'c0ffee'"),
        (b"hello there", "unreadable ACK"),
        (b"", "unreadable ACK"),
    ],
)
def test_only_an_accepting_ack_of_the_message_sent_is_a_success(reply, expected):
    failure = ack_failure(reply, "c0ffee")
    if expected is None:
        assert failure is None
    else:
        assert failure is not None and expected in failure


def test_destination_kinds_in_the_config():
    config = validated(
        NodeConfig,
        {
            "destinations": [
                {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": 2575},
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                 "outputs": ["sr", "summary"]},
            ]
        },
        "test",
    )
    ris, pacs = config.destinations
    assert (ris.kind, pacs.kind) == ("hl7", "dicom")
    assert ris.priority("critical") == "stat" and ris.priority(None) == "routine"
    for bad, message in [
        ({"kind": "hl7", "ae_title": "RIS"}, "destinations.0.ae_title: unknown key"),
        ({"kind": "fhir"}, "kind must be dicom (the default) or hl7"),
        ({"kind": "hl7", "priorities": {"severe": "stat"}}, "unknown risk tier"),
        ({}, "destinations.0.ae_title: Field required"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validated(
                NodeConfig,
                {"destinations": [{"name": "x", "host": "h", "port": 1, **bad}]},
                "test",
            )


# --- delivery over MLLP --------------------------------------------------------------------


def _dispatch_parts(tmp_path: Path, database_url: str, port: int, **keys: object):
    config = node_config(
        tmp_path,
        database={"url": database_url},
        destinations=[
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": port,
             "ack_timeout_seconds": 1, **keys}
        ],
        delivery={"max_attempts": 3, "backoff_seconds": 60},
    )
    return (config, *_store_of(config))


def _store_of(config: NodeConfig) -> tuple[Database, Spool]:
    """The node's database (schema made) and spool, as a worker or dispatcher opens them."""
    db = Database(config.database.url)
    db.create_schema()
    return db, Spool(config.storage.spool_dir)


def _seed_hl7(db: Database, spool: Spool, destination: Hl7Destination, count: int = 1) -> None:
    now = db.now()
    with db.session() as s:
        for n in range(count):
            rel = f"outbox/{n + 1}.a/hl7-0.hl7"
            spool.write_durably(rel, _oru(_result(RiskTier.URGENT), destination))
            job = Job(study_instance_uid="1.2.3", instance_set=f"{n}".ljust(64, "x"),
                      instance_uids="[]", bundle_version="1", state="done", created_at=now,
                      updated_at=now)
            s.add(job)
            s.flush()
            result = Result(job_id=job.id, study_instance_uid="1.2.3", verdict="abnormal",
                            result_json="{}", sr_sop_instance_uid="", summary_sop_instance_uid="",
                            created_at=now)
            s.add(result)
            s.flush()
            s.add(Delivery(result_id=result.id, destination="ris", kind="hl7", path=rel,
                           state="pending", next_attempt_at=now, updated_at=now))


def _deliveries(db: Database) -> list[Delivery]:
    with db.session() as s:
        return list(s.execute(select(Delivery).order_by(Delivery.id)).scalars())


def _due_now(db: Database) -> None:
    with db.session() as s:
        s.execute(update(Delivery).values(next_attempt_at=db.now()))


def test_an_accepted_message_is_sent_once_over_one_connection(tmp_path, database_url, listen):
    ris = listen(ack("AA"))
    config, db, spool = _dispatch_parts(tmp_path, database_url, ris.port)
    _seed_hl7(db, spool, config.destinations[0], count=2)
    assert Dispatcher(config, db, spool).deliver_due() == 2
    assert [d.state for d in _deliveries(db)] == ["sent", "sent"]
    assert len(ris.received) == 2
    assert ris.received[0] == spool.absolute("outbox/1.a/hl7-0.hl7").read_bytes()
    assert Dispatcher(config, db, spool).deliver_due() == 0  # nothing sent twice
    db.dispose()


def test_a_reject_is_a_failed_attempt_retried_then_dead(tmp_path, database_url, listen):
    ris = listen(ack("AR", "no such order"))
    config, db, spool = _dispatch_parts(tmp_path, database_url, ris.port)
    _seed_hl7(db, spool, config.destinations[0])
    dispatcher = Dispatcher(config, db, spool)
    for attempt in range(1, 4):
        assert dispatcher.deliver_due() == 0
        [delivery] = _deliveries(db)
        assert delivery.attempts == attempt
        assert delivery.last_error == "RIS answered AR: no such order"
        _due_now(db)
    assert delivery.state == "dead"
    assert len(ris.received) == 3
    db.dispose()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (lambda message: b"\x0bwhat is this\x1c\r", "unreadable ACK"),
        (lambda message: b"HTTP/1.1 400 Bad Request\r\n\r\n", "no ACK within 1s"),
        (lambda message: None, "no ACK within 1s"),
    ],
)
def test_garbage_or_silence_is_a_failed_attempt_with_a_clear_error(
    tmp_path, database_url, listen, reply, error
):
    ris = listen(reply)
    config, db, spool = _dispatch_parts(tmp_path, database_url, ris.port)
    _seed_hl7(db, spool, config.destinations[0], count=2)
    assert Dispatcher(config, db, spool).deliver_due() == 0  # and no exception
    first, second = _deliveries(db)
    assert (first.state, first.attempts) == ("pending", 1)
    assert error in first.last_error
    assert second.state == "pending" and second.last_error  # the connection is not trusted
    db.dispose()


def test_a_listener_that_is_down_and_comes_back_gets_the_message(tmp_path, database_url, listen):
    port = free_port()
    config, db, spool = _dispatch_parts(tmp_path, database_url, port)
    _seed_hl7(db, spool, config.destinations[0])
    dispatcher = Dispatcher(config, db, spool)
    assert dispatcher.deliver_due() == 0
    [delivery] = _deliveries(db)
    assert delivery.state == "pending" and "cannot connect" in delivery.last_error
    assert delivery.next_attempt_at > db.now()  # backed off, not hammered
    ris = listen(ack("AA"), port=port)
    assert dispatcher.deliver_due() == 0  # not due yet
    _due_now(db)
    assert dispatcher.deliver_due() == 1
    [delivery] = _deliveries(db)
    assert (delivery.state, delivery.attempts, delivery.last_error) == ("sent", 2, None)
    assert len(ris.received) == 1
    db.dispose()


# --- MLLP over TLS -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _server_tls(certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    return context


def test_a_pinned_ca_sends_the_message_over_tls(tmp_path, database_url, listen, pki):
    ris = listen(ack("AA"), tls=_server_tls(*pki.issue("ris")))
    config, db, spool = _dispatch_parts(
        tmp_path, database_url, ris.port, tls={"enabled": True, "ca": str(pki.cert)}
    )
    _seed_hl7(db, spool, config.destinations[0])
    assert Dispatcher(config, db, spool).deliver_due() == 1
    [delivery] = _deliveries(db)
    assert (delivery.state, delivery.last_error) == ("sent", None)
    assert ris.received == [spool.absolute("outbox/1.a/hl7-0.hl7").read_bytes()]
    assert len(ris.tls_versions) == 1 and ris.tls_versions[0].startswith("TLSv1.")
    db.dispose()


def test_a_ris_certificate_of_another_ca_is_refused(tmp_path, database_url, listen, pki):
    stranger = Pki(tmp_path / "other-ca", "other-ca")
    ris = listen(ack("AA"), tls=_server_tls(*stranger.issue("ris")))
    config, db, spool = _dispatch_parts(
        tmp_path, database_url, ris.port, tls={"enabled": True, "ca": str(pki.cert)}
    )
    _seed_hl7(db, spool, config.destinations[0])
    dispatcher = Dispatcher(config, db, spool)
    assert dispatcher.deliver_due() == 0  # and no exception
    [delivery] = _deliveries(db)
    assert (delivery.state, delivery.attempts) == ("pending", 1)
    assert "TLS" in delivery.last_error and "certificate" in delivery.last_error
    assert ris.received == [] and ris.tls_versions == []
    # The dispatcher goes on: the same delivery, due again, is tried again.
    _due_now(db)
    assert dispatcher.deliver_due() == 0
    assert _deliveries(db)[0].attempts == 2
    db.dispose()


def test_a_ris_certificate_for_another_host_is_refused_unless_the_check_is_off(
    tmp_path, database_url, listen, pki
):
    misnamed = pki.issue("ris-elsewhere", "DNS:ris.elsewhere.example")
    ris = listen(ack("AA"), tls=_server_tls(*misnamed))
    pinned = {"enabled": True, "ca": str(pki.cert)}
    config, db, spool = _dispatch_parts(tmp_path, database_url, ris.port, tls=pinned)
    _seed_hl7(db, spool, config.destinations[0])
    assert Dispatcher(config, db, spool).deliver_due() == 0
    [delivery] = _deliveries(db)
    assert delivery.state == "pending"
    assert "TLS" in delivery.last_error and "127.0.0.1" in delivery.last_error
    assert ris.received == []
    # The documented way around a RIS whose certificate names another host: a pinned CA and
    # check_hostname off (the CA still has to be the pinned one).
    unchecked, _, _ = _dispatch_parts(
        tmp_path, database_url, ris.port, tls={**pinned, "check_hostname": False}
    )
    _due_now(db)
    assert Dispatcher(unchecked, db, spool).deliver_due() == 1
    assert len(ris.received) == 1
    db.dispose()


# --- the worker writes the message ---------------------------------------------------------


def test_the_worker_queues_an_oru_for_each_hl7_destination(
    tmp_path, small_bundle_dir, database_url, listen
):
    ris = listen(ack("AA"))
    config = node_config(
        tmp_path,
        database={"url": database_url},
        model={"bundle": str(small_bundle_dir)},
        destinations=[
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(),
             "outputs": ["sr"]},
        ],
    )
    db, spool = _store_of(config)
    worker = TriageWorker(config, "cpu")
    study = pydicom.uid.generate_uid()
    ds = make_dataset(chest_pixels(96, seed=3, bits=12), study_uid=study)
    ds.PatientID, ds.AccessionNumber = "MRN^0042", "ACC-9"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    rel = spool.instance_path(study, ds.SOPInstanceUID)
    spool.write_durably(rel, buffer.getvalue())
    assert record_instance(db, InstanceRecord(ds.SOPInstanceUID, study, ds.SeriesInstanceUID,
                                              ds.SOPClassUID, rel, 1, "PACS"))
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    assert worker.process_next()
    kinds = {(d.destination, d.kind) for d in _deliveries(db)}
    assert kinds == {("ris", "hl7"), ("pacs", "sr")}
    Dispatcher(config, db, spool).deliver_due()
    [hl7] = [d for d in _deliveries(db) if d.kind == "hl7"]
    assert hl7.state == "sent"
    [message] = ris.received
    parsed = parse_message(message.decode().strip("\r"), find_groups=False)
    assert parsed.pid.pid_3.cx_1.to_er7() == "MRN\\S\\0042"
    assert parsed.obr.obr_3.to_er7() == "ACC-9"
    with db.session() as s:
        verdict = s.execute(select(Result.verdict)).scalar_one()
    assert _observations(message)["verdict"][0].startswith(f"{verdict}^")
    assert _observations(message)["113014"] == [study]
    worker.db.dispose()
    db.dispose()


def test_a_study_not_analysed_reaches_each_ris_and_no_pacs(
    tmp_path, small_bundle_dir, database_url, listen
):
    ris, other_ris = listen(ack("AA")), listen(ack("AA"))
    config = node_config(
        tmp_path,
        database={"url": database_url},
        model={"bundle": str(small_bundle_dir)},
        destinations=[
            {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port},
            {"name": "ris-2", "kind": "hl7", "host": "127.0.0.1", "port": other_ris.port},
            {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port(),
             "outputs": ["sr", "summary"]},
        ],
    )
    db, spool = _store_of(config)
    worker = TriageWorker(config, "cpu")
    study = pydicom.uid.generate_uid()
    ds = make_dataset(chest_pixels(96, seed=3, bits=12), study_uid=study)
    ds.PatientID, ds.AccessionNumber = "MRN-7", "ACC-10"
    series = ds.SeriesInstanceUID
    del ds.SeriesInstanceUID  # unusable: the worker reads no header of it for the triage
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    rel = spool.instance_path(study, ds.SOPInstanceUID)
    spool.write_durably(rel, buffer.getvalue())
    assert record_instance(db, InstanceRecord(ds.SOPInstanceUID, study, series,
                                              ds.SOPClassUID, rel, 1, "PACS"))
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    assert worker.process_next()
    with db.session() as s:
        result = s.execute(select(Result)).scalar_one()
    assert result.verdict == "not_analysed"
    assert (result.sr_sop_instance_uid, result.summary_sop_instance_uid) == ("", "")
    deliveries = _deliveries(db)
    assert sorted((d.destination, d.kind) for d in deliveries) == [
        ("ris", "hl7"), ("ris-2", "hl7")
    ]
    assert len({d.path for d in deliveries}) == 2  # a message per RIS
    assert Dispatcher(config, db, spool).deliver_due() == 2
    for listener in (ris, other_ris):
        [message] = listener.received
        parsed = parse_message(message.decode().strip("\r"), find_groups=False)
        assert parsed.pid.pid_3.cx_1.to_er7() == "MRN-7"
        assert parsed.obr.obr_3.to_er7() == "ACC-10"
        obx = _observations(message)
        assert obx["verdict"][0].startswith("not_analysed^")
        assert obx["reason"] and "abnormality-score" not in obx
    worker.db.dispose()
    db.dispose()


def test_a_destination_whose_kind_changed_dead_letters_what_it_cannot_take(
    tmp_path, database_url, listen
):
    ris = listen(ack("AA"))
    config, db, spool = _dispatch_parts(tmp_path, database_url, ris.port)
    _seed_hl7(db, spool, config.destinations[0])
    as_dicom = node_config(
        tmp_path,
        database={"url": database_url},
        destinations=[{"name": "ris", "ae_title": "RIS", "host": "127.0.0.1", "port": ris.port}],
    )
    assert Dispatcher(as_dicom, db, spool).deliver_due() == 0
    [delivery] = _deliveries(db)
    assert delivery.state == "dead"
    assert delivery.last_error == "a hl7 output cannot go to dicom destination"
    assert ris.received == []
    db.dispose()
