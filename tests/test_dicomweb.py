"""DICOMweb results: the SR and summary image stored by STOW-RS on the same queue, retries and
dead letters as the C-STORE deliveries, against a real Orthanc with its DICOMweb plugin (down
and back, with HTTP basic auth) and a loopback HTTP server that answers badly (errors, garbage,
silence, refusals), and over https with a pinned CA."""

from __future__ import annotations

import io
import json
import re
import secrets
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import make_dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from test_tls import Pki

from scxnn_node.cli import main as cli_main
from scxnn_node.config import ConfigError, DicomWebDestination, NodeConfig, load_config, validated
from scxnn_node.dispatcher import Dispatcher
from scxnn_node.store.db import Database
from scxnn_node.store.models import Delivery, DeliveryState, Job, Result
from scxnn_node.store.spool import Spool
from scxnn_node.testing.datasets import sample_files
from scxnn_node.testing.loopback import free_port, node_config
from scxnn_node.testing.node_process import NodeProcess, serve_config
from scxnn_node.testing.orthanc import ORTHANC_AE, Orthanc
from scxnn_node.testing.peers import wait_until

PASSWORD_ENV = "SCXNN_TEST_DICOMWEB_PASSWORD"


# --- config -------------------------------------------------------------------------------


def test_the_documented_destination_works_as_written(tmp_path, capsys, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text(
        "destinations:\n"
        '  - {name: web, kind: dicomweb, url: "http://127.0.0.1:8042/dicom-web", '
        "outputs: [sr, summary]}\n"
    )
    [web] = load_config(path, environ={}).destinations
    assert isinstance(web, DicomWebDestination)
    assert (web.name, web.url, web.outputs) == ("web", "http://127.0.0.1:8042/dicom-web",
                                                ["sr", "summary"])
    assert web.username is None and web.ca is None and web.timeout_seconds == 30

    password = secrets.token_hex(8)
    monkeypatch.setenv(PASSWORD_ENV, password)
    path.write_text(
        "destinations:\n"
        "  - {name: web, kind: dicomweb, url: 'https://pacs.example:443/dicom-web/', "
        f"username: scxnn, password_env: {PASSWORD_ENV}, timeout_seconds: 5}}\n"
    )
    assert cli_main(["check-config", str(path)]) == 0
    out = capsys.readouterr()
    assert "valid; 1 destination(s)" in out.out
    assert password not in out.out + out.err
    [web] = load_config(path).destinations
    assert web.url == "https://pacs.example:443/dicom-web"  # one form: no trailing slash
    assert password not in repr(web)  # the config holds the variable's name, not its value


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"kind": "dicomweb"}, "destinations.0.url: Field required"),
        ({"kind": "dicomwbe", "url": "http://h/x"}, "kind must be dicom (the default) or hl7 or "
                                                    "dicomweb"),
        ({"kind": "dicomweb", "url": "ftp://h/x"}, "destinations.0.url: Value error, must be an "
                                                   "http:// or https:// URL"),
        ({"kind": "dicomweb", "url": "http://h/x", "ae_title": "X"},
         "destinations.0.ae_title: unknown key"),
        ({"kind": "dicomweb", "url": "http://h/x?a=1"}, "without ?query"),
        ({"kind": "dicomweb", "url": "http://h/x", "username": "u"},
         "username and password_env go together"),
        ({"kind": "dicomweb", "url": "http://h/x", "ca": "/ca.pem"}, "ca needs an https:// url"),
        ({"kind": "dicomweb", "url": "https://h/x", "certificate": "/c.pem"},
         "certificate and key go together"),
        ({"kind": "dicomweb", "url": "http://h/x", "timeout_seconds": 0},
         "destinations.0.timeout_seconds"),
    ],
)
def test_a_bad_dicomweb_destination_is_refused_naming_the_key(keys, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validated(NodeConfig, {"destinations": [{"name": "web", **keys}]}, "test")


def test_a_password_in_the_url_is_refused_without_being_repeated():
    password = secrets.token_hex(8)
    url = f"https://scxnn:{password}@pacs.example/dicom-web"
    with pytest.raises(ConfigError) as refused:
        validated(NodeConfig, {"destinations": [{"name": "w", "kind": "dicomweb", "url": url}]},
                  "test")
    assert "use username and password_env" in str(refused.value)
    assert password not in str(refused.value)


# --- delivery against a real DICOMweb server ------------------------------------------------


def _dispatch_parts(tmp_path: Path, database_url: str, url: str, **keys: object):
    config = node_config(
        tmp_path,
        database={"url": database_url},
        destinations=[{"name": "web", "kind": "dicomweb", "url": url, **keys}],
        delivery={"max_attempts": 3, "backoff_seconds": 60},
    )
    db = Database(config.database.url)
    db.create_schema()
    return config, db, Spool(config.storage.spool_dir)


def _image(study_uid: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4095, (16, 16), dtype=np.uint16)
    buffer = io.BytesIO()
    make_dataset(pixels, study_uid=study_uid).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _seed(db: Database, spool: Spool, files: list[bytes]) -> list[str]:
    """A result per file with one pending delivery of it to `web`; the files' SOP UIDs."""
    now = db.now()
    uids = []
    with db.session() as s:
        for n, content in enumerate(files):
            rel = f"outbox/{n + 1}.a/sr.dcm"
            spool.write_durably(rel, content)
            try:
                uids.append(str(pydicom.dcmread(io.BytesIO(content)).SOPInstanceUID))
            except Exception:
                uids.append("")  # a file that is not DICOM
            job = Job(study_instance_uid="1.2.3", instance_set=f"{n}".ljust(64, "x"),
                      instance_uids="[]", bundle_version="1", state="done", created_at=now,
                      updated_at=now)
            s.add(job)
            s.flush()
            result = Result(job_id=job.id, study_instance_uid="1.2.3", verdict="abnormal",
                            result_json="{}", sr_sop_instance_uid=uids[-1],
                            summary_sop_instance_uid="", created_at=now)
            s.add(result)
            s.flush()
            s.add(Delivery(result_id=result.id, destination="web", kind="sr", path=rel,
                           state="pending", next_attempt_at=now, updated_at=now))
    return uids


def _deliveries(db: Database) -> list[Delivery]:
    with db.session() as s:
        return list(s.execute(select(Delivery).order_by(Delivery.id)).scalars())


def _due_now(db: Database) -> None:
    with db.session() as s:
        s.execute(update(Delivery).values(next_attempt_at=db.now()))


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc")
    yield server  # not started: each test starts it when the story needs it
    server.stop()


def test_orthanc_down_then_back_gets_the_files_on_the_next_dispatch(
    tmp_path, database_url, orthanc
):
    config, db, spool = _dispatch_parts(tmp_path, database_url, orthanc.dicomweb_url)
    study_uid = generate_uid()
    uids = _seed(db, spool, [_image(study_uid, 0), _image(study_uid, 1)])
    dispatcher = Dispatcher(config, db, spool)
    assert dispatcher.deliver_due() == 0  # Orthanc is not running: and no exception
    for delivery in _deliveries(db):
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 1)
        assert delivery.last_error == "connection refused"
        assert delivery.next_attempt_at > db.now()  # backed off, not hammered
    orthanc.start()
    assert dispatcher.deliver_due() == 0  # not due yet
    _due_now(db)
    assert dispatcher.deliver_due() == 2
    assert [(d.state, d.attempts, d.last_error) for d in _deliveries(db)] == [
        (DeliveryState.SENT, 2, None)
    ] * 2
    stored = orthanc.study_instances(study_uid)
    assert sorted(t["SOPInstanceUID"] for t in stored) == sorted(uids)
    assert dispatcher.deliver_due() == 0  # nothing sent twice
    db.dispose()


