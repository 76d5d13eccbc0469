"""DICOM TLS: the SCP with a certificate and required client certificates; the SCU side."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from conftest import DATA
from sqlalchemy import select

from scxnn_node.config import TlsSection
from scxnn_node.dicom.scp import IngestService, StoreScp
from scxnn_node.dicom.scu import Peer, echo, send_files
from scxnn_node.store.db import Database
from scxnn_node.store.models import Instance
from scxnn_node.store.spool import Spool
from scxnn_node.testing.dcmtk import dcmtk_tool
from scxnn_node.testing.loopback import free_port, node_config, wait_for
from scxnn_node.testing.pki import Pki


def _self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_with_client_certificates(tmp_path):
    server_cert, server_key = _self_signed(tmp_path, "node")
    client_cert, client_key = _self_signed(tmp_path, "pacs")
    config = node_config(
        tmp_path,
        node={
            "tls": {
                "enabled": True,
                "certificate": str(server_cert),
                "key": str(server_key),
                "ca": str(client_cert),
                "require_client_certificate": True,
            }
        },
    )
    db = Database(config.database.url)
    db.create_schema()
    scp = StoreScp(config, IngestService(config, db, Spool(config.storage.spool_dir)))
    scp.start()
    try:
        trusted = TlsSection(enabled=True, certificate=client_cert, key=client_key, ca=server_cert)
        ok, message = echo(Peer("SCXNN", "127.0.0.1", config.node.port, trusted), "PACS")
        assert ok, message
        no_client_cert = TlsSection(enabled=True, ca=server_cert)
        ok, _ = echo(Peer("SCXNN", "127.0.0.1", config.node.port, no_client_cert), "PACS")
        assert not ok
        ok, _ = echo(Peer("SCXNN", "127.0.0.1", config.node.port), "PACS")  # plain TCP
        assert not ok
    finally:
        scp.shutdown()


# --- verified peers (issue 9) -------------------------------------------------------------


class TlsNode:
    """The SCP with DICOM TLS on loopback, and its database."""

    def __init__(self, tmp_path: Path, tls: dict, **sections) -> None:
        self.config = node_config(tmp_path, node={"tls": {"enabled": True, **tls}}, **sections)
        self.db = Database(self.config.database.url)
        self.db.create_schema()
        spool = Spool(self.config.storage.spool_dir)
        self.scp = StoreScp(self.config, IngestService(self.config, self.db, spool))

    def __enter__(self) -> TlsNode:
        self.scp.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.scp.shutdown()
        self.db.dispose()

    def echo(self, tls: TlsSection, aet: str = "PACS", host: str = "127.0.0.1") -> bool:
        return echo(Peer("SCXNN", host, self.config.node.port, tls), aet)[0]

    def instances(self) -> int:
        with self.db.session() as session:
            return len(session.execute(select(Instance)).scalars().all())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def test_outbound_tls_checks_the_host_name(tmp_path, pki):
    misnamed_cert, misnamed_key = pki.issue("elsewhere", "DNS:elsewhere.example")
    with TlsNode(tmp_path, {"certificate": str(misnamed_cert), "key": str(misnamed_key)}) as node:
        pinned = TlsSection(enabled=True, ca=pki.cert)
        assert not node.echo(pinned)  # a certificate of the right CA, for another host
        # The documented way around a PACS whose certificate names another host: a pinned
        # CA and check_hostname off.
        assert node.echo(TlsSection(enabled=True, ca=pki.cert, check_hostname=False))
    server_cert, server_key = pki.issue("node")
    with TlsNode(tmp_path, {"certificate": str(server_cert), "key": str(server_key)}) as node:
        assert node.echo(pinned)
        assert not node.echo(TlsSection(enabled=True))  # system CAs do not know this CA


def test_check_hostname_off_needs_a_pinned_ca():
    with pytest.raises(ValueError, match="check_hostname: false needs ca"):
        TlsSection(enabled=True, check_hostname=False)


def test_inbound_ca_verifies_a_presented_client_certificate(tmp_path, pki):
    server_cert, server_key = pki.issue("node")
    client_cert, client_key = pki.issue("pacs")
    stranger = Pki(tmp_path / "other-ca", "other-ca")
    stranger_cert, stranger_key = stranger.issue("pacs")
    tls = {"certificate": str(server_cert), "key": str(server_key), "ca": str(pki.cert)}
    with TlsNode(tmp_path, tls) as node:  # client certificates optional
        assert node.echo(TlsSection(enabled=True, ca=pki.cert))
        assert node.echo(
            TlsSection(enabled=True, ca=pki.cert, certificate=client_cert, key=client_key)
        )
        assert not node.echo(
            TlsSection(enabled=True, ca=pki.cert, certificate=stranger_cert, key=stranger_key)
        )


def test_a_client_certificate_is_tied_to_its_ae_title(tmp_path, pki):
    server_cert, server_key = pki.issue("node")
    pacs_cert, pacs_key = pki.issue("pacs")
    other_cert, other_key = pki.issue("modality")
    tls = {"certificate": str(server_cert), "key": str(server_key), "ca": str(pki.cert)}
    callers = [{"ae_title": "PACS", "certificate_cn": "pacs"}, {"ae_title": "MODALITY"}]
    with TlsNode(tmp_path, tls, allowed_callers=callers) as node:
        as_pacs = TlsSection(enabled=True, ca=pki.cert, certificate=pacs_cert, key=pacs_key)
        as_other = TlsSection(enabled=True, ca=pki.cert, certificate=other_cert, key=other_key)
        assert node.echo(as_pacs, "PACS")
        assert not node.echo(as_other, "PACS")  # a valid certificate, issued to another
        assert not node.echo(TlsSection(enabled=True, ca=pki.cert), "PACS")  # none at all
        assert node.echo(as_other, "MODALITY")  # no certificate_cn: any valid certificate


def test_certificate_cn_needs_node_tls_with_a_ca(tmp_path):
    with pytest.raises(ValueError, match=r"certificate_cn needs node\.tls"):
        node_config(tmp_path, allowed_callers=[{"ae_title": "PACS", "certificate_cn": "pacs"}])


def test_dcmtk_storescu_over_tls_to_the_node(tmp_path, pki):
    server_cert, server_key = pki.issue("node")
    client_cert, client_key = pki.issue("pacs")
    tls = {
        "certificate": str(server_cert),
        "key": str(server_key),
        "ca": str(pki.cert),
        "require_client_certificate": True,
    }
    callers = [{"ae_title": "PACS", "certificate_cn": "pacs"}]
    with TlsNode(tmp_path, tls, allowed_callers=callers) as node:
        run = subprocess.run(
            [
                dcmtk_tool("storescu"), "-xy",
                "+tls", str(client_key), str(client_cert), "+cf", str(pki.cert),
                "-aet", "PACS", "-aec", "SCXNN", "127.0.0.1", str(node.config.node.port),
                str(DATA / "siim_cr_negative.dcm"),
            ],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        assert node.instances() == 1


def test_node_sends_over_tls_to_dcmtk_storescp(tmp_path, pki):
    server_cert, server_key = pki.issue("pacs")
    client_cert, client_key = pki.issue("node")
    received = tmp_path / "received"
    received.mkdir()
    port = free_port()
    storescp = subprocess.Popen(
        [
            dcmtk_tool("storescp"),
            "+tls", str(server_key), str(server_cert), "+cf", str(pki.cert), "-rc",
            "+xa", "-aet", "PACS", "-od", str(received), str(port),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for(lambda: _listening(port), 20, 0.1)
        peer = Peer("PACS", "127.0.0.1", port, TlsSection(
            enabled=True, ca=pki.cert, certificate=client_cert, key=client_key
        ))  # fmt: skip
        assert send_files(peer, "SCXNN", [DATA / "siim_cr_negative.dcm"]) == [0x0000]
        assert len(list(received.iterdir())) == 1
        # Without the client certificate storescp (-rc) refuses the handshake.
        anonymous = Peer("PACS", "127.0.0.1", port, TlsSection(enabled=True, ca=pki.cert))
        assert send_files(anonymous, "SCXNN", [DATA / "siim_cr_negative.dcm"]) == [None]
    finally:
        storescp.terminate()
        storescp.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
