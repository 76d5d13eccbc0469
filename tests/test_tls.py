"""DICOM TLS: the SCP with a certificate and required client certificates; the SCU side."""

from __future__ import annotations

import subprocess
from pathlib import Path

from scxnn_node.config import TlsSection
from scxnn_node.dicom.scp import IngestService, StoreScp
from scxnn_node.dicom.scu import Peer, echo
from scxnn_node.store.db import Database
from scxnn_node.store.spool import Spool
from scxnn_node.testing.loopback import node_config


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
