"""The C-STORE / C-ECHO SCP: validate, store durably, answer.

`IngestService` holds the rules (DESIGN rule 1: Success only after the file is fsynced and
renamed and its row committed); the pynetdicom wiring below only calls it.
"""

from __future__ import annotations

import io
import logging
import ssl

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from scxnn_node.config import NodeConfig, TlsSection
from scxnn_node.imaging.selection import assess_eligibility
from scxnn_node.logs import short_hash
from scxnn_node.store.assembly import InstanceRecord, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PREAMBLE = b"\x00" * 128 + b"DICM"


def encode_part10(file_meta: Dataset, raw_dataset: bytes) -> list[bytes]:
    """The bytes of a Part 10 file: preamble, file meta group, the dataset as received."""
    meta = io.BytesIO()
    write_file_meta_info(meta, file_meta, enforce_standard=True)
    return [PREAMBLE, meta.getvalue(), raw_dataset]


class IngestService:
    """What the SCP does with one received instance, independent of the network code."""

    def __init__(self, config: NodeConfig, db: Database, spool: Spool) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        self.policy = config.selection_policy()
        self.sop_classes = set(config.filters.sop_classes)
        self.modalities = {m.strip().upper() for m in config.filters.modalities}

    def filter_reason(self, header: Dataset) -> str | None:
        """Why the configured filters exclude this image, or None to analyse it."""
        sop_class = str(header.get("SOPClassUID", ""))
        if sop_class not in self.sop_classes:
            return f"SOP class {sop_class} is not in filters.sop_classes"
        modality = str(header.get("Modality", "") or "").strip().upper()
        if modality not in self.modalities:
            return f"modality {modality!r} is not in filters.modalities"
        eligibility = assess_eligibility(header, self.policy)
        return None if eligibility.analyse else eligibility.reason

    def store(self, file_meta: Dataset, raw_dataset: bytes, calling_ae: str) -> int:
        """Validate, store durably, answer with a DIMSE status."""
        if self.spool.free_bytes() < self.config.storage.min_free_bytes:
            log.error("C-STORE refused: free disk below storage.min_free_bytes")
            return OUT_OF_RESOURCES
        chunks = encode_part10(file_meta, raw_dataset)
        try:
            header = dcmread(io.BytesIO(b"".join(chunks)), stop_before_pixels=True)
            sop_uid, study_uid = str(header.SOPInstanceUID), str(header.StudyInstanceUID)
            if not sop_uid or not study_uid:
                raise ValueError("empty SOP Instance UID or Study Instance UID")
        except Exception as exc:
            kept = self.spool.rejected_path()
            try:
                self.spool.write_durably(kept, chunks)
            except OSError:
                kept = "(not kept: disk error)"
            log.warning(
                "C-STORE from %s cannot be understood (%s); kept as %s", calling_ae, exc, kept
            )
            return CANNOT_UNDERSTAND
        try:
            skip_reason = self.filter_reason(header)
            rel = self.spool.instance_path(study_uid, sop_uid)
            # The path is fixed per SOP instance and appears only by atomic rename: a file
            # already there is this instance, complete (a re-send, or a crash before commit).
            if not self.spool.absolute(rel).is_file():
                self.spool.write_durably(rel, chunks)
            new = record_instance(
                self.db,
                InstanceRecord(
                    sop_instance_uid=sop_uid,
                    study_instance_uid=study_uid,
                    series_instance_uid=str(header.get("SeriesInstanceUID", "")),
                    sop_class_uid=str(header.get("SOPClassUID", "")),
                    path=rel,
                    size=sum(len(c) for c in chunks),
                    calling_ae=calling_ae,
                    skip_reason=skip_reason,
                ),
            )
        except Exception as exc:  # disk or database: the sender must retry
            log.error("C-STORE of %s not stored (%s); answered 0xA700", short_hash(sop_uid), exc)
            return OUT_OF_RESOURCES
        if not new:
            log.info(
                "duplicate instance %s from %s: already stored", short_hash(sop_uid), calling_ae
            )
        elif skip_reason:
            log.info("instance %s skipped: %s", short_hash(sop_uid), skip_reason)
        else:
            log.info("instance %s of study %s stored", short_hash(sop_uid), short_hash(study_uid))
        return SUCCESS


def server_ssl_context(tls: TlsSection) -> ssl.SSLContext | None:
    if not tls.enabled:
        return None
    if tls.certificate is None or tls.key is None:
        raise ValueError("node.tls.enabled needs node.tls.certificate and node.tls.key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls.certificate), str(tls.key))
    if tls.ca is not None:
        context.load_verify_locations(str(tls.ca))
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class CallerPolicy:
    """The allow-list of calling AE titles (and hosts); None allows every caller."""

    def __init__(self, config: NodeConfig) -> None:
        self.callers = config.allowed_callers

    def refusal(self, ae_title: str, host: str) -> str | None:
        if self.callers is None:
            return None
        titles = [c for c in self.callers if c.ae_title == ae_title.strip()]
        if not titles:
            return f"calling AE title {ae_title.strip()!r} is not in allowed_callers"
        if all(c.host is not None and c.host != host for c in titles):
            return f"calling AE title {ae_title.strip()!r} is not allowed from {host}"
        return None


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
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.ae = ae
        self.server: ThreadedAssociationServer | None = None

    def on_requested(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        reason = self.callers.refusal(requestor.primitive.calling_ae_title, requestor.address)
        if reason:
            log.warning("association from %s refused: %s", requestor.address, reason)
            # rejected-permanent, service-user, calling-AE-title-not-recognized
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)
            event.assoc.kill()  # lets the reject PDU go out before the socket closes

    def on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def on_store(self, event: evt.Event) -> int:
        return self.ingest.store(
            event.file_meta, event.request.DataSet.getvalue(), event.assoc.requestor.ae_title
        )

    def start(self) -> None:
        """Listen in background threads."""
        self.server = self.ae.start_server(
            (self.config.node.host, self.config.node.port),
            block=False,
            evt_handlers=[
                (evt.EVT_REQUESTED, self.on_requested),
                (evt.EVT_C_ECHO, self.on_echo),
                (evt.EVT_C_STORE, self.on_store),
            ],
            ssl_context=server_ssl_context(self.config.node.tls),
        )
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
