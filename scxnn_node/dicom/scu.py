"""C-ECHO and C-STORE as a client: to the configured destinations, and `scxnn-node send`."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, Association

from scxnn_node.config import DicomDestination, TlsSection

log = logging.getLogger(__name__)

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


def client_ssl_context(tls: TlsSection | None) -> ssl.SSLContext | None:
    """The SCU's TLS: the peer's certificate must chain to tls.ca alone when it is set (a
    pinned CA), to a system CA otherwise, and must name the host dialled unless
    tls.check_hostname is off (allowed only with a pinned CA: some PACS certificates name
    another host)."""
    if tls is None or not tls.enabled:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.certificate is not None and tls.key is not None:
        context.load_cert_chain(str(tls.certificate), str(tls.key))
    return context


@dataclass(frozen=True)
class Peer:
    """Where to send: the subset of a destination the network code needs."""

    ae_title: str
    host: str
    port: int
    tls: TlsSection | None = None

    @classmethod
    def of(cls, destination: DicomDestination) -> Peer:
        return cls(destination.ae_title, destination.host, destination.port, destination.tls)


def _associate(ae: AE, peer: Peer) -> Association:
    context = client_ssl_context(peer.tls)
    tls_args = (context, peer.host) if context is not None else None
    return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)


def echo(peer: Peer, calling_ae: str, timeout: float = 10.0) -> tuple[bool, str]:
    """C-ECHO; (True, "ok") or (False, why)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        return False, "association rejected or peer unreachable"
    try:
        status = assoc.send_c_echo()
        if status and int(status.Status) == 0:
            return True, "ok"
        return False, "no or failed C-ECHO response"
    finally:
        assoc.release()


def send_files(
    peer: Peer, calling_ae: str, paths: Sequence[Path], timeout: float = 60.0
) -> list[int | None]:
    """C-STORE each file over one association; per file its status, None if not sent."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    headers = []
    for path in paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        headers.append(header)
    # One context per (SOP class, transfer syntax) sent as is, plus an uncompressed one per
    # SOP class: an acceptor picks a single syntax per context.
    pairs = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for h in headers}
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, [syntax])
    for sop_class in sorted({c for c, _ in pairs}):
        ae.add_requested_context(sop_class, UNCOMPRESSED)
    assoc = _associate(ae, peer)
    if not assoc.is_established:
        return [None] * len(paths)
    statuses: list[int | None] = []
    try:
        for path in paths:
            try:
                status = assoc.send_c_store(path)
                statuses.append(int(status.Status) if status and "Status" in status else None)
            except Exception as exc:
                log.warning("C-STORE of %s to %s failed: %s", path.name, peer.ae_title, exc)
                statuses.append(None)
            if not assoc.is_established:
                statuses.extend([None] * (len(paths) - len(statuses)))
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def is_success(status: int | None) -> bool:
    """Success or warning (0xB000, 0xB007, 0xB006) statuses mean the peer has the object."""
    return status is not None and (status == 0 or 0xB000 <= status <= 0xBFFF)
