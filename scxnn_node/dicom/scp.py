"""The C-STORE / C-ECHO SCP: validate, store durably, answer.

`IngestService` holds the rules (DESIGN rule 1: Success only after the file is fsynced and
renamed and its row committed); the pynetdicom wiring below only calls it.
"""

from __future__ import annotations

import copy
import io
import logging
import re
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from scxnn_node.config import AllowedCaller, NodeConfig, TlsSection
from scxnn_node.doorbell import Doorbell
from scxnn_node.imaging.selection import assess_eligibility
from scxnn_node.logs import short_hash
from scxnn_node.store.assembly import InstanceRecord, record_instance
from scxnn_node.store.audit import commit_audit
from scxnn_node.store.db import Database
from scxnn_node.store.models import AuditAction
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)

SUCCESS = 0x0000
# Refused: out of resources. The sender retries later: only for what may succeed then (disk
# or database trouble), never for input that fails the same way every time.
OUT_OF_RESOURCES = 0xA700
# Error: cannot understand. Input this node will never store (unreadable, invalid UIDs, above
# storage.max_instance_bytes): PS3.4 B.2.3 leaves 0xA7xx for a lack of resources the sender
# may wait out, so a size that no retry changes is answered here and the sender gives up.
CANNOT_UNDERSTAND = 0xC000
PREAMBLE = b"\x00" * 128 + b"DICM"
MAX_UID_LENGTH = 64
# PS3.5 9.1: components of digits separated by dots. A leading zero in a component (also
# against 9.1) is accepted: it is seen in the field and harms neither storage nor the SR.
_UID_SHAPE = re.compile(r"[0-9]+(?:\.[0-9]+)*")
_HEADER_DEFER_BYTES = 1 << 20  # larger header values stay on disk while the header is read
# The largest PDU the SCP accepts (announced at association): a 1 MB image arrives in a few
# PDUs instead of 64 of pynetdicom's default 16 KB, each decoded in Python (bench/ingest.py).
# Bounded, since a PDU is held in memory whole.
MAX_RECEIVE_PDU_BYTES = 1 << 20
COMMIT_TURN_WAIT_S = 5.0  # the longest a C-STORE queues for its SQLite commit (IngestService)


def uid_problem(value: str) -> str | None:
    """Why `value` is not a UID this node stores, or None; never quotes the value."""
    if not value:
        return "empty"
    if len(value) > MAX_UID_LENGTH:
        return f"{len(value)} characters, at most {MAX_UID_LENGTH}"
    if not _UID_SHAPE.fullmatch(value):
        return "not digits separated by dots"
    return None


def raw_text(header: Dataset, keyword: str) -> str:
    """An element's value as sent (trailing padding removed), "" when absent. Read without
    pydicom's value conversion, which logs an invalid UID verbatim at WARNING."""
    if keyword not in header:
        return ""
    value = header.get_item(keyword).value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\x00 ")
    return "" if value is None else str(value).rstrip("\x00 ")


class UnusableUid(ValueError):
    """A UID this node will never store; the message names the element, never the value."""


@dataclass(frozen=True)
class InstanceUids:
    """The UIDs of a received instance, each checked."""

    sop_instance: str
    study: str
    series: str  # "" when absent: the instance is stored and analysed without it
    sop_class: str  # "" when absent: filtered out as an unknown SOP class

    @classmethod
    def of(cls, header: Dataset) -> InstanceUids:
        """The UIDs, or UnusableUid naming the first unusable one."""
        uids = cls(
            raw_text(header, "SOPInstanceUID"),
            raw_text(header, "StudyInstanceUID"),
            raw_text(header, "SeriesInstanceUID"),
            raw_text(header, "SOPClassUID"),
        )
        required = {"SOP Instance UID": uids.sop_instance, "Study Instance UID": uids.study}
        optional = {"Series Instance UID": uids.series, "SOP Class UID": uids.sop_class}
        for name, value in [*required.items(), *((n, v) for n, v in optional.items() if v)]:
            problem = uid_problem(value)
            if problem:
                raise UnusableUid(f"{name}: {problem}")
        return uids


def encode_part10(file_meta: Dataset, raw_dataset: bytes) -> list[bytes]:
    """The bytes of a Part 10 file: preamble, file meta group, the dataset as received."""
    meta = io.BytesIO()
    write_file_meta_info(meta, file_meta, enforce_standard=True)
    return [PREAMBLE, meta.getvalue(), raw_dataset]


