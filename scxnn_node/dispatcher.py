"""Delivery of results: the dispatcher claims due deliveries under a lease and sends each with
the sender of its destination's kind (DICOM C-STORE, HL7 over MLLP, DICOMweb STOW-RS); a
failure is retried with backoff or dead-lettered, and fails only its own delivery."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import defaultdict
from datetime import timedelta
from typing import Protocol

from scxnn_node.config import DicomDestination, DicomWebDestination, Hl7Destination, NodeConfig
from scxnn_node.dicom.scu import Peer, client_ssl_context, is_success, send_files
from scxnn_node.dicom.stow import DicomWebSender
from scxnn_node.hl7.mllp import exchange
from scxnn_node.hl7.oru import ack_failure, control_id_of
from scxnn_node.store.db import Database
from scxnn_node.store.models import OutputKind
from scxnn_node.store.results import (
    Attempt,
    DueDelivery,
    claim_due_deliveries,
    delivery_lease_owners,
    missing_output,
    record_attempts,
    release_deliveries_of,
)
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)


class Sender(Protocol):
    """Sends one destination's due deliveries: an attempt per item, never an exception."""

    def send(self, items: list[DueDelivery]) -> list[Attempt]: ...


class DicomSender:
    """C-STORE of the SR and summary image, all items over one association."""

    def __init__(self, destination: DicomDestination, calling_ae: str, spool: Spool) -> None:
        self.peer = Peer.of(destination)
        self.calling_ae = calling_ae
        self.spool = spool

    def send(self, items: list[DueDelivery]) -> list[Attempt]:
        try:
            statuses = send_files(
                self.peer, self.calling_ae, [self.spool.absolute(d.path) for d in items]
            )
        except Exception as exc:  # e.g. an unreadable file: it must not fail the others
            if len(items) > 1:
                return [attempt for d in items for attempt in self.send([d])]
            return [Attempt(items[0].id, f"{type(exc).__name__}: {exc}")]
        error = "association failed" if all(s is None for s in statuses) else None
        return [
            Attempt(d.id, _failure(status, error))
            for d, status in zip(items, statuses, strict=True)
        ]


class Hl7Sender:
    """The ORU^R01 messages the worker wrote, over one MLLP connection; a message is sent
    when the RIS's ACK accepts it (AA or CA), and anything else is a failed attempt."""

    def __init__(self, destination: Hl7Destination, spool: Spool) -> None:
        self.destination = destination
        self.spool = spool

    def send(self, items: list[DueDelivery]) -> list[Attempt]:
        d = self.destination
        try:
            messages = [self.spool.absolute(item.path).read_bytes() for item in items]
            context = client_ssl_context(d.tls)
        except Exception as exc:  # an unreadable file or certificate: as the DICOM sender
            if len(items) > 1:
                return [attempt for item in items for attempt in self.send([item])]
            return [Attempt(items[0].id, f"{type(exc).__name__}: {exc}")]
        replies = exchange(d.host, d.port, messages, d.ack_timeout_seconds, context)
        attempts = []
        for item, message, reply in zip(items, messages, replies, strict=True):
            if reply.content is None:
                failure = reply.error or "no ACK"
            else:
                failure = ack_failure(reply.content, control_id_of(message))
            attempts.append(Attempt(item.id, failure))
        return attempts


class Dispatcher:
    def __init__(self, config: NodeConfig, db: Database, spool: Spool) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        # The lease owner: unique per dispatcher, even for two in one process (tests, bench).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:dispatcher:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=config.delivery.lease_seconds)

    def release_dead_leases(self) -> int:
        """Deliveries leased by a dispatcher of this host whose process is gone (killed, or
        crashed) are due now, not when their lease expires; returns how many."""
        dead = [owner for owner in delivery_lease_owners(self.db) if _died_here(owner)]
        released = release_deliveries_of(self.db, dead)
        if released:
            log.warning("%d delivery(ies) of a dispatcher that died are due again", released)
        return released

    def backoff(self, attempts: int) -> timedelta:
        d = self.config.delivery
        return timedelta(
            seconds=min(d.max_backoff_seconds, d.backoff_seconds * 2 ** (attempts - 1))
        )

    def deliver_due(self, limit: int = 200) -> int:
        """Claim up to `limit` due deliveries and send them; returns how many were sent."""
        by_destination: dict[str, list[DueDelivery]] = defaultdict(list)
        unsendable: list[Attempt] = []
        for due in claim_due_deliveries(self.db, self.owner, limit, self.lease):
            why = missing_output(self.spool.root, due.path)
            if why is None:
                by_destination[due.destination].append(due)
            else:  # a file that is not there will not appear by waiting
                unsendable.append(Attempt(due.id, why, final=True))
        sent = self._record(unsendable)
        for name, items in by_destination.items():
            sent += self._record(self._send(name, items))
        return sent

    def _send(self, destination: str, items: list[DueDelivery]) -> list[Attempt]:
        """All of `items` to `destination` by the sender of its kind; an attempt per item."""
        try:
            config = self.config.destination(destination)
        except KeyError as exc:  # removed from the config while deliveries waited
            return [Attempt(d.id, str(exc.args[0]), final=True) for d in items]
        # A destination whose kind changed while deliveries waited cannot take their files.
        fits = [d for d in items if (d.kind == OutputKind.HL7) == (config.kind == "hl7")]
        misfits = [
            Attempt(d.id, f"a {d.kind} output cannot go to {config.kind} destination", final=True)
            for d in items
            if d not in fits
        ]
        if not fits:
            return misfits
        sender: Sender
        if isinstance(config, Hl7Destination):
            sender = Hl7Sender(config, self.spool)
        elif isinstance(config, DicomWebDestination):
            sender = DicomWebSender(config, self.spool)
        else:
            sender = DicomSender(config, self.config.node.ae_title, self.spool)
        try:
            return misfits + sender.send(fits)
        except Exception as exc:  # a sender's bug fails its deliveries, not the dispatcher
            log.exception("sending to %s failed", destination)
            return misfits + [Attempt(d.id, f"{type(exc).__name__}: {exc}") for d in fits]

    def _record(self, attempts: list[Attempt]) -> int:
        if not attempts:
            return 0
        return record_attempts(
            self.db, self.owner, attempts, self.config.delivery.max_attempts, self.backoff
        )


def _died_here(owner: str) -> bool:
    """Whether `owner` (host:pid:dispatcher:id) is a dispatcher of this host whose process no
    longer exists. A pid reused since counts as alive: its lease then expires as usual."""
    parts = owner.rsplit(":", 3)
    if len(parts) != 4 or parts[2] != "dispatcher" or parts[0] != socket.gethostname():
        return False
    try:
        pid = int(parts[1])
        os.kill(pid, 0)  # signal 0: nothing sent, only whether the process exists
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):  # not a pid; a process of another user
        return False
    return False


def _failure(status: int | None, error: str | None) -> str | None:
    """None for a successful C-STORE, otherwise why the file was not stored."""
    if is_success(status):
        return None
    if status is not None:
        return f"status 0x{status:04X}"
    return error or "not sent"