def test_an_unreadable_file_fails_only_its_own_delivery(tmp_path, orthanc):
    orthanc.start()
    config, db, spool = _dispatch_parts(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}", orthanc.dicomweb_url
    )
    study_uid = generate_uid()
    good_uid, _ = _seed(db, spool, [_image(study_uid, 0), b"not a DICOM file at all"])
    assert Dispatcher(config, db, spool).deliver_due() == 1
    good, bad = _deliveries(db)
    assert (good.state, good.last_error) == (DeliveryState.SENT, None)
    assert bad.state == DeliveryState.PENDING and "InvalidDicomError" in bad.last_error
    assert [t["SOPInstanceUID"] for t in orthanc.study_instances(study_uid)] == [good_uid]
    db.dispose()


def test_basic_auth_takes_the_password_from_the_environment_and_never_shows_it(
    tmp_path, monkeypatch, caplog
):
    password = secrets.token_hex(12)
    orthanc = Orthanc(tmp_path / "orthanc", users={"scxnn": password}).start()
    caplog.set_level("DEBUG")
    try:
        config, db, spool = _dispatch_parts(
            tmp_path, f"sqlite:///{tmp_path / 'node.db'}", orthanc.dicomweb_url,
            username="scxnn", password_env=PASSWORD_ENV,
        )
        study_uid = generate_uid()
        _seed(db, spool, [_image(study_uid, 0)])
        dispatcher = Dispatcher(config, db, spool)

        monkeypatch.delenv(PASSWORD_ENV, raising=False)
        assert dispatcher.deliver_due() == 0
        [delivery] = _deliveries(db)
        assert f"environment variable {PASSWORD_ENV} is not set" in delivery.last_error

        monkeypatch.setenv(PASSWORD_ENV, password[::-1])  # a wrong one
        _due_now(db)
        assert dispatcher.deliver_due() == 0
        [delivery] = _deliveries(db)
        assert delivery.last_error == "HTTP 401 Unauthorized"

        monkeypatch.setenv(PASSWORD_ENV, password)
        _due_now(db)
        assert dispatcher.deliver_due() == 1
        [delivery] = _deliveries(db)
        assert (delivery.state, delivery.attempts) == (DeliveryState.SENT, 3)
        assert len(orthanc.study_instances(study_uid)) == 1
        assert password not in caplog.text and password[::-1] not in caplog.text
        db.dispose()
    finally:
        orthanc.stop()