def describe(exc: BaseException) -> str:
    """An exception as logs show it at INFO and above: its kind (and the OS error), never its
    text, which may quote a UID or an SQL parameter."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return type(exc).__name__


def holds_instance(path: Path, sop_instance_uid: str) -> bool:
    """True if `path` is a readable DICOM file of exactly this SOP instance."""
    try:
        header = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return raw_text(header, "SOPInstanceUID") == sop_instance_uid
    except Exception:  # missing, unreadable or not DICOM: rewrite it
        return False


class IngestService:
    """What the SCP does with one received instance, independent of the network code."""

    def __init__(
        self,
        config: NodeConfig,
        db: Database,
        spool: Spool,
        instance_received: Doorbell | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        # Rung after each new instance: the scheduler then checks its study when the study has
        # been quiet for study.quiet_seconds, instead of at its next poll.
        self.instance_received = instance_received or Doorbell()
        self.policy = config.selection_policy()
        self.sop_classes = set(config.filters.sop_classes)
        self.modalities = {m.strip().upper() for m in config.filters.modalities}
        # SQLite lets one transaction write at a time: this process's C-STOREs queue here for
        # their commit, each starting as the last ends, where SQLite's busy handler would
        # sleep 1, 2, 5, 10 ms and more between tries (bench/ingest.py, 4 senders).
        self._commit_turn = threading.Lock() if db.is_sqlite else None

    def filter_reason(self, header: Dataset, sop_class: str) -> str | None:
        """Why the configured filters exclude this image, or None to analyse it."""
        if sop_class not in self.sop_classes:
            return f"SOP class {sop_class} is not in filters.sop_classes"
        modality = str(header.get("Modality", "") or "").strip().upper()
        if modality not in self.modalities:
            return f"modality {modality!r} is not in filters.modalities"
        eligibility = assess_eligibility(header, self.policy)
        return None if eligibility.analyse else eligibility.reason

    def store(self, received: Path, calling_ae: str) -> int:
        """Validate a received Part 10 file, store it durably, answer with a DIMSE status.
        `received` stays the caller's: it is linked or copied into the spool, never moved."""
        if self.spool.free_bytes() < self.config.storage.min_free_bytes:
            log.error("C-STORE refused: free disk below storage.min_free_bytes")
            return self._refused(OUT_OF_RESOURCES, calling_ae, "free disk below the watermark")
        size = received.stat().st_size
        if size > self.config.storage.max_instance_bytes:
            log.warning(
                "C-STORE from %s refused: %d bytes, above storage.max_instance_bytes; "
                "answered 0xC000",
                calling_ae,
                size,
            )
            why = "above storage.max_instance_bytes"
            return self._refused(CANNOT_UNDERSTAND, calling_ae, why, size=size)
        try:
            header = dcmread(received, stop_before_pixels=True, defer_size=_HEADER_DEFER_BYTES)
            uids = InstanceUids.of(header)
            skip_reason = self.filter_reason(header, uids.sop_class)
        except Exception as exc:
            return self._reject(received, calling_ae, exc, size)
        try:
            rel = self.spool.instance_path(uids.study, uids.sop_instance)
            # A file already at the name is reused only if it holds this very instance (a
            # re-send, or a crash before the commit); anything else there is replaced.
            if not holds_instance(self.spool.absolute(rel), uids.sop_instance):
                self.spool.store_file(received, rel)
            new = self._record(
                InstanceRecord(
                    sop_instance_uid=uids.sop_instance,
                    study_instance_uid=uids.study,
                    series_instance_uid=uids.series,
                    sop_class_uid=uids.sop_class,
                    path=rel,
                    size=size,
                    calling_ae=calling_ae,
                    skip_reason=skip_reason,
                ),
            )
        except Exception as exc:  # disk or database: the sender must retry
            log.error(
                "C-STORE of %s not stored (%s); answered 0xA700",
                short_hash(uids.sop_instance),
                describe(exc),
            )
            log.debug("C-STORE of %s not stored", uids.sop_instance, exc_info=True)
            return self._refused(
                OUT_OF_RESOURCES, calling_ae, f"not stored: {describe(exc)}", size, uids
            )
        sop = short_hash(uids.sop_instance)
        if not new:
            log.info("duplicate instance %s from %s: already stored", sop, calling_ae)
        elif skip_reason:
            log.info("instance %s skipped: %s", sop, skip_reason)
        else:
            log.info("instance %s of study %s stored", sop, short_hash(uids.study))
            self.instance_received.ring()
        return SUCCESS

    def _record(self, record: InstanceRecord) -> bool:
        """Commit the instance's row; False if it was known. A concurrent association storing
        the same instance, or the first of the same study, is settled by the statements' ON
        CONFLICT clauses (store/assembly.py)."""
        if self._commit_turn is None:
            return record_instance(self.db, record)
        # Waiting longer means a stuck database: go to it anyway, where its busy timeout
        # bounds the wait and the sender gets 0xA700, as without the queue.
        queued = self._commit_turn.acquire(timeout=COMMIT_TURN_WAIT_S)
        try:
            return record_instance(self.db, record)
        finally:
            if queued:
                self._commit_turn.release()

    def _refused(
        self,
        status: int,
        calling_ae: str,
        why: str,
        size: int | None = None,
        uids: InstanceUids | None = None,
    ) -> int:
        """Answer a failure `status`, recorded in the audit trail (best effort: the answer
        does not wait on a database that may be the trouble)."""
        commit_audit(
            self.db,
            AuditAction.REFUSED,
            study_uid=uids.study if uids else "",
            instance_uid=uids.sop_instance if uids else "",
            party=calling_ae,
            outcome=f"0x{status:04X}",
            size_bytes=size,
            detail=why,
        )
        return status

    def _reject(self, received: Path, calling_ae: str, exc: Exception, size: int) -> int:
        """Answer cannot-understand, keeping the file in rejected/ for inspection."""
        why = str(exc) if isinstance(exc, UnusableUid) else describe(exc)
        try:
            kept = self.spool.store_file(received, self.spool.rejected_path()).name
        except OSError:
            kept = "(not kept: disk error)"
        log.warning("C-STORE from %s cannot be understood (%s); kept as %s", calling_ae, why, kept)
        log.debug("C-STORE from %s cannot be understood", calling_ae, exc_info=True)
        return self._refused(CANNOT_UNDERSTAND, calling_ae, f"cannot be understood: {why}", size)


