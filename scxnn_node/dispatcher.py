"""Delivery of results: the dispatcher claims due deliveries under a lease and sends each; a
failure is retried with backoff or dead-lettered, and fails only its own delivery."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import defaultdict
from datetime import timedelta

from scxnn_node.config import NodeConfig
from scxnn_node.dicom.scu import Peer, is_success, send_files
from scxnn_node.store.db import Database
from scxnn_node.store.results import (
    Attempt,
    DueDelivery,
    claim_due_deliveries,
    missing_output,
    record_attempts,
)
from scxnn_node.store.spool import Spool

log = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, config: NodeConfig, db: Database, spool: Spool) -> None:
        self.config = config
        self.db = db
        self.spool = spool
        # The lease owner: unique per dispatcher, even for two in one process (tests, bench).
        self.owner = f"{socket.gethostname()}:{os.getpid()}:dispatcher:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=config.delivery.lease_seconds)

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
        """One association to `destination` for all of `items`; an attempt per item."""
        try:
            peer = Peer.of(self.config.destination(destination))
        except KeyError as exc:  # removed from the config while deliveries waited
            return [Attempt(d.id, str(exc.args[0]), final=True) for d in items]
        try:
            statuses = send_files(
                peer, self.config.node.ae_title, [self.spool.absolute(d.path) for d in items]
            )
        except Exception as exc:  # e.g. an unreadable file: it must not fail the others
            if len(items) > 1:
                return [attempt for d in items for attempt in self._send(destination, [d])]
            return [Attempt(items[0].id, f"{type(exc).__name__}: {exc}")]
        error = "association failed" if all(s is None for s in statuses) else None
        return [
            Attempt(d.id, _failure(status, error))
            for d, status in zip(items, statuses, strict=True)
        ]

    def _record(self, attempts: list[Attempt]) -> int:
        if not attempts:
            return 0
        return record_attempts(
            self.db, self.owner, attempts, self.config.delivery.max_attempts, self.backoff
        )


def _failure(status: int | None, error: str | None) -> str | None:
    """None for a successful C-STORE, otherwise why the file was not stored."""
    if is_success(status):
        return None
    if status is not None:
        return f"status 0x{status:04X}"
    return error or "not sent"