# --- a DICOMweb server that answers badly ---------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes


Reply = Callable[[str], Answer | None]  # the SOP Instance UID posted -> the answer (None: silence)
HANG_UP = Answer(0, "", b"")  # close the connection without a word


def _posted_uid(body: bytes, content_type: str) -> str:
    """The SOP Instance UID of the one DICOM part of a STOW-RS request."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type).group(1).encode()
    part = body.split(b"--" + boundary)[1]
    payload = part.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n")
    return str(pydicom.dcmread(io.BytesIO(payload)).SOPInstanceUID)


class StowServer:
    """An HTTP server on loopback that takes STOW-RS POSTs, keeps what was posted, and answers
    whatever `reply` makes of each; `ssl_context` makes it https."""

    def __init__(self, reply: Reply, ssl_context: ssl.SSLContext | None = None) -> None:
        self.posts: list[tuple[str, str]] = []  # (path, SOP Instance UID)
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                uid = _posted_uid(body, self.headers["Content-Type"])
                server.posts.append((self.path, uid))
                answer = reply(uid)
                if answer is None:
                    server.stopping.wait(10)  # say nothing until the test ends
                    return
                if answer is HANG_UP:
                    self.close_connection = True
                    return
                self.send_response(answer.status)
                self.send_header("Content-Type", answer.content_type)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/dicom-web"

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., StowServer]]:
    started: list[StowServer] = []

    def start(reply: Reply, ssl_context: ssl.SSLContext | None = None) -> StowServer:
        started.append(StowServer(reply, ssl_context))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def _dicom_json(status: int, body: dict, content_type: str = "application/dicom+json") -> Answer:
    return Answer(status, content_type, json.dumps(body).encode())


def _stored(uid: str) -> dict:
    return {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}}


def _failed(uid: str, reason: int) -> dict:
    return {"00081198": {"vr": "SQ", "Value": [{
        "00081155": {"vr": "UI", "Value": [uid]}, "00081197": {"vr": "US", "Value": [reason]},
    }]}}  # fmt: skip


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (lambda uid: Answer(500, "text/plain", b"oops"), "HTTP 500 Internal Server Error"),
        (lambda uid: Answer(503, "text/html", b"<h1>busy</h1>"), "HTTP 503 Service Unavailable"),
        (lambda uid: _dicom_json(409, _failed(uid, 0xA700)),
         "HTTP 409 Conflict: refused: FailureReason 0xA700"),
        (lambda uid: _dicom_json(200, _failed(uid, 0xC000), "application/dicom+json; q=1"),
         "refused: FailureReason 0xC000"),
        (lambda uid: Answer(200, "text/html", b"<html>hello</html>"),
         "the server did not confirm storing it"),
        (lambda uid: _dicom_json(200, _stored(generate_uid())),
         "the server did not confirm storing it"),
        (lambda uid: Answer(200, "application/dicom+json", b"{this is not json"),
         "unreadable STOW-RS response"),
        (lambda uid: None, "no answer within 1 s"),
        (lambda uid: HANG_UP, "connection failed: RemoteDisconnected"),
    ],
)
def test_a_bad_answer_is_a_failed_attempt_with_a_clear_error(tmp_path, serve, reply, error):
    server = serve(reply)
    config, db, spool = _dispatch_parts(
        tmp_path, f"sqlite:///{tmp_path / 'node.db'}", server.url(), timeout_seconds=1
    )
    uids = _seed(db, spool, [_image(generate_uid(), 0), _image(generate_uid(), 1)])
    assert Dispatcher(config, db, spool).deliver_due() == 0  # and no exception
    for delivery in _deliveries(db):
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 1)
        assert delivery.last_error.startswith(error), delivery.last_error
    # One POST per file to {url}/studies, and no retries inside an attempt (the queue's
    # backoff is the only one); a server that says nothing fails the rest at once, while a
    # connection dropped during one file fails only that file.
    expected = uids[:1] if error.startswith("no answer") else uids
    assert server.posts == [("/dicom-web/studies", uid) for uid in expected]
    db.dispose()


def test_a_confirmed_file_is_sent_and_a_refused_one_is_not(tmp_path, serve):
    refused: list[str] = []
    server = serve(
        lambda uid: _dicom_json(200, _failed(uid, 0xC000) if uid in refused else _stored(uid),
                                "application/dicom+json; charset=utf-8")
    )
    config, db, spool = _dispatch_parts(tmp_path, f"sqlite:///{tmp_path / 'node.db'}",
                                        server.url())
    _, second = _seed(db, spool, [_image(generate_uid(), 0), _image(generate_uid(), 1)])
    refused.append(second)
    assert Dispatcher(config, db, spool).deliver_due() == 1
    sent, pending = _deliveries(db)
    assert (sent.state, sent.last_error) == (DeliveryState.SENT, None)
    assert (pending.state, pending.last_error) == (
        DeliveryState.PENDING, "refused: FailureReason 0xC000"
    )
    db.dispose()


def test_https_trusts_only_the_pinned_ca(tmp_path, serve):
    server_ca, other_ca = Pki(tmp_path / "ca"), Pki(tmp_path / "other", "other-ca")
    cert, key = server_ca.issue("pacs", "IP:127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = serve(lambda uid: _dicom_json(200, _stored(uid)), context)
    for ca, error in [(other_ca.cert, "TLS failed"), (server_ca.cert, None)]:
        root = tmp_path / f"node-{ca.stem}"
        config, db, spool = _dispatch_parts(root, f"sqlite:///{root / 'node.db'}",
                                            server.url("https"), ca=str(ca))
        _seed(db, spool, [_image(generate_uid(), 0)])
        Dispatcher(config, db, spool).deliver_due()
        [delivery] = _deliveries(db)
        if error is None:
            assert (delivery.state, delivery.last_error) == (DeliveryState.SENT, None)
        else:
            assert delivery.state == DeliveryState.PENDING
            assert delivery.last_error.startswith(error), delivery.last_error
        db.dispose()
    assert len(server.posts) == 1  # nothing was posted to a server the node did not trust


# --- the node, end to end -------------------------------------------------------------------


def test_a_study_forwarded_by_orthanc_comes_back_as_sr_and_summary_by_stow_rs(
    tmp_path, small_bundle_dir, monkeypatch
):
    password = secrets.token_hex(12)
    monkeypatch.setenv(PASSWORD_ENV, password)  # the node process inherits it
    config = serve_config(
        tmp_path / "node", small_bundle_dir, allowed_callers=[{"ae_title": ORTHANC_AE}],
        logging={"level": "DEBUG"},  # the password must not show even there
    )
    orthanc = Orthanc(
        tmp_path / "orthanc", int(config["node"]["port"]), users={"scxnn": password}
    ).start()
    config["destinations"] = [
        {"name": "web", "kind": "dicomweb", "url": orthanc.dicomweb_url,
         "outputs": ["sr", "summary"], "username": "scxnn", "password_env": PASSWORD_ENV}
    ]
    node = NodeProcess(config, tmp_path / "node")
    try:
        node.start()
        image = next(p for p in sample_files() if p.name == "nih_dx_no_finding.dcm")
        uploaded = orthanc.post("/instances", image.read_bytes())
        study_uid = orthanc.get(f"/studies/{uploaded['ParentStudy']}")["MainDicomTags"][
            "StudyInstanceUID"
        ]
        forwarded = orthanc.post("/modalities/scxnn/store", uploaded["ParentStudy"].encode())
        assert forwarded["FailedInstancesCount"] == 0 and forwarded["InstancesCount"] == 1

        wait_until(lambda: len(orthanc.study_instances(study_uid)) >= 3, 240, 0.5)
        time.sleep(2)  # nothing more may arrive: one SR and one summary for one image
        tags = orthanc.study_instances(study_uid)
        by_modality = {t["Modality"]: t for t in tags}
        assert len(tags) == 3 and set(by_modality) == {"DX", "SR", "OT"}
        sr, summary = by_modality["SR"], by_modality["OT"]
        assert sr["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert summary["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
        assert sr["SeriesDescription"].startswith("AI TRIAGE: ")
        assert {sr["StudyInstanceUID"], summary["StudyInstanceUID"]} == {study_uid}
        assert node.status()["deliveries"] == {DeliveryState.SENT: 2}
    finally:
        node.stop()
        orthanc.stop()
    assert password not in node.log_path.read_text(errors="replace")