def server_ssl_context(tls: TlsSection) -> ssl.SSLContext | None:
    """The SCP's TLS: its certificate; with tls.ca, a client certificate that is presented must
    chain to that CA (and must be presented with require_client_certificate). No system CA is
    trusted for callers."""
    if not tls.enabled:
        return None
    if tls.certificate is None or tls.key is None:
        raise ValueError("node.tls.enabled needs node.tls.certificate and node.tls.key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.certificate), str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(str(tls.ca))
        context.verify_mode = (
            ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
        )
    elif tls.require_client_certificate:
        raise ValueError("node.tls.require_client_certificate needs node.tls.ca")
    return context


def peer_certificate_names(assoc: object) -> set[str]:
    """The subject common names of the verified client certificate of an association over
    TLS; empty without TLS or without a verified certificate."""
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    sock = getattr(transport, "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return set()
    certificate = sock.getpeercert() or {}
    return {
        value
        for rdn in certificate.get("subject", ())
        for key, value in rdn
        if key == "commonName"
    }


class CallerPolicy:
    """The allow-list of calling AE titles (hosts, client certificates); None allows every
    caller."""

    def __init__(self, config: NodeConfig) -> None:
        self.callers = config.allowed_callers

    def refusal(
        self, ae_title: str, host: str, certificate_names: set[str] | None = None
    ) -> str | None:
        if self.callers is None:
            return None
        title = ae_title.strip()
        titles = [c for c in self.callers if c.ae_title == title]
        if not titles:
            return f"calling AE title {title!r} is not in allowed_callers"
        from_host = [c for c in titles if c.host is None or c.host == host]
        if not from_host:
            return f"calling AE title {title!r} is not allowed from {host}"
        if not any(_certificate_fits(c, certificate_names or set()) for c in from_host):
            return f"calling AE title {title!r} needs a client certificate issued to it"
        return None


def _certificate_fits(caller: AllowedCaller, names: set[str]) -> bool:
    return caller.certificate_cn is None or caller.certificate_cn in names


class SupportedContexts(list[PresentationContext]):
    """The SCP's presentation contexts as its server holds them. pynetdicom deep-copies them
    for every association (negotiation writes to its copies): here a copy of each context with
    its own lists and dicts, sharing the UIDs in them (immutable strings). A true deep copy of
    the 171 contexts x 45 transfer syntaxes took about 150 ms of CPU per association."""

    def __deepcopy__(self, memo: dict[int, object]) -> list[PresentationContext]:
        return [_context_copy(context) for context in self]


def _context_copy(context: PresentationContext) -> PresentationContext:
    """A copy of `context` whose containers are its own and whose items are shared."""
    fresh = copy.copy(context)
    for name, value in vars(fresh).items():
        if isinstance(value, list | dict | set):
            vars(fresh)[name] = copy.copy(value)
    return fresh


class WholeReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading a PDU in as few system calls as the kernel
    allows: pynetdicom's own `recv` reads 4 KiB at a time, a Python loop and a call per 4 KiB
    (about 250 per MB received)."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes`, or what arrived before the peer closed (as pynetdicom's does)."""
        sock = cast(socket.socket, self.socket)
        received = bytearray(nr_bytes)
        filled = 0
        with memoryview(received) as view:
            while filled < nr_bytes:
                count = sock.recv_into(view[filled:])
                if not count:
                    break
                filled += count
        if filled < nr_bytes:
            del received[filled:]
        return received


def read_whole_pdus(event: evt.Event) -> None:
    """On a new association (EVT_CONN_OPEN, before its first read): its socket reads whole."""
    association_socket = event.assoc.dul.socket
    if type(association_socket) is AssociationSocket:
        association_socket.__class__ = WholeReadSocket


class SharedPortServer(ThreadedAssociationServer):
    """An association server that shares its port with the node's other ingest processes
    (SO_REUSEPORT: the kernel spreads new connections over the processes listening)."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class StoreScp:
    """The node's SCP: a pynetdicom AE with its contexts, limits and three small handlers."""

    def __init__(self, config: NodeConfig, ingest: IngestService) -> None:
        self.config = config
        self.ingest = ingest
        self.callers = CallerPolicy(config)
        ae = AE(ae_title=config.node.ae_title)
        ae.maximum_associations = config.node.max_associations
        ae.acse_timeout = config.node.acse_timeout
        ae.dimse_timeout = config.node.dimse_timeout
        ae.network_timeout = config.node.network_timeout
        ae.maximum_pdu_size = MAX_RECEIVE_PDU_BYTES
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.ae = ae
        self.server: ThreadedAssociationServer | None = None
        # A received dataset streams to a temp file (TMPDIR) instead of memory; the setting is
        # process-wide, and every C-STORE handler in the node reads the file.
        pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True

    def on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        called = requestor.primitive.called_ae_title.strip()
        if self.config.node.check_called_ae and called != self.config.node.ae_title:
            log.warning(
                "association from %s refused: called AE title %r is not %r",
                requestor.address,
                called,
                self.config.node.ae_title,
            )
            self._audit_refusal(event, "called_ae_mismatch", f"called AE title {called!r}")
            # rejected-permanent, service-user, called-AE-title-not-recognized
            self._reject(event, 0x07)
            return
        reason = self.callers.refusal(
            requestor.primitive.calling_ae_title,
            requestor.address,
            peer_certificate_names(event.assoc),
        )
        if reason:
            log.warning("association from %s refused: %s", requestor.address, reason)
            self._audit_refusal(event, "calling_ae_not_allowed", reason)
            # rejected-permanent, service-user, calling-AE-title-not-recognized
            self._reject(event, 0x03)

    def _audit_refusal(self, event: evt.Event, outcome: str, why: str) -> None:
        requestor = event.assoc.requestor
        commit_audit(
            self.ingest.db,
            AuditAction.ASSOCIATION_REFUSED,
            party=requestor.primitive.calling_ae_title.strip(),
            outcome=outcome,
            detail=f"{why} (from {requestor.address})",
        )

    @staticmethod
    def _reject(event: evt.Event, reason: int) -> None:
        event.assoc.acse.send_reject(0x01, 0x01, reason)
        event.assoc.kill()  # lets the reject PDU go out before the socket closes

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title
        received = event.dataset_path
        if received is not None:  # streamed to a temp file that pynetdicom removes after us
            return self.ingest.store(Path(received), calling_ae)
        # Received in memory (the process-wide setting was changed): spool it to a file first.
        chunks = encode_part10(event.file_meta, event.request.DataSet.getvalue())
        with tempfile.TemporaryDirectory(dir=self.ingest.spool.absolute("tmp")) as folder:
            path = Path(folder) / "received.dcm"
            path.write_bytes(b"".join(chunks))
            return self.ingest.store(path, calling_ae)

    def start(self, share_port: bool = False) -> None:
        """Listen in background threads; with `share_port`, beside the node's other ingest
        processes on the same port."""
        address = (self.config.node.host, self.config.node.port)
        handlers = [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_CONN_OPEN, read_whole_pdus),
        ]
        ssl_context = server_ssl_context(self.config.node.tls)
        contexts = SupportedContexts(self.ae.supported_contexts)
        if not share_port:
            self.server = self.ae.start_server(
                address,
                block=False,
                evt_handlers=handlers,
                ssl_context=ssl_context,
                contexts=contexts,
            )
        else:  # what start_server(block=False) does, with the server class that shares
            server = self.ae.make_server(
                address,
                evt_handlers=handlers,
                ssl_context=ssl_context,
                contexts=contexts,
                server_class=SharedPortServer,
            )
            self.ae._servers.append(server)  # server.shutdown() takes it out again
            threading.Thread(
                target=server.serve_forever, name="ingest-acceptor", daemon=True
            ).start()
            self.server = server
        log.info(
            "SCP %s listening on %s:%d",
            self.config.node.ae_title,
            self.config.node.host,
            self.config.node.port,
        )

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
